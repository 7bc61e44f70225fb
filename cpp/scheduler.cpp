#include "scheduler.h"

#include <algorithm>
#include <set>

namespace mtllm {

StepPlan Scheduler::schedule(const std::vector<Request*>& running) {
    StepPlan plan;
    std::set<std::string> keys;
    for (Request* r : running)
        if (r->n_computed < int(r->tokens.size())) keys.insert(r->key);
    if (keys.empty()) return plan;

    // Round-robin over adapter groups: the first key after the one served last.
    auto it = served_any_ ? keys.upper_bound(last_key_) : keys.begin();
    if (it == keys.end()) it = keys.begin();
    plan.adapter_key = *it;
    last_key_ = *it;
    served_any_ = true;

    int budget = budget_;
    // Decode slices: one token for each request that is generating.
    for (Request* r : running) {
        if (r->key != plan.adapter_key || budget == 0) continue;
        int remaining = int(r->tokens.size()) - r->n_computed;
        if (remaining == 1) {
            plan.slices.push_back({r, r->n_computed, 1, true});
            plan.adapters = r->adapters;
            --budget;
        }
    }
    // Prompt slices, in admission order, as far as the budget goes.
    for (Request* r : running) {
        if (r->key != plan.adapter_key || budget == 0) continue;
        int remaining = int(r->tokens.size()) - r->n_computed;
        if (remaining <= 1) continue;
        int n = std::min(remaining, budget);
        plan.slices.push_back({r, r->n_computed, n, n == remaining});
        plan.adapters = r->adapters;
        budget -= n;
    }
    plan.n_tokens = budget_ - budget;
    return plan;
}

}  // namespace mtllm
