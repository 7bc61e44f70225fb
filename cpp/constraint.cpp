#include "constraint.h"

#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cctype>
#include <cmath>
#include <cstring>
#include <cstdio>
#include <cstdlib>
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
    // the closing search
    LlgMatcher* (*clone_matcher)(const LlgMatcher*);
    int32_t (*matcher_validate_tokens)(LlgMatcher*, const uint32_t*, size_t);
    int32_t (*matcher_consume_tokens)(LlgMatcher*, const uint32_t*, size_t);
    int32_t (*matcher_rollback)(LlgMatcher*, size_t);
    bool (*matcher_is_accepting)(LlgMatcher*);
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
    resolve(h, "llg_clone_matcher", &api->clone_matcher);
    resolve(h, "llg_matcher_validate_tokens", &api->matcher_validate_tokens);
    resolve(h, "llg_matcher_consume_tokens", &api->matcher_consume_tokens);
    resolve(h, "llg_matcher_rollback", &api->matcher_rollback);
    resolve(h, "llg_matcher_is_accepting", &api->matcher_is_accepting);
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
    std::fill(std::begin(byte_tokens_), std::end(byte_tokens_), llama_token(-1));
    kinds_.assign(size_t(n_vocab), 0);
    for (llama_token t = 0; t < n_vocab; ++t) {
        std::string piece = model_->token_piece(t, false);
        if (piece.size() == 1 && byte_tokens_[uint8_t(piece[0])] < 0) byte_tokens_[uint8_t(piece[0])] = t;
        bool digits = !piece.empty(), letter = false;
        for (unsigned char ch : piece) {
            digits = digits && std::isdigit(ch);
            letter = letter || std::isalpha(ch) || ch >= 0x80;
        }
        kinds_[size_t(t)] = digits ? 1 : letter ? 2 : 0;
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

bool Constraint::accepting() const { return tok_->api().matcher_is_accepting(matcher_); }

bool Constraint::force(const std::vector<llama_token>& tokens) {
    if (tokens.empty()) return true;
    std::vector<uint32_t> ids(tokens.begin(), tokens.end());
    return tok_->api().matcher_consume_tokens(matcher_, ids.data(), ids.size()) == 0;
}

namespace {

// Single bytes in the order the closing search tries them: what closes comes first
// (the end of a string, an object, an array), then separators (the next required
// field: a number ends at a comma, not in more digits), the shortest values (0, true,
// null, false), digits (ranges), spaces and punctuation (the separators a regex may
// need before more letters), letters last; never a backslash or a control byte.
const std::string& closing_order() {
    static const std::string order = [] {
        std::string o = "\"}],:0tnf123456789-[{ .@_!#$%&'()*+/;<=>?^`|~";
        for (char c = 'a'; c <= 'z'; ++c) o += c;
        for (char c = 'A'; c <= 'Z'; ++c) o += c;
        return o;
    }();
    return order;
}

// A byte taken in the last kNovelty steps is tried after every other allowed byte
// (except the three closers): the search then walks through a pattern such as
// [a-z]+@[a-z]+ (letter, '@', letter) instead of circling on its first letter.
constexpr int kNovelty = 32;
constexpr int kClosers = 3;  // `"` `}` `]`: always tried first

struct MatcherCopy {
    const GuidanceApi& api;
    LlgMatcher* m;
    MatcherCopy(const GuidanceApi& a, LlgMatcher* src) : api(a), m(a.clone_matcher(src)) {}
    ~MatcherCopy() {
        if (m) api.free_matcher(m);
    }
};

}  // namespace

Closing Constraint::search(LlgMatcher* m, int limit) const {
    // Depth-first: each step takes what the grammar forces, else the first byte (in
    // closing order) the grammar allows; a dead end (nothing allowed, not accepting)
    // undoes the last step and tries its next byte. Never backtracks for length: the
    // first completion found is the answer, so the cost is about linear in its length.
    const GuidanceApi& api = tok_->api();
    const std::string& order = closing_order();
    struct Step {
        int n;      // tokens this step consumed
        int next;   // next byte index to try from the state before it (order.size(): none)
        int byte;   // the byte taken, -1 for forced tokens
    };
    std::vector<Step> steps;
    Closing out;
    int from = 0;  // first byte index to try at the current state; 0 = a new state
    uint32_t ff[64];
    for (;;) {
        if (api.matcher_get_error(m)) {
            out.status = Closing::kNone;
            return out;
        }
        if (api.matcher_is_accepting(m)) {
            out.status = Closing::kFound;
            return out;
        }
        if (int(out.tokens.size()) >= limit) {
            out.status = Closing::kTooLong;
            return out;
        }
        bool advanced = false;
        if (from == 0) {
            int32_t n = api.matcher_compute_ff_tokens(m, ff, 64);
            if (n > 0) {
                n = std::min<int32_t>(n, limit - int32_t(out.tokens.size()));
                if (api.matcher_consume_tokens(m, ff, size_t(n)) != 0) {
                    out.status = Closing::kNone;
                    return out;
                }
                out.tokens.insert(out.tokens.end(), ff, ff + n);
                steps.push_back({n, int(order.size()), -1});
                continue;
            }
        }
        auto recent = [&](int byte) {
            for (size_t k = steps.size(), seen = 0; k > 0 && seen < size_t(kNovelty); --k, ++seen)
                if (steps[k - 1].byte == byte) return true;
            return false;
        };
        for (int pass = 0; pass < 2 && !advanced; ++pass) {
            // pass 0 skips bytes taken recently; pass 1 takes them if nothing else fits
            for (int i = from; i < int(order.size()); ++i) {
                const int byte = uint8_t(order[size_t(i)]);
                const bool skip = i >= kClosers && recent(byte);
                if (skip != (pass == 1)) continue;
                llama_token t = tok_->byte_token(uint8_t(byte));
                if (t < 0) continue;
                if (++out.checks > kMaxClosingChecks) {
                    out.status = Closing::kNone;
                    return out;
                }
                uint32_t id = uint32_t(t);
                if (api.matcher_validate_tokens(m, &id, 1) != 1) continue;
                if (api.matcher_consume_tokens(m, &id, 1) != 0) {
                    out.status = Closing::kNone;
                    return out;
                }
                out.tokens.push_back(t);
                steps.push_back({1, i + 1, byte});
                advanced = true;
                break;
            }
        }
        if (advanced) {
            from = 0;
            continue;
        }
        // Dead end: undo the last step and try the next byte in its place.
        if (steps.empty()) {
            out.status = Closing::kNone;
            return out;
        }
        Step s = steps.back();
        steps.pop_back();
        if (api.matcher_rollback(m, size_t(s.n)) != 0) {
            out.status = Closing::kNone;
            return out;
        }
        out.tokens.resize(out.tokens.size() - size_t(s.n));
        from = s.next;
    }
}

namespace {
struct SearchTimer {
    const Constraint& c;
    std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
    explicit SearchTimer(const Constraint& k) : c(k) { c.searches++; }
    ~SearchTimer() { c.search_ms += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(); }
};
}  // namespace

Closing Constraint::closing(int limit) const {
    SearchTimer timer(*this);
    MatcherCopy copy(tok_->api(), matcher_);
    if (!copy.m) return Closing{};
    Closing c = search(copy.m, std::min(limit, kMaxClosingTokens));
    search_checks += uint64_t(c.checks);
    return c;
}

int Constraint::cost_with(llama_token t, int limit) const {
    if (limit < 1) return -1;
    SearchTimer timer(*this);
    const GuidanceApi& api = tok_->api();
    MatcherCopy copy(api, matcher_);
    if (!copy.m) return -1;
    uint32_t id = uint32_t(t);
    if (api.matcher_validate_tokens(copy.m, &id, 1) != 1 || api.matcher_consume_tokens(copy.m, &id, 1) != 0) return -1;
    int cost = 1;
    uint32_t ff[64];
    int32_t n = api.matcher_compute_ff_tokens(copy.m, ff, 64);
    if (n > 0) {
        if (api.matcher_consume_tokens(copy.m, ff, size_t(n)) != 0) return -1;
        cost += n;
    }
    if (cost > limit) return -1;
    Closing c = search(copy.m, std::min(limit - cost, kMaxClosingTokens));
    search_checks += uint64_t(c.checks);
    return c.status == Closing::kFound ? cost + int(c.tokens.size()) : -1;
}

int repetition_period(const GuidanceTokenizer& tok, const llama_token* g, int n) {
    constexpr int kMaxPeriod = 64;
    auto kind_of = [&](llama_token t) { return tok.token_kind(t); };
    for (int p = 1; p <= kMaxPeriod && 3 * p <= n; ++p) {
        // Copies of the last p tokens, going back: exactly equal, and equal where
        // tokens made of digits count as equal.
        int exact = 1, loose = 1;
        bool exact_run = true;
        for (int k = 1; (k + 1) * p <= n; ++k) {
            bool same = true, similar = true;
            for (int i = 0; i < p && similar; ++i) {
                llama_token a = g[size_t(n - 1 - i)], b = g[size_t(n - 1 - i - k * p)];
                if (a != b) {
                    same = false;
                    similar = kind_of(a) == 1 && kind_of(b) == 1;
                }
            }
            if (!similar) break;
            ++loose;
            if (exact_run && same) ++exact;
            else exact_run = false;
        }
        bool word = false;
        for (int i = 0; i < p && !word; ++i) word = kind_of(g[size_t(n - 1 - i)]) == 2;
        if (!word) continue;
        if (exact >= 3 && exact * p >= 12) return p;
        if (loose >= 4 && loose * p >= 24) return p;
    }
    return 0;
}

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
