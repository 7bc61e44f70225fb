#include "scheduler.h"

#include <algorithm>
#include <set>
#include <utility>

namespace mtllm {

Scheduler::Scheduler(int token_budget, int max_running, KvCacheManager& kv)
    : budget_(token_budget), max_running_(max_running), kv_(kv) {}

void Scheduler::add(std::shared_ptr<Request> r) { waiting_.push_back(std::move(r)); }

std::vector<std::shared_ptr<Request>> Scheduler::admit() {
    std::vector<std::shared_ptr<Request>> admitted;
    if (running_.empty()) kv_pressure_ = false;
    while (!waiting_.empty() && int(running_.size()) < max_running_ && !kv_pressure_) {
        Request* r = waiting_.front().get();
        SlotPlan slot;
        // logits_all wants every prompt position's logits, so it cannot start from a cached prefix.
        if (!kv_.acquire(r->tokens, r->key, !r->params.logits_all, &slot)) break;
        r->seq = slot.seq;
        r->n_computed = slot.n_reuse;
        running_.push_back(std::move(waiting_.front()));
        waiting_.pop_front();
        admitted.push_back(running_.back());
    }
    return admitted;
}

StepPlan Scheduler::schedule() {
    StepPlan plan;
    std::set<std::string> keys;
    for (const auto& r : running_)
        if (r->n_computed < int(r->tokens.size())) keys.insert(r->group);
    if (keys.empty()) return plan;

    // Round-robin over groups: the first key after the one served last.
    auto it = served_any_ ? keys.upper_bound(last_key_) : keys.begin();
    if (it == keys.end()) it = keys.begin();
    plan.adapter_key = *it;
    last_key_ = *it;
    served_any_ = true;

    int budget = budget_;
    // Decode slices: one token for each request that is generating.
    for (const auto& r : running_) {
        if (r->group != plan.adapter_key || budget == 0) continue;
        int remaining = int(r->tokens.size()) - r->n_computed;
        if (remaining == 1) {
            plan.slices.push_back({r.get(), r->n_computed, 1, true});
            --budget;
        }
    }
    // Prompt slices, in admission order, as far as the budget goes.
    for (const auto& r : running_) {
        if (r->group != plan.adapter_key || budget == 0) continue;
        int remaining = int(r->tokens.size()) - r->n_computed;
        if (remaining <= 1) continue;
        int n = std::min(remaining, budget);
        plan.slices.push_back({r.get(), r->n_computed, n, n == remaining});
        budget -= n;
    }
    // A group other than "" is one adapter set, which the engine sets on the context.
    if (!plan.adapter_key.empty() && !plan.slices.empty()) plan.adapters = plan.slices.front().request->adapters;
    plan.n_tokens = budget_ - budget;
    return plan;
}

void Scheduler::on_computed(const ScheduledSlice& s) {
    Request* r = s.request;
    kv_.on_computed(r->seq, r->tokens.data() + s.start, s.n_tokens);
    r->n_computed += s.n_tokens;
}

KvRelief Scheduler::relieve_kv_pressure() {
    if (kv_.evict_one()) return KvRelief::kEvicted;
    if (running_.size() < 2) return KvRelief::kNone;
    std::shared_ptr<Request> victim = std::move(running_.back());
    running_.pop_back();
    kv_.drop(victim->seq);
    victim->seq = -1;
    victim->n_computed = 0;
    {
        std::lock_guard<std::mutex> lock(victim->mu);  // the caller may be reading them
        victim->stats.preemptions++;
        victim->logits.clear();  // recomputed from the first prompt token
    }
    waiting_.push_front(std::move(victim));
    kv_pressure_ = true;
    return KvRelief::kPreempted;
}

void Scheduler::release(Request* r, bool keep_cache) {
    if (r->seq < 0) return;
    if (keep_cache) kv_.release(r->seq);
    else kv_.drop(r->seq);
    r->seq = -1;
    kv_pressure_ = false;
}

void Scheduler::remove_finished() {
    running_.erase(std::remove_if(running_.begin(), running_.end(), [](const auto& r) { return r->seq < 0; }),
                   running_.end());
}

std::vector<std::shared_ptr<Request>> Scheduler::take_cancelled_waiting() {
    std::vector<std::shared_ptr<Request>> out;
    for (auto it = waiting_.begin(); it != waiting_.end();) {
        if ((*it)->cancel_requested) {
            out.push_back(std::move(*it));
            it = waiting_.erase(it);
        } else {
            ++it;
        }
    }
    return out;
}

std::vector<std::shared_ptr<Request>> Scheduler::take_running() {
    std::vector<std::shared_ptr<Request>> out;
    out.swap(running_);
    kv_pressure_ = false;
    return out;
}

std::vector<std::shared_ptr<Request>> Scheduler::take_all() {
    std::vector<std::shared_ptr<Request>> out = take_running();
    for (auto& r : waiting_) out.push_back(std::move(r));
    waiting_.clear();
    return out;
}

}  // namespace mtllm
