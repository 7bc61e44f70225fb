// What each llama.cpp sequence's KV cells hold, and which of them a new request can
// start from. Finished requests leave their KV behind as cache; a new request whose
// prompt shares a prefix with any sequence (running or idle) under the same adapter
// key starts from that prefix: in place if the sequence is idle, by llama.cpp's
// cell-sharing `seq_cp` (no new KV) if it is running. Idle caches are evicted LRU.
// Models with sliding-window attention (Gemma 3: window 512) lose old cells of their
// window layers; a prefix is reused only where those layers still hold its window.
// The manager reaches llama.cpp's memory only through KvMemory, so that tests can
// run it against a fake that records every call.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llama.h"

namespace mtllm {

// The llama.cpp memory calls the manager makes (positions [p0, p1), -1 = open end).
class KvMemory {
public:
    virtual ~KvMemory() = default;
    // llama_memory_seq_rm: false when the memory cannot drop part of a sequence.
    virtual bool seq_rm(int seq, int p0, int p1) = 0;
    // llama_memory_seq_cp: `dst` shares `src`'s cells for [p0, p1); no KV is copied.
    virtual void seq_cp(int src, int dst, int p0, int p1) = 0;
    // llama_memory_seq_pos_min: the smallest position `seq` holds in every layer (-1: none).
    // Above 0 only where sliding-window layers dropped cells that had left their window.
    virtual int seq_pos_min(int seq) = 0;
};

class LlamaKvMemory final : public KvMemory {
public:
    explicit LlamaKvMemory(llama_memory_t mem) : mem_(mem) {}
    bool seq_rm(int seq, int p0, int p1) override { return llama_memory_seq_rm(mem_, seq, p0, p1); }
    void seq_cp(int src, int dst, int p0, int p1) override { llama_memory_seq_cp(mem_, src, dst, p0, p1); }
    int seq_pos_min(int seq) override { return llama_memory_seq_pos_min(mem_, seq); }

private:
    llama_memory_t mem_;
};

struct SlotPlan {
    int seq = -1;
    int n_reuse = 0;  // leading prompt tokens whose KV is already in `seq`
};

class KvCacheManager {
public:
    // n_swa: the model's attention window (llama_model_n_swa), 0 when every layer sees all.
    KvCacheManager(std::shared_ptr<KvMemory> mem, int n_seq, bool prefix_reuse, int n_swa = 0);

    // Picks a sequence for `tokens` and prepares its KV; false when every sequence
    // is busy. Never reuses all of `tokens`: the last one must be decoded for logits.
    bool acquire(const std::vector<llama_token>& tokens, const std::string& key, bool allow_reuse, SlotPlan* plan);
    void on_computed(int seq, const llama_token* tokens, int n);
    void release(int seq);   // request finished: keep its KV as cache
    void drop(int seq);      // forget the KV (preemption, errors)
    bool evict_one();        // frees the least recently used idle cache; false if none

    int n_seq() const { return int(seqs_.size()); }
    int64_t reused_tokens() const { return reused_tokens_; }
    int cached_sequences() const;

private:
    // Whether `seq` still holds the KV a request continuing after its first `len` tokens reads.
    bool window_holds(int seq, int len);

    struct Seq {
        bool busy = false;
        std::vector<llama_token> tokens;  // tokens whose KV this sequence holds
        std::string key;
        uint64_t last_use = 0;
    };
    std::shared_ptr<KvMemory> mem_;
    std::vector<Seq> seqs_;
    bool prefix_reuse_;
    int n_swa_;
    uint64_t clock_ = 0;
    int64_t reused_tokens_ = 0;
};

}  // namespace mtllm
