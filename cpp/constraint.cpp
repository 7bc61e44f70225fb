#include "constraint.h"

#include <dlfcn.h>

#include <cmath>
#include <cstring>
#include <mutex>

#include "errors.h"
#include "model.h"

namespace mtllm {

// The subset of llguidance.h (C API, stable since llguidance 0.7) we call. Structs are
// over-allocated where the library fills them, so a newer library with appended
// fields cannot write past them.
extern "C" {
typedef uint32_t LlgToken;
typedef size_t (*LlgTokenizeFn)(const void*, const uint8_t*, size_t, uint32_t*, size_t);
struct LlgTokenizerInit {
    uint32_t vocab_size;
    LlgToken tok_eos;
    const uint32_t* token_lens;
    const uint8_t* token_bytes;
    const char* tokenizer_json;
    bool tokenize_assumes_string;
    LlgTokenizeFn tokenize_fn;
    bool use_approximate_greedy_tokenize_fn;
    const void* tokenize_user_data;
    const char* const* slices;
};
struct LlgConstraintInitHead {  // leading fields of LlgConstraintInit
    const LlgTokenizer* tokenizer;
    uint32_t log_buffer_level;
    uint32_t log_stderr_level;
};
}

struct GuidanceApi {
    void* handle = nullptr;
    LlgTokenizer* (*new_tokenizer)(const LlgTokenizerInit*, char*, size_t);
    void (*free_tokenizer)(LlgTokenizer*);
    void (*constraint_init_set_defaults)(void*, const LlgTokenizer*);
    LlgMatcher* (*new_matcher)(const void*, const char*, const char*);
    const char* (*matcher_get_error)(LlgMatcher*);
    size_t (*matcher_get_mask_byte_size)(LlgMatcher*);
    int32_t (*matcher_compute_mask_into)(LlgMatcher*, uint32_t*, size_t);
    int32_t (*matcher_consume_token)(LlgMatcher*, uint32_t);
    bool (*matcher_is_stopped)(const LlgMatcher*);
    int32_t (*matcher_compute_ff_tokens)(LlgMatcher*, uint32_t*, size_t);
    void (*free_matcher)(LlgMatcher*);
};

namespace {

template <typename F>
void resolve(void* h, const char* name, F* out) {
    void* sym = dlsym(h, name);
    if (!sym) throw InvalidRequestError(std::string("llguidance library lacks ") + name + " (version too old?)");
    *out = reinterpret_cast<F>(sym);
}

std::shared_ptr<GuidanceApi> load_api(const std::string& path) {
    static std::mutex mu;
    static std::shared_ptr<GuidanceApi> cached;
    static std::string cached_path;
    std::lock_guard<std::mutex> lock(mu);
    if (cached && cached_path == path) return cached;
    void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!h) throw InvalidRequestError("cannot load llguidance from '" + path + "': " + dlerror());
    auto api = std::make_shared<GuidanceApi>();
    api->handle = h;  // never dlclose'd: matchers may outlive any one engine
    resolve(h, "llg_new_tokenizer", &api->new_tokenizer);
    resolve(h, "llg_free_tokenizer", &api->free_tokenizer);
    resolve(h, "llg_constraint_init_set_defaults", &api->constraint_init_set_defaults);
    resolve(h, "llg_new_matcher", &api->new_matcher);
    resolve(h, "llg_matcher_get_error", &api->matcher_get_error);
    resolve(h, "llg_matcher_get_mask_byte_size", &api->matcher_get_mask_byte_size);
    resolve(h, "llg_matcher_compute_mask_into", &api->matcher_compute_mask_into);
    resolve(h, "llg_matcher_consume_token", &api->matcher_consume_token);
    resolve(h, "llg_matcher_is_stopped", &api->matcher_is_stopped);
    resolve(h, "llg_matcher_compute_ff_tokens", &api->matcher_compute_ff_tokens);
    resolve(h, "llg_free_matcher", &api->free_matcher);
    cached = api;
    cached_path = path;
    return api;
}

size_t tokenize_cb(const void* user, const uint8_t* bytes, size_t len, uint32_t* out, size_t out_len) {
    const Model* m = static_cast<const Model*>(user);
    int n = llama_tokenize(m->vocab(), reinterpret_cast<const char*>(bytes), int(len),
                           reinterpret_cast<llama_token*>(out), int(out_len), false, false);
    return size_t(n < 0 ? -n : n);
}

}  // namespace

