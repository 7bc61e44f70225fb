// The serving loop: one llama_context, one scheduler thread. Callers submit
// requests from any thread and read their output from the request's mailbox; the
// thread runs  schedule -> execute (llama_decode) -> update (sample, stream)  until
// closed. The Scheduler owns the queues, admission and preemption and returns each
// step's plan; the Engine executes it and reports back.
// Threads: the context is created and freed by the thread that constructs and
// destroys the Engine, before the scheduler thread starts and after it ends; in
// between only the scheduler thread calls llama.cpp with it, and adapter loads run
// there too (queued tasks), because llama.cpp reads the model's adapter list while
// it builds a decode graph. Callers' threads use only the immutable model
// (tokenize, vocabulary) and compile grammars.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "big_stack_thread.h"
#include "kv_cache_manager.h"
#include "model.h"
#include "request.h"
#include "row_lora.h"
#include "scheduler.h"

namespace mtllm {

// Limits checked at submit, so that nothing a caller passes can abort the scheduler
// thread. Python reads the same values (_engine.limits) and checks them first.
constexpr size_t kMaxStops = 64;                    // stop strings per request
constexpr size_t kMaxStopBytes = 1024;              // bytes per stop string
constexpr size_t kMaxGrammarBytes = size_t(1) << 20;  // schema / grammar text
constexpr float kMaxAdapterScale = 100.0f;          // |scale| of one adapter
constexpr size_t kMaxLogitsFloats = size_t(1) << 28;  // logits_all buffer: 1 GiB

struct EngineParams {
    int n_ctx = 0;             // KV cells shared by all sequences = longest request; 0 = min(train ctx, 8192)
    int n_batch = 512;         // tokens per llama_decode: bounds a step's latency
    int max_running = 16;      // sequences decoding together; more wait in the queue
    int cache_sequences = 16;  // extra sequences kept only to hold reusable prefixes
    int max_queued = 1024;     // waiting requests beyond this are refused (OverloadedError)
    int n_threads = 0;         // 0 = all cores
    bool prefix_reuse = true;  // the KV is always one unified buffer: shared prefixes cost no copy
    bool kv_f32 = false;       // float32 KV cache: 2x memory, batching-invariant to ~1e-5
    int flash_attn = 0;        // -1 auto, 0 off (exact batching, see engine.py), 1 on
    // Adapters applied per batch row by the engine (row_lora.h), so requests under
    // different adapters share every decode. Off: llama.cpp applies one adapter set
    // per context and each set's requests get their own decodes (the GPU default).
    bool mixed_adapters = true;
};

struct EngineStats {
    uint64_t steps = 0;
    uint64_t tokens_decoded = 0;   // tokens passed through llama_decode
    uint64_t tokens_generated = 0;
    int64_t tokens_reused = 0;     // prompt tokens served from the prefix cache
    uint64_t preemptions = 0;
    uint64_t evictions = 0;
    uint64_t internal_errors = 0;  // C++ exceptions caught by the scheduler thread
    uint64_t requests_finished = 0;
    int running = 0;
    int waiting = 0;
    int cached_sequences = 0;
    double decode_ms = 0;
    uint64_t adapter_switches = 0;
    double adapter_switch_ms = 0;  // time in llama_set_adapters_lora
    uint64_t row_lora_steps = 0;   // decodes whose rows got LoRA terms from the engine (mixed_adapters)
    double row_lora_ms = 0;        // time adding those terms (inside decode_ms)
    uint64_t closing_searches = 0; // closing searches of finished constrained requests (Constraint::closing)
    uint64_t closing_checks = 0;   // tokens they validated
    double closing_ms = 0;         // time in them (at submit and on the scheduler thread)
    uint64_t closed_by_budget = 0; // requests whose value the engine closed
    uint64_t closed_by_loop = 0;
};

struct AdapterInfo {
    uint64_t id;
    std::string path;
};

class Engine {
public:
    Engine(std::shared_ptr<Model> model, const EngineParams& params);
    ~Engine();
    Engine(const Engine&) = delete;
    Engine& operator=(const Engine&) = delete;

    std::shared_ptr<Request> submit(std::vector<llama_token> prompt, const SamplingParams& params,
                                    const AdapterSet& adapters, bool notify,
                                    const std::string& constraint_kind = "", const std::string& constraint_data = "");
    // Where llguidance's shared library is (found by the Python layer); loaded on first use.
    void set_guidance_library(const std::string& path);
    void close();
    bool closed() const { return closed_.load(); }

