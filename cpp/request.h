// One generation request: what the caller asked for (immutable), the scheduler's
// progress on it (scheduler thread only), and the output mailbox the caller reads
// (under `mu`). The caller holds a shared_ptr, so a request outlives its scheduling.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "constraint.h"
#include "llama.h"
#include "row_lora.h"
#include "text_stream.h"

namespace mtllm {

struct SamplingParams {
    int max_tokens = 256;
    float temperature = 0.0f;  // 0 = greedy: typed calls want deterministic output
    float top_p = 1.0f;
    int top_k = 0;             // 0 = disabled
    float min_p = 0.0f;
    float repeat_penalty = 1.0f;
    int repeat_last_n = 64;
    uint32_t seed = LLAMA_DEFAULT_SEED;  // default = random
    std::vector<std::string> stop;
    bool ignore_eos = false;
    bool logits_all = false;  // return logits of every prompt position (tests, scoring)
    // Constrained output only: end a repetition loop (one item repeated) by closing
    // the value early. Off by default: some outputs repeat legitimately.
    bool loop_guard = false;
    // Constrained output only: steer the value to close within max_tokens and the
    // context (budget-aware closing). Off: the old behaviour, a valid prefix only.
    bool close_at_budget = true;
};

// The adapters a request runs under: (adapter id, scale), sorted by id. Adapter ids
// are never reused, so this key also identifies the KV a prefix was computed with.
using AdapterSet = std::vector<std::pair<uint64_t, float>>;
std::string adapter_key(const AdapterSet& set);

struct RequestStats {
    int prompt_tokens = 0;
    int cached_tokens = 0;      // prompt tokens whose KV came from the prefix cache
    int completion_tokens = 0;
    int preemptions = 0;
    double queue_ms = 0;        // submit -> admitted
    double ttft_ms = 0;         // submit -> first token
    double total_ms = 0;        // submit -> finished
};

struct Chunk {
    std::string text;
    std::vector<llama_token> tokens;
    bool done = false;
};

struct Request {
    // --- immutable after submit ---
    uint64_t id = 0;
    std::vector<llama_token> prompt;
    SamplingParams params;
    AdapterSet adapters;
    std::string key;                // adapter_key(adapters)
    // Requests of one group share a decode: "" for the base model and for every request
    // whose adapters the engine applies per row (host_adapters); else the key, and the
    // group's adapters are set on the context (llama.cpp applies them to every row).
    std::string group;
    HostAdapterSet host_adapters;
    bool notify_engine = false;     // report in Engine::wait_ready (asyncio pump)
    std::unique_ptr<Constraint> constraint;  // grammar the output must follow, if any
    int64_t t_submit_us = 0;

    // --- scheduler thread only ---
    std::vector<llama_token> tokens;  // known tokens: prompt + generated
    int n_computed = 0;               // tokens whose KV is in the cache
    int seq = -1;                     // llama.cpp sequence id while running
    int n_generated = 0;
    llama_sampler* sampler = nullptr;
    std::unique_ptr<TextStream> stream;
    int64_t t_admit_us = 0;
    bool admitted_once = false;

    // --- shared with the caller, under mu ---
    std::mutex mu;
    std::condition_variable cv;
    std::string out_text;
    std::vector<llama_token> out_tokens;
    bool done = false;
    std::string finish_reason;       // "stop", "length", "cancelled", "error"
    std::string closed_by;           // "" (the model ended it), "budget" or "loop": the engine closed the value
    std::string error_kind, error_message;
    RequestStats stats;
    std::vector<float> logits;       // logits_all: prompt_tokens x n_vocab, whole rows only
    int n_vocab = 0;                 // width of a logits row
    std::atomic<bool> cancel_requested{false};

    ~Request() {
        if (sampler) llama_sampler_free(sampler);
    }

    // Caller side: waits up to timeout_ms (<0: forever) for output; takes it.
    Chunk take(int timeout_ms);
};

}  // namespace mtllm