GuidanceTokenizer::GuidanceTokenizer(const std::string& library_path, std::shared_ptr<Model> model)
    : api_(load_api(library_path)), model_(std::move(model)) {
    const int n_vocab = model_->n_vocab();
    std::vector<uint32_t> lens(static_cast<size_t>(n_vocab), 0u);
    std::string bytes;
    for (llama_token t = 0; t < n_vocab; ++t) {
        std::string piece = model_->token_piece(t, false);
        // llguidance marks special tokens with a leading 0xFF byte.
        if (piece.empty()) piece = "\xff" + model_->token_piece(t, true);
        lens[size_t(t)] = uint32_t(piece.size());
        bytes += piece;
    }
    llama_token eos = llama_vocab_eot(model_->vocab());
    if (eos < 0) eos = llama_vocab_eos(model_->vocab());
    LlgTokenizerInit init;
    std::memset(&init, 0, sizeof(init));
    init.vocab_size = uint32_t(n_vocab);
    init.tok_eos = LlgToken(eos < 0 ? 0 : eos);
    init.token_lens = lens.data();
    init.token_bytes = reinterpret_cast<const uint8_t*>(bytes.data());
    init.tokenize_fn = tokenize_cb;
    init.tokenize_assumes_string = true;  // llama_tokenize turns invalid UTF-8 into U+FFFD
    init.tokenize_user_data = model_.get();
    char err[1024] = {0};
    tok_ = api_->new_tokenizer(&init, err, sizeof(err));
    if (!tok_) throw InvalidRequestError(std::string("llguidance rejected the vocabulary: ") + err);
}

GuidanceTokenizer::~GuidanceTokenizer() {
    if (tok_) api_->free_tokenizer(tok_);
}

Constraint::Constraint(std::shared_ptr<GuidanceTokenizer> tok, const std::string& kind, const std::string& data)
    : tok_(std::move(tok)) {
    alignas(8) unsigned char init[1024];  // LlgConstraintInit, with room for future fields
    std::memset(init, 0, sizeof(init));
    tok_->api().constraint_init_set_defaults(init, tok_->get());
    reinterpret_cast<LlgConstraintInitHead*>(init)->log_stderr_level = 0;  // errors come back as exceptions
    matcher_ = tok_->api().new_matcher(init, kind.c_str(), data.c_str());
    if (const char* e = tok_->api().matcher_get_error(matcher_)) {
        std::string msg = e;
        tok_->api().free_matcher(matcher_);
        matcher_ = nullptr;
        throw InvalidRequestError("invalid " + kind + " constraint: " + msg);
    }
    bits_.resize(tok_->api().matcher_get_mask_byte_size(matcher_) / 4);
}

Constraint::~Constraint() {
    if (matcher_) tok_->api().free_matcher(matcher_);
}

void Constraint::mask(llama_token_data_array* cur) {
    if (tok_->api().matcher_compute_mask_into(matcher_, bits_.data(), bits_.size() * 4) != 0) {
        for (size_t i = 0; i < cur->size; ++i) cur->data[i].logit = -INFINITY;
        return;
    }
    const size_t n_bits = bits_.size() * 32;
    for (size_t i = 0; i < cur->size; ++i) {
        uint32_t id = uint32_t(cur->data[i].id);
        bool allowed = id < n_bits && (bits_[id >> 5] >> (id & 31)) & 1u;
        if (!allowed) cur->data[i].logit = -INFINITY;
    }
}

bool Constraint::accept(llama_token token) { return tok_->api().matcher_consume_token(matcher_, uint32_t(token)) == 0; }

std::vector<llama_token> Constraint::take_forced() {
    uint32_t buf[256];
    int32_t n = tok_->api().matcher_compute_ff_tokens(matcher_, buf, 256);
    std::vector<llama_token> out;
    for (int32_t i = 0; i < n; ++i) {
        if (tok_->api().matcher_consume_token(matcher_, buf[i]) != 0) break;
        out.push_back(llama_token(buf[i]));
    }
    return out;
}

bool Constraint::finished() const { return tok_->api().matcher_is_stopped(matcher_); }

const char* Constraint::error() const { return tok_->api().matcher_get_error(matcher_); }

// ------------------------------------------------------------------ llama_sampler glue

namespace {
const char* cs_name(const llama_sampler*) { return "mtllm-constraint"; }
void cs_accept(llama_sampler* s, llama_token t) { static_cast<Constraint*>(s->ctx)->accept(t); }
void cs_apply(llama_sampler* s, llama_token_data_array* cur) { static_cast<Constraint*>(s->ctx)->mask(cur); }
void cs_free(llama_sampler*) {}  // the request owns the Constraint

llama_sampler_i g_iface = [] {
    llama_sampler_i i;
    std::memset(&i, 0, sizeof(i));
    i.name = cs_name;
    i.accept = cs_accept;
    i.apply = cs_apply;
    i.free = cs_free;
    return i;
}();
}  // namespace

llama_sampler* constraint_sampler(Constraint* c) { return llama_sampler_init(&g_iface, c); }

}  // namespace mtllm