    // Ids of requests (submitted with notify) that have new output; waits up to timeout_ms.
    std::vector<uint64_t> wait_ready(int timeout_ms);

    uint64_t load_adapter(const std::string& path);
    void unload_adapter(uint64_t id);
    std::vector<AdapterInfo> adapters() const;

    // Threads for the next decodes (0 = the engine's configured count). Applied by the
    // scheduler thread before its next llama_decode: ggml's workers spin, so an engine
    // sharing its cores with a training process must use fewer threads, not be preempted.
    void set_threads(int n) { wanted_threads_.store(n); }
    int threads() const { return applied_threads_.load(); }

    EngineStats stats() const;
    int n_ctx() const { return n_ctx_; }
    int n_seq_max() const { return n_seq_max_; }
    const std::shared_ptr<Model>& model() const { return model_; }

private:
    std::atomic<int> wanted_threads_{0};
    std::atomic<int> applied_threads_{0};
    int configured_threads_ = 1;
    void loop();
    bool step();  // one schedule -> execute -> update; false once closed
    void recover(const char* what);
    void fail_request(Request* r, const std::string& what);
    void start_admitted();
    int execute(const StepPlan& plan);
    void update(const StepPlan& plan);
    void publish_queue_depth();  // with mu_ held
    void sample_next(Request* r, int batch_index);
    // Constrained requests: the next sampled token, or (closing non-empty, or
    // closed_by set) the tokens that close the value instead. See engine.cpp.
    void next_constrained(Request* r, int batch_index, llama_token* tok, std::vector<llama_token>* closing,
                          std::string* closed_by);
    // Samples without accepting: the chain's choice with `banned` tokens excluded.
    llama_token sample_candidate(Request* r, int batch_index, const std::vector<llama_token>& banned);
    int room(const Request* r) const;  // tokens the request may still append
    void finish(Request* r, const std::string& reason, const std::string& err_kind = "", const std::string& err_msg = "");
    void deliver(Request* r, const std::string& text, const std::vector<llama_token>& tokens, bool done);
    void fail_all(const std::string& kind, const std::string& msg);
    void build_sampler(Request* r);

    std::shared_ptr<Model> model_;
    EngineParams params_;
    llama_context* ctx_ = nullptr;
    int n_ctx_ = 0;
    int n_seq_max_ = 0;
    std::unique_ptr<KvCacheManager> kv_;
    std::unique_ptr<Scheduler> scheduler_;  // scheduler thread only
    llama_batch batch_{};

    // submission queue (any thread) -> scheduler thread
    mutable std::mutex mu_;
    std::condition_variable cv_;
    std::deque<std::shared_ptr<Request>> incoming_;
    // Work that touches the model's adapter list (load) runs on the scheduler thread,
    // between decodes: llama.cpp reads that list while it builds a decode graph.
    std::deque<std::function<void()>> tasks_;
    // The scheduler's waiting queue as the scheduler thread last published it (never
    // counted by hand): submit refuses when incoming_ + this reaches max_queued.
    size_t queued_ = 0;
    std::atomic<bool> stop_{false};
    std::atomic<bool> closed_{false};
    std::string broken_;            // set after a fatal decode error
    uint64_t next_id_ = 1;

    // scheduler thread only
    std::string current_adapter_key_;  // adapter set on the context
    bool row_mode_ = false;            // params_.mixed_adapters: row_lora_ is the context's eval callback
    RowLora row_lora_;
    int failed_steps_ = 0;             // consecutive steps that ended in recover(); too many stop the engine
    bool busy_since_idle_ = false;     // served something since the engine was last idle
    std::vector<llama_token_data> candidates_;  // sample_candidate's buffer

    // adapters: loaded and freed by the scheduler thread (those left, by ~Engine after it
    // ends); the registry is under mu_
    struct LoadedAdapter {
        llama_adapter_lora* ptr;
        std::shared_ptr<const HostLora> host;  // for per-row application; null: per context only
        std::string path;
        int users = 0;              // running/waiting requests naming it
        bool unload_pending = false;
    };
    std::map<uint64_t, LoadedAdapter> adapters_;
    uint64_t next_adapter_id_ = 1;

    // notification of async waiters
    std::mutex ready_mu_;
    std::condition_variable ready_cv_;
    std::vector<uint64_t> ready_;

    std::mutex guidance_mu_;
    std::string guidance_path_;
    std::shared_ptr<GuidanceTokenizer> guidance_;

    mutable std::mutex stats_mu_;
    EngineStats stats_;

    BigStackThread worker_;  // llguidance computes masks recursively on this thread
};

}  // namespace mtllm
