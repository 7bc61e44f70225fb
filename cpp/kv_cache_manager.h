// What each llama.cpp sequence's KV cells hold, and which of them a new request can
// start from. Finished requests leave their KV behind as cache; a new request whose
// prompt shares a prefix with any sequence (running or idle) under the same adapter
// key starts from that prefix: in place if the sequence is idle, by llama.cpp's
// cell-sharing `seq_cp` (no new KV) if it is running. Idle caches are evicted LRU.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "llama.h"

namespace mtllm {

struct SlotPlan {
    int seq = -1;
    int n_reuse = 0;  // leading prompt tokens whose KV is already in `seq`
};

class KvCacheManager {
public:
    KvCacheManager(llama_memory_t mem, int n_seq, bool prefix_reuse);

    // Picks a sequence for `tokens` and prepares its KV; false when every sequence
    // is busy. Never reuses all of `tokens`: the last one must be decoded for logits.
    bool acquire(const std::vector<llama_token>& tokens, const std::string& key, bool allow_reuse, SlotPlan* plan);
    void on_computed(int seq, const llama_token* tokens, int n);
    void release(int seq);   // request finished: keep its KV as cache
    void drop(int seq);      // forget the KV (preemption, errors)
    bool evict_one();        // frees the least recently used idle cache; false if none
    void clear_all();        // drop every idle cache (e.g. after an adapter is unloaded)

    int n_seq() const { return int(seqs_.size()); }
    int64_t reused_tokens() const { return reused_tokens_; }
    int cached_sequences() const;

private:
    struct Seq {
        bool busy = false;
        std::vector<llama_token> tokens;  // tokens whose KV this sequence holds
        std::string key;
        uint64_t last_use = 0;
    };
    llama_memory_t mem_;
    std::vector<Seq> seqs_;
    bool prefix_reuse_;
    uint64_t clock_ = 0;
    int64_t reused_tokens_ = 0;
};

}  // namespace mtllm
