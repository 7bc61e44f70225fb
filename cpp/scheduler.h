// Decides what one llama_decode call computes. Every running request has tokens
// known (prompt + generated) and tokens computed (in the KV cache); a step gives
// each request of one adapter group a slice of its uncomputed tokens, decode
// tokens first so streaming stays smooth, then prompt chunks up to the batch
// budget. One rule covers prefill, decode, chunked prompts and prefix hits.
// LoRA adapters are per context, so a step serves one adapter group; groups with
// work take turns.
#pragma once
#include <string>
#include <vector>

#include "request.h"

namespace mtllm {

struct ScheduledSlice {
    Request* request;
    int start;      // first token index (== request->n_computed)
    int n_tokens;
    bool sample;    // slice ends at the last known token: sample the next one
};

struct StepPlan {
    std::string adapter_key;
    AdapterSet adapters;
    std::vector<ScheduledSlice> slices;
    int n_tokens = 0;
    bool empty() const { return slices.empty(); }
};

class Scheduler {
public:
    explicit Scheduler(int token_budget) : budget_(token_budget) {}
    StepPlan schedule(const std::vector<Request*>& running);
    void set_budget(int b) { budget_ = b; }
    int budget() const { return budget_; }

private:
    int budget_;
    std::string last_key_;
    bool served_any_ = false;
};

}  // namespace mtllm
