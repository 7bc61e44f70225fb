#include "row_lora.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "errors.h"
#include "ggml-backend.h"
#include "gguf.h"

namespace mtllm {

namespace {

constexpr const char* kSuffixA = ".lora_a";
constexpr const char* kSuffixB = ".lora_b";

bool ends_with(const std::string& s, const char* suffix) {
    const size_t n = std::strlen(suffix);
    return s.size() >= n && s.compare(s.size() - n, n, suffix) == 0;
}

std::vector<float> to_f32(const ggml_tensor* t) {
    const int64_t n = ggml_nelements(t);
    std::vector<float> out(size_t(n), 0.0f);
    if (t->type == GGML_TYPE_F32) {
        std::memcpy(out.data(), t->data, size_t(n) * sizeof(float));
        return out;
    }
    const auto* traits = ggml_get_type_traits(t->type);
    if (!traits || !traits->to_float) throw AdapterLoadError(std::string("LoRA tensor ") + t->name + " has a type that cannot be read: " + ggml_type_name(t->type));
    traits->to_float(t->data, out.data(), n);
    return out;
}

// sum_i a[i] x[i] in a fixed order: 32 running sums (two vector registers' lanes, two
// independent chains), then those in order, then the tail. The same for every row
// whatever the batch, and vectorized without -ffast-math.
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
float dot(const float* a, const float* x, int n) {
    float acc[32] = {0};
    int i = 0;
    for (; i + 32 <= n; i += 32)
        for (int j = 0; j < 32; ++j) acc[j] += a[i + j] * x[i + j];
    float s = 0.0f;
    for (int j = 0; j < 32; ++j) s += acc[j];
    for (; i < n; ++i) s += a[i] * x[i];
    return s;
}

// y += c * b
#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target_clones("avx512f", "avx2", "default")))
#endif
void axpy(float c, const float* b, float* y, int n) {
    for (int o = 0; o < n; ++o) y[o] += c * b[o];
}

bool is_host(const ggml_tensor* t) { return t->buffer == nullptr || ggml_backend_buffer_is_host(t->buffer); }

}  // namespace

std::shared_ptr<const HostLora> HostLora::load(const std::string& path, std::string* why) {
    ggml_context* data = nullptr;
    gguf_init_params params{/*no_alloc=*/false, &data};
    gguf_context* g = gguf_init_from_file(path.c_str(), params);
    if (!g) throw AdapterLoadError("cannot read LoRA adapter '" + path + "'");
    auto lora = std::shared_ptr<HostLora>(new HostLora());
    try {
        const int64_t alpha_key = gguf_find_key(g, "adapter.lora.alpha");
        if (alpha_key >= 0 && gguf_get_kv_type(g, alpha_key) == GGUF_TYPE_FLOAT32) lora->alpha_ = gguf_get_val_f32(g, alpha_key);
        const int64_t n = gguf_get_n_tensors(g);
        for (int64_t i = 0; i < n; ++i) {
            const std::string name = gguf_get_tensor_name(g, i);
            if (!ends_with(name, kSuffixA)) {
                if (!ends_with(name, kSuffixB)) {
                    *why = "tensor " + name + " is not a LoRA pair";
                    gguf_free(g);
                    ggml_free(data);
                    return nullptr;
                }
                continue;  // read with its A
            }
            const std::string base = name.substr(0, name.size() - std::strlen(kSuffixA));
            const ggml_tensor* a = ggml_get_tensor(data, name.c_str());
            const ggml_tensor* b = ggml_get_tensor(data, (base + kSuffixB).c_str());
            if (base.rfind("blk.", 0) != 0 || !ends_with(base, ".weight")) {
                *why = "it adapts " + base + ", which is not a block's matrix";
                gguf_free(g);
                ggml_free(data);
                return nullptr;
            }
            // ggml shapes: A is [n_in, rank], B is [rank, n_out] (llama.cpp checked them against the model)
            if (!a || !b || ggml_n_dims(a) > 2 || ggml_n_dims(b) > 2 || a->ne[1] != b->ne[0])
                throw AdapterLoadError("LoRA tensors of " + base + " have inconsistent shapes");
            HostLoraWeight w;
            w.n_in = int(a->ne[0]);
            w.rank = int(a->ne[1]);
            w.n_out = int(b->ne[1]);
            const std::vector<float> fa = to_f32(a), fb = to_f32(b);
            w.a = fa;
            w.b_t.resize(fb.size());
            for (int o = 0; o < w.n_out; ++o)
                for (int k = 0; k < w.rank; ++k) w.b_t[size_t(k) * w.n_out + o] = fb[size_t(o) * w.rank + k];
            lora->names_.push_back(base);
            lora->weights_.push_back(std::move(w));
        }
    } catch (...) {
        gguf_free(g);
        ggml_free(data);
        throw;
    }
    gguf_free(g);
    ggml_free(data);
    for (size_t i = 0; i < lora->names_.size(); ++i) lora->index_.emplace(lora->names_[i], i);
    return lora;
}

size_t HostLora::bytes() const {
    size_t n = 0;
    for (const auto& w : weights_) n += (w.a.size() + w.b_t.size()) * sizeof(float);
    return n;
}

void RowLora::begin(const std::vector<const HostAdapterSet*>& token_rows, const std::vector<const HostAdapterSet*>& output_rows,
                    int n_threads) {
    uses_.clear();
    threads_ = n_threads;
    auto add = [&](const HostAdapterSet* set, int row, bool output) {
        if (!set) return;
        for (const auto& [lora, scale] : *set) {
            auto it = std::find_if(uses_.begin(), uses_.end(), [&](const Uses& u) { return u.lora == lora.get(); });
            if (it == uses_.end()) it = uses_.insert(uses_.end(), Uses{lora.get(), {}, {}});
            (output ? it->outputs : it->tokens).push_back({row, scale});
        }
    };
    for (size_t j = 0; j < token_rows.size(); ++j) add(token_rows[j], int(j), false);
    for (size_t j = 0; j < output_rows.size(); ++j) add(output_rows[j], int(j), true);
    // One order for every batch: a row under several adapters adds their terms in the
    // same order whoever shares its decode, so its output never depends on them.
    std::sort(uses_.begin(), uses_.end(), [](const Uses& a, const Uses& b) { return std::less<const HostLora*>()(a.lora, b.lora); });
    n_tokens_ = int64_t(token_rows.size());
    n_outputs_ = int64_t(output_rows.size());
    active_ = !uses_.empty();
    error_.clear();
}

void RowLora::end() {
    active_ = false;
    uses_.clear();
}

bool RowLora::callback(ggml_tensor* t, bool ask, void* user_data) {
    auto* self = static_cast<RowLora*>(user_data);
    if (!self->active_) return !ask;  // nothing asked for; never stop a computation
    if (ask) return self->wants(t);
    try {
        self->apply(t);
    } catch (const std::exception& e) {
        self->error_ = e.what();
    }
    return true;  // false would end the graph early and leave the decode's output half-computed
}

bool RowLora::wants(const ggml_tensor* t) const {
    if (t->op != GGML_OP_MUL_MAT || !t->src[0] || !error_.empty()) return false;
    for (const Uses& u : uses_)
        if (u.lora->find(t->src[0]->name)) return true;
    return false;
}

void RowLora::apply(ggml_tensor* t) {
    const auto t0 = std::chrono::steady_clock::now();
    const ggml_tensor* x = t->src[1];
    const char* weight = t->src[0]->name;
    const int64_t rows = t->ne[1];
    // Rows are the step's tokens, or after the last layer's output selection its outputs.
    const bool outputs = rows != n_tokens_;
    if ((outputs && rows != n_outputs_) || t->type != GGML_TYPE_F32 || x->type != GGML_TYPE_F32 || t->ne[2] != 1 ||
        t->ne[3] != 1 || x->ne[1] != rows || x->ne[2] != 1 || x->ne[3] != 1 || t->nb[0] != sizeof(float) ||
        x->nb[0] != sizeof(float)) {
        error_ = std::string("per-row LoRA: unexpected product for ") + weight + " (" + std::to_string(rows) + " rows of " +
                 ggml_type_name(t->type) + ", batch of " + std::to_string(n_tokens_) + " tokens)";
        return;
    }
    const int n_in = int(x->ne[0]), n_out = int(t->ne[0]);
    // A tensor in device memory (a GPU build offloading this product) is staged through the host.
    const bool host_x = is_host(x), host_y = is_host(t);
    if (!host_x) {
        x_.resize(size_t(rows * n_in));
        for (int64_t r = 0; r < rows; ++r)
            ggml_backend_tensor_get(x, x_.data() + r * n_in, size_t(r * x->nb[1]), size_t(n_in) * sizeof(float));
    }
    if (!host_y) {
        y_.resize(size_t(rows * n_out));
        for (int64_t r = 0; r < rows; ++r)
            ggml_backend_tensor_get(t, y_.data() + r * n_out, size_t(r * t->nb[1]), size_t(n_out) * sizeof(float));
    }
    auto x_row = [&](int r) -> const float* {
        return host_x ? reinterpret_cast<const float*>(static_cast<const char*>(x->data) + r * x->nb[1]) : x_.data() + size_t(r) * n_in;
    };
    auto y_row = [&](int r) -> float* {
        return host_y ? reinterpret_cast<float*>(static_cast<char*>(t->data) + r * t->nb[1]) : y_.data() + size_t(r) * n_out;
    };
    // Adapter by adapter, all its rows at once: each row of A and of B^T is read once
    // per product, not once per request. Checked first: nothing may throw in the team.
    std::vector<Work>& work = work_;
    work.clear();
    size_t n_ax = 0;
    for (const Uses& u : uses_) {
        const HostLoraWeight* w = u.lora->find(weight);
        const std::vector<RowUse>& use = outputs ? u.outputs : u.tokens;
        if (!w || use.empty()) continue;
        if (w->n_in != n_in || w->n_out != n_out) {
            error_ = std::string("per-row LoRA: ") + weight + " is " + std::to_string(n_in) + " -> " + std::to_string(n_out) +
                     " in the model and " + std::to_string(w->n_in) + " -> " + std::to_string(w->n_out) + " in the adapter";
            return;
        }
        work.push_back({w, &use, u.lora, n_ax});
        n_ax += use.size() * size_t(w->rank);
    }
    ax_.resize(n_ax);
    // On llama.cpp's own OpenMP team, idle between the graph's parts: the threads split
    // A's rows, then B^T's columns, so each reads only its share of the weights. Every
    // value is computed by one thread in one order: the thread count changes nothing.
    const int n_threads = std::max(1, threads_);
#if defined(_OPENMP)
#pragma omp parallel num_threads(n_threads) if (n_threads > 1)
#endif
    {
#if defined(_OPENMP)
        const int ith = omp_get_thread_num(), nth = omp_get_num_threads();
#else
        const int ith = 0, nth = 1;
#endif
        for (const Work& wk : work) {
            const int rank = wk.w->rank;
            for (int k = ith; k < rank; k += nth) {
                const float* a = wk.w->a.data() + size_t(k) * n_in;
                for (size_t i = 0; i < wk.use->size(); ++i) ax_[wk.ax + i * rank + k] = dot(a, x_row((*wk.use)[i].row), n_in);
            }
        }
#if defined(_OPENMP)
#pragma omp barrier
#endif
        // columns [o0, o1) of every product, in whole 16-float blocks
        const int blocks = (n_out + 15) / 16;
        const int o0 = std::min(n_out, 16 * (blocks * ith / nth)), o1 = std::min(n_out, 16 * (blocks * (ith + 1) / nth));
        if (o1 > o0)
            for (const Work& wk : work) {
                const int rank = wk.w->rank;
                for (int k = 0; k < rank; ++k) {
                    const float* b = wk.w->b_t.data() + size_t(k) * n_out;
                    for (size_t i = 0; i < wk.use->size(); ++i) {
                        const RowUse& ru = (*wk.use)[i];
                        axpy(wk.lora->scale_for(*wk.w, ru.scale) * ax_[wk.ax + i * rank + k], b + o0, y_row(ru.row) + o0, o1 - o0);
                    }
                }
            }
    }
    if (!host_y)
        for (int64_t r = 0; r < rows; ++r)
            ggml_backend_tensor_set(t, y_.data() + r * n_out, size_t(r * t->nb[1]), size_t(n_out) * sizeof(float));
    apply_ms_ += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace mtllm
