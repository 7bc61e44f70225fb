#include "kv_cache_manager.h"

#include <algorithm>
#include <utility>

namespace mtllm {

namespace {
int common_prefix(const std::vector<llama_token>& a, const std::vector<llama_token>& b) {
    size_t n = a.size() < b.size() ? a.size() : b.size();
    size_t i = 0;
    while (i < n && a[i] == b[i]) ++i;
    return int(i);
}
}  // namespace

KvCacheManager::KvCacheManager(std::shared_ptr<KvMemory> mem, int n_seq, bool prefix_reuse, int n_swa)
    : mem_(std::move(mem)), seqs_(size_t(n_seq)), prefix_reuse_(prefix_reuse), n_swa_(n_swa) {}

// A sliding-window layer keeps a cell only while it is inside the window of its sequence's
// newest position: llama.cpp's slot search takes cells that left the window as free (even
// with swa_full, which only sizes that cache like the others), so an idle cache loses its
// oldest window-layer cells whenever another request needs room. The token at position
// `len` attends to positions (len - n_swa, len); llama.cpp guarantees every position from
// seq_pos_min to the newest is present, so the prefix is usable iff seq_pos_min is at most
// the first of those. Reusing it anyway would silently drop context: the output differed
// from a fresh engine's (tests/test_gemma3.py).
bool KvCacheManager::window_holds(int seq, int len) {
    if (n_swa_ <= 0) return true;
    const int pos_min = mem_->seq_pos_min(seq);
    return pos_min >= 0 && pos_min <= std::max(0, len - n_swa_ + 1);
}

bool KvCacheManager::acquire(const std::vector<llama_token>& tokens, const std::string& key, bool allow_reuse,
                             SlotPlan* plan) {
    const int limit = int(tokens.size()) - 1;
    int best = -1, best_len = 0;
    if (prefix_reuse_ && allow_reuse && limit > 0) {
        for (int s = 0; s < n_seq(); ++s) {
            const Seq& q = seqs_[size_t(s)];
            if (q.key != key || q.tokens.empty()) continue;
            int len = common_prefix(q.tokens, tokens);
            if (len > limit) len = limit;
            if (len > 0 && !window_holds(s, len)) continue;  // a shorter prefix would need older cells still
            // Prefer an idle source on ties: it can be taken over in place.
            if (len > best_len || (len == best_len && len > 0 && best >= 0 && seqs_[size_t(best)].busy && !q.busy)) {
                best = s;
                best_len = len;
            }
        }
    }
    ++clock_;
    // Take an idle source over in place only when that loses none of its cache;
    // otherwise share its prefix into another sequence (seq_cp shares cells, so it
    // costs no KV) and keep the source for the next request of its kind.
    auto take_in_place = [&](int s, int len) {
        Seq& q = seqs_[size_t(s)];
        if (!mem_->seq_rm(s, len, -1)) return false;
        q.busy = true;
        q.tokens.resize(size_t(len));
        q.last_use = clock_;
        plan->seq = s;
        plan->n_reuse = len;
        reused_tokens_ += len;
        return true;
    };
    if (best >= 0 && !seqs_[size_t(best)].busy && int(seqs_[size_t(best)].tokens.size()) <= best_len &&
        take_in_place(best, best_len))
        return true;
    // Take a free sequence: an empty one first, else the least recently used cache.
    int pick = -1;
    for (int s = 0; s < n_seq(); ++s) {
        const Seq& q = seqs_[size_t(s)];
        if (q.busy || s == best) continue;
        if (pick < 0) { pick = s; continue; }
        const Seq& p = seqs_[size_t(pick)];
        bool better = (q.tokens.empty() && !p.tokens.empty()) ||
                      (q.tokens.empty() == p.tokens.empty() && q.last_use < p.last_use);
        if (better) pick = s;
    }
    if (pick < 0) {
        // No other sequence is free: reuse the idle source itself, losing its tail.
        return best >= 0 && !seqs_[size_t(best)].busy && take_in_place(best, best_len);
    }
    Seq& q = seqs_[size_t(pick)];
    mem_->seq_rm(pick, -1, -1);
    q.tokens.clear();
    q.busy = true;
    q.key = key;
    q.last_use = clock_;
    int n_reuse = 0;
    if (best >= 0 && best_len > 0) {
        // Shares the source's cells for positions [0, best_len): no KV is copied.
        mem_->seq_cp(best, pick, 0, best_len);
        q.tokens.assign(tokens.begin(), tokens.begin() + best_len);
        n_reuse = best_len;
        reused_tokens_ += best_len;
    }
    plan->seq = pick;
    plan->n_reuse = n_reuse;
    return true;
}

void KvCacheManager::on_computed(int seq, const llama_token* tokens, int n) {
    Seq& q = seqs_[size_t(seq)];
    q.tokens.insert(q.tokens.end(), tokens, tokens + n);
}

void KvCacheManager::release(int seq) {
    Seq& q = seqs_[size_t(seq)];
    q.busy = false;
    q.last_use = ++clock_;
    if (!prefix_reuse_) drop(seq);
}

void KvCacheManager::drop(int seq) {
    Seq& q = seqs_[size_t(seq)];
    mem_->seq_rm(seq, -1, -1);
    q.tokens.clear();
    q.busy = false;
}

bool KvCacheManager::evict_one() {
    int victim = -1;
    for (int s = 0; s < n_seq(); ++s) {
        const Seq& q = seqs_[size_t(s)];
        if (q.busy || q.tokens.empty()) continue;
        if (victim < 0 || q.last_use < seqs_[size_t(victim)].last_use) victim = s;
    }
    if (victim < 0) return false;
    drop(victim);
    return true;
}

int KvCacheManager::cached_sequences() const {
    int n = 0;
    for (const auto& q : seqs_) n += (!q.busy && !q.tokens.empty()) ? 1 : 0;
    return n;
}

}  // namespace mtllm
