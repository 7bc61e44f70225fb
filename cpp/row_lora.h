// LoRA per batch row, so that one llama_decode serves requests under different
// adapters (the punica/S-LoRA idea, on llama.cpp's CPU graph).
//
// llama.cpp attaches adapters to a context: every row of a decode gets the same
// ones, and changing them makes the next decode rebuild and re-reserve its graph.
// Instead the engine leaves the context without adapters and adds each row's LoRA
// term itself, through the scheduler's evaluation callback: llama.cpp asks, node by
// node, whether we want to see a tensor; we ask for the output of every matrix
// product whose weight one of this step's adapters adapts, and when it is computed
// we add  scale * B (A x)  to each row whose request runs under that adapter, before
// any later node reads it. x is the product's own input (src[1]), still live then.
//
// Rows: a product's output has one row per token of the step, except after the last
// layer's output selection, where it has one row per token that wants logits; both
// are in batch order (unified KV cache, one micro-batch per decode: engine.cpp).
#pragma once
#include <cstdint>
#include <memory>
#include <deque>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

#include "ggml.h"

namespace mtllm {

// One adapted weight: A as stored (rank rows of n_in: A x is rank dot products), B
// transposed (rank rows of n_out: B t is rank vector updates).
struct HostLoraWeight {
    int n_in = 0, n_out = 0, rank = 0;
    std::vector<float> a;    // rank x n_in
    std::vector<float> b_t;  // rank x n_out  (B^T)
};

// An adapter's tensors as float32 on the host, keyed by the base weight's name
// ("blk.3.attn_q.weight"). Immutable after load; shared by requests naming it.
class HostLora {
public:
    // nullptr (and `why`) when the file has tensors that are not block matrix weights
    // (an embedding or output LoRA): such an adapter is served per context instead.
    // The file was validated against the model by llama_adapter_lora_init before.
    static std::shared_ptr<const HostLora> load(const std::string& path, std::string* why);

    // Called for every matrix product of a decode: looked up without allocating.
    const HostLoraWeight* find(const char* weight_name) const {
        auto it = index_.find(std::string_view(weight_name));
        return it == index_.end() ? nullptr : &weights_[it->second];
    }
    // llama.cpp's rule: alpha / rank x the request's scale (the scale alone without alpha)
    float scale_for(const HostLoraWeight& w, float request_scale) const {
        return alpha_ != 0.0f ? request_scale * alpha_ / float(w.rank) : request_scale;
    }
    size_t bytes() const;

private:
    float alpha_ = 0.0f;
    std::deque<std::string> names_;  // stable storage for index_'s keys
    std::vector<HostLoraWeight> weights_;
    std::unordered_map<std::string_view, size_t> index_;
};

// The adapters one request runs under, resolved to their host copies.
using HostAdapterSet = std::vector<std::pair<std::shared_ptr<const HostLora>, float>>;

// The evaluation callback and what it needs for one decode. Scheduler thread only.
class RowLora {
public:
    // The rows of the next decode: one entry per batch token, and one per token that
    // wants logits, in batch order; nullptr or an empty set = the base model. n_threads:
    // the decode's threads, which also compute the LoRA terms.
    void begin(const std::vector<const HostAdapterSet*>& token_rows, const std::vector<const HostAdapterSet*>& output_rows,
               int n_threads);
    void end();  // after llama_decode: nothing is applied until the next begin
    bool active() const { return active_; }
    // Set when a product did not have the shape or layout the callback can handle;
    // the decode's output is then wrong and the engine fails the step's requests.
    const std::string& error() const { return error_; }
    double apply_ms() const { return apply_ms_; }  // time adding LoRA terms, since construction

    // ggml_backend_sched_eval_callback; user_data is the RowLora
    static bool callback(struct ggml_tensor* t, bool ask, void* user_data);

private:
    bool wants(const struct ggml_tensor* t) const;
    void apply(struct ggml_tensor* t);

    struct RowUse {
        int row;
        float scale;
    };
    struct Uses {  // one adapter's rows in this decode
        const HostLora* lora;
        std::vector<RowUse> tokens, outputs;
    };
    struct Work {  // one adapter's part of one product
        const HostLoraWeight* w;
        const std::vector<RowUse>* use;
        const HostLora* lora;
        size_t ax;  // offset of its A x values in ax_
    };
    std::vector<Work> work_;
    bool active_ = false;
    std::vector<Uses> uses_;
    int64_t n_tokens_ = 0, n_outputs_ = 0;
    int threads_ = 1;
    std::string error_;
    double apply_ms_ = 0;
    std::vector<float> x_, y_, ax_;  // staging for tensors not in host memory; A x per row
};

}  // namespace mtllm
