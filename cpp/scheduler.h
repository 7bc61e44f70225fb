// Owns the requests between submit and finish: the waiting queue, the running set,
// admission and preemption, and what each llama_decode computes. The engine feeds
// it submitted requests, executes the plan it returns and reports back; it runs on
// the engine's scheduler thread only and reaches llama.cpp only through the
// KvCacheManager.
//
// Every running request has tokens known (prompt + generated) and tokens computed
// (in the KV cache); a step gives each request of one group a slice of its
// uncomputed tokens, decode tokens first so streaming stays smooth, then prompt
// chunks up to the batch budget. One rule covers prefill, decode, chunked prompts
// and prefix hits. A group (Request::group) is the base model together with every
// request whose adapters the engine applies per row (row_lora.h), or one adapter set
// that llama.cpp applies to the whole context; groups with work take turns.
#pragma once
#include <deque>
#include <memory>
#include <string>
#include <vector>

#include "kv_cache_manager.h"
#include "request.h"

namespace mtllm {

struct ScheduledSlice {
    Request* request;
    int start;      // first token index (== request->n_computed)
    int n_tokens;
    bool sample;    // slice ends at the last known token: sample the next one
};

// One step's work: plain data, valid until the scheduler is next called.
struct StepPlan {
    std::string adapter_key;  // the group served: "" = base and per-row adapters
    AdapterSet adapters;      // the context's adapters for this step (empty for group "")
    std::vector<ScheduledSlice> slices;
    int n_tokens = 0;
    bool empty() const { return slices.empty(); }
};

// What relieve_kv_pressure() did to make room.
enum class KvRelief { kEvicted, kPreempted, kNone };

class Scheduler {
public:
    // kv outlives the scheduler. token_budget: tokens per step (llama.cpp's n_batch);
    // max_running: requests decoding together.
    Scheduler(int token_budget, int max_running, KvCacheManager& kv);

    // A submitted request joins the back of the waiting queue.
    void add(std::shared_ptr<Request> r);

    // Moves waiting requests, in order, to running while fewer than max_running run,
    // the KV cache has a sequence for them and no preemption happened since a request
    // last finished (the kv_pressure rule). Returns those admitted, for the engine to
    // prepare (a sampler on first admission); one it cannot prepare it finishes.
    std::vector<std::shared_ptr<Request>> admit();

    // What the next llama_decode computes: slices of the running requests of one group.
    StepPlan schedule();

    // The engine decoded a slice: its tokens' KV is in the cache now.
    void on_computed(const ScheduledSlice& s);

    // llama_decode found no KV slot: frees the least recently used idle prefix cache,
    // else preempts the most recently admitted request (to the front of the waiting
    // queue; it recomputes later, keeping what it generated). kNone when neither is
    // possible (a single running request that does not fit).
    KvRelief relieve_kv_pressure();

    // A request ended (the engine finished it): its sequence keeps its KV as cache
    // (keep_cache) or forgets it. Its cells are free, so admission may resume.
    void release(Request* r, bool keep_cache);

    // Drops released requests from the running set.
    void remove_finished();

    // Waiting requests whose caller cancelled, taken out of the queue.
    std::vector<std::shared_ptr<Request>> take_cancelled_waiting();
    // The running requests, taken out (the engine fails them after a faulty step).
    std::vector<std::shared_ptr<Request>> take_running();
    // Every request, running first (close, fatal errors).
    std::vector<std::shared_ptr<Request>> take_all();

    const std::vector<std::shared_ptr<Request>>& running() const { return running_; }
    const std::deque<std::shared_ptr<Request>>& waiting() const { return waiting_; }
    size_t n_waiting() const { return waiting_.size(); }
    bool idle() const { return waiting_.empty() && running_.empty(); }
    bool kv_pressure() const { return kv_pressure_; }
    int budget() const { return budget_; }

private:
    const int budget_;
    const int max_running_;
    KvCacheManager& kv_;
    std::deque<std::shared_ptr<Request>> waiting_;
    std::vector<std::shared_ptr<Request>> running_;  // in admission order
    // Set by a preemption, cleared when a request releases its sequence: while set
    // nothing is admitted, so a preempted request cannot be re-admitted into the same
    // full cache step after step (a livelock in which no request ever finished).
    bool kv_pressure_ = false;
    std::string last_key_;  // adapter group served last (round-robin)
    bool served_any_ = false;
};

}  // namespace mtllm
