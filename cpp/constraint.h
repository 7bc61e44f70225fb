// Constrained decoding with llguidance (JSON schema, regex, Lark grammars), applied
// as a token mask inside each request's sampler chain on the scheduler thread.
//
// llguidance is a maintained Rust grammar engine; its PyPI wheel exports the C API
// (llg_*) from its extension module, which we dlopen at runtime — no Python runs on
// the decode path. Why llguidance over llama.cpp's GBNF sampler: it compiles JSON
// schemas itself (llama.cpp's converter is not in its C library) and computes a mask
// over a 49k vocabulary in tens of microseconds (`bench adapters` measures both).
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "llama.h"

namespace mtllm {

class Model;
struct GuidanceApi;   // resolved llg_* symbols
struct LlgTokenizer;  // opaque (llguidance)
struct LlgMatcher;    // opaque (llguidance)

// One per model: llguidance's view of the vocabulary. Thread-safe after creation.
class GuidanceTokenizer {
public:
    GuidanceTokenizer(const std::string& library_path, std::shared_ptr<Model> model);
    ~GuidanceTokenizer();
    const GuidanceApi& api() const { return *api_; }
    LlgTokenizer* get() const { return tok_; }
    const Model& model() const { return *model_; }
    // The token whose text is exactly this one byte, or -1 (byte-level BPE and
    // SentencePiece byte fallback have one for every byte).
    llama_token byte_token(unsigned char b) const { return byte_tokens_[b]; }
    // For the loop guard: 1 = the token's text is ASCII digits only, 2 = it has a
    // letter, 0 = other (punctuation, spaces, control).
    uint8_t token_kind(llama_token t) const { return t >= 0 && size_t(t) < kinds_.size() ? kinds_[size_t(t)] : 0; }

private:
    std::shared_ptr<GuidanceApi> api_;
    std::shared_ptr<Model> model_;
    LlgTokenizer* tok_ = nullptr;
    llama_token byte_tokens_[256];
    std::vector<uint8_t> kinds_;
};

// Bounds of the closing search (Constraint::closing): the longest completion it
// looks for, and the grammar checks (one token validated) it may spend. Both keep
// it finite whatever the grammar: past them, no completion is "found".
constexpr int kMaxClosingTokens = 4096;
constexpr int kMaxClosingChecks = 200000;

// A way to complete the grammar from some state.
struct Closing {
    enum Status { kFound, kTooLong, kNone } status = kNone;
    std::vector<llama_token> tokens;  // kFound: consumed in order, they make the grammar accept
    int checks = 0;                    // tokens validated on the way (the search's cost)
};

// One per request: the grammar state. Created in the caller's thread (so a bad
// schema fails at submit), then used by the scheduler thread only.
class Constraint {
public:
    // kind: "json_schema" | "json_object" | "regex" | "lark"; throws InvalidRequestError.
    Constraint(std::shared_ptr<GuidanceTokenizer> tok, const std::string& kind, const std::string& data);
    ~Constraint();
    void mask(llama_token_data_array* cur);  // disallowed tokens get -inf
    bool accept(llama_token token);          // false: the grammar rejected it (engine bug)
    bool finished() const;                   // only end-of-sequence can follow
    // Tokens the grammar forces next (e.g. the rest of `{"name":`): consumed here, so
    // the engine appends them without sampling and computes them in one step.
    std::vector<llama_token> take_forced();
    const char* error() const;
    const GuidanceTokenizer* tokenizer() const { return tok_.get(); }
    bool accepting() const;                  // the grammar could end here

    // A short completion from the current state, found on a copy of the grammar
    // state (this one is untouched): forced tokens are taken as they come, else
    // single-byte tokens in an order that closes first (`"` `}` `]`, then the
    // shortest values, then fillers), backtracking on dead ends; at most `limit`
    // tokens (kTooLong past it) and kMaxClosingChecks checks. Every token is
    // validated by the grammar, so a found completion is exact; its length is an
    // upper bound on the true minimum (multi-byte tokens could be shorter).
    Closing closing(int limit) const;
    // What taking `t` costs: 1 + the tokens the grammar then forces + the closing
    // length after them, if that is at most `limit`; -1 if t is not allowed or the
    // closing does not fit.
    int cost_with(llama_token t, int limit) const;
    // Consumes tokens (a closing) into the real state; false if the grammar refused one.
    bool force(const std::vector<llama_token>& tokens);

    // Budget-aware closing and the loop guard, per request (scheduler thread):
    int close_len = -1;      // closing length at the last check; -1 = not computed
    int since_check = 0;     // tokens appended since then
    bool steered = false;    // a sampled token was refused because its closing would not fit
    int loop_period = 0;     // > 0: a repetition loop was seen with this period
    int loop_steps = 0;      // tokens since it was seen
    int loop_best = -1;      // the shortest closing seen over the first period after it
    // What the closing searches cost this request (EngineStats adds them up).
    mutable uint64_t searches = 0, search_checks = 0;
    mutable double search_ms = 0;

private:
    Closing search(LlgMatcher* m, int limit) const;
    std::shared_ptr<GuidanceTokenizer> tok_;
    LlgMatcher* matcher_ = nullptr;
    std::vector<uint32_t> bits_;
};

// The loop guard's test: do the last generated tokens repeat one item? Exact
// repeats: at least 3 copies and 12 tokens; repeats where runs of digits may differ
// (items "item1", "item2", ...): at least 4 copies and 24 tokens. Either way the
// item must contain a word (a token with a letter): a list of numbers is never a
// loop. Returns the period, or 0.
int repetition_period(const GuidanceTokenizer& tok, const llama_token* generated, int n);

// A llama_sampler that applies `c`; the chain owns the sampler, the request owns `c`.
llama_sampler* constraint_sampler(Constraint* c);

}  // namespace mtllm
