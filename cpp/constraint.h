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

private:
    std::shared_ptr<GuidanceApi> api_;
    std::shared_ptr<Model> model_;
    LlgTokenizer* tok_ = nullptr;
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

private:
    std::shared_ptr<GuidanceTokenizer> tok_;
    LlgMatcher* matcher_ = nullptr;
    std::vector<uint32_t> bits_;
};

// A llama_sampler that applies `c`; the chain owns the sampler, the request owns `c`.
llama_sampler* constraint_sampler(Constraint* c);

}  // namespace mtllm
