#include "model.h"

#include <algorithm>
#include <climits>

#include "errors.h"
#include "log_sink.h"

namespace mtllm {

Model::Model(const std::string& path, const ModelParams& params) : path_(path) {
    llama_model_params mp = llama_model_default_params();
    mp.n_gpu_layers = params.n_gpu_layers;
    mp.use_extra_bufts = params.use_repack;
    mp.vocab_only = params.vocab_only;
    if (!params.use_mmap) mp.load_mode = LLAMA_LOAD_MODE_NONE;
    log_clear_errors();
    model_ = llama_model_load_from_file(path.c_str(), mp);
    if (!model_) {
        std::string why = log_last_errors();
        throw ModelLoadError("cannot load GGUF model '" + path + "'" + (why.empty() ? "" : ": " + why));
    }
    vocab_ = llama_model_get_vocab(model_);
    // Prefix reuse and preemption rely on removing the tail of a sequence's KV,
    // which recurrent state cannot do.
    if (llama_model_is_recurrent(model_) || llama_model_is_hybrid(model_) || !llama_model_has_decoder(model_) ||
        llama_model_has_encoder(model_)) {
        std::string arch = meta("general.architecture");
        llama_model_free(model_);
        model_ = nullptr;
        throw ModelLoadError("model '" + path + "' (architecture '" + arch +
                             "') is not a decoder-only transformer; mtllm_locally serves those only");
    }
}

Model::~Model() {
    if (model_) llama_model_free(model_);
}

std::vector<llama_token> Model::tokenize(const std::string& text, bool add_special, bool parse_special) const {
    if (text.size() > size_t(INT_MAX)) throw InvalidRequestError("text too long to tokenize");
    std::vector<llama_token> out(text.size() + 8);
    int n = llama_tokenize(vocab_, text.data(), int(text.size()), out.data(), int(out.size()), add_special, parse_special);
    if (n < 0) {
        if (n == INT_MIN) throw InvalidRequestError("text too long to tokenize");
        out.resize(size_t(-n));
        n = llama_tokenize(vocab_, text.data(), int(text.size()), out.data(), int(out.size()), add_special, parse_special);
        if (n < 0) throw InvalidRequestError("tokenization failed");
    }
    out.resize(size_t(n));
    return out;
}

std::string Model::detokenize(const std::vector<llama_token>& tokens, bool special) const {
    const int n_vocab_ = n_vocab();
    for (llama_token t : tokens)
        if (t < 0 || t >= n_vocab_) throw InvalidRequestError("token id " + std::to_string(t) + " out of range [0, " + std::to_string(n_vocab_) + ")");
    std::string out(tokens.size() * 8 + 16, '\0');
    int n = llama_detokenize(vocab_, tokens.data(), int(tokens.size()), out.data(), int(out.size()), false, special);
    if (n < 0) {
        out.resize(size_t(-n));
        n = llama_detokenize(vocab_, tokens.data(), int(tokens.size()), out.data(), int(out.size()), false, special);
    }
    out.resize(size_t(n < 0 ? 0 : n));
    return out;
}

std::string Model::token_piece(llama_token token, bool special) const {
    char buf[256];
    int n = llama_token_to_piece(vocab_, token, buf, sizeof(buf), 0, special);
    if (n >= 0) return std::string(buf, size_t(n));
    std::string big(size_t(-n), '\0');
    n = llama_token_to_piece(vocab_, token, big.data(), int(big.size()), 0, special);
    big.resize(size_t(n < 0 ? 0 : n));
    return big;
}

std::string Model::meta(const std::string& key) const {
    int n = llama_model_meta_val_str(model_, key.c_str(), nullptr, 0);
    if (n < 0) return "";
    std::string out(size_t(n) + 1, '\0');
    llama_model_meta_val_str(model_, key.c_str(), out.data(), out.size());
    out.resize(size_t(n));
    return out;
}

std::map<std::string, std::string> Model::metadata() const {
    std::map<std::string, std::string> out;
    const int count = llama_model_meta_count(model_);
    for (int i = 0; i < count; ++i) {
        char key[512];
        if (llama_model_meta_key_by_index(model_, i, key, sizeof(key)) < 0) continue;
        int n = llama_model_meta_val_str_by_index(model_, i, nullptr, 0);
        if (n < 0) continue;
        std::string val(size_t(n) + 1, '\0');
        llama_model_meta_val_str_by_index(model_, i, val.data(), val.size());
        val.resize(size_t(n));
        out[key] = val;
    }
    return out;
}

std::string Model::chat_template() const {
    const char* t = llama_model_chat_template(model_, nullptr);
    return t ? std::string(t) : std::string();
}

std::vector<std::string> Model::special_texts() const {
    const int mask = LLAMA_TOKEN_ATTR_CONTROL | LLAMA_TOKEN_ATTR_USER_DEFINED | LLAMA_TOKEN_ATTR_UNKNOWN;
    std::vector<std::string> out;
    for (llama_token t = 0; t < n_vocab(); ++t) {
        if (!(llama_vocab_get_attr(vocab_, t) & mask)) continue;
        const char* text = llama_vocab_get_text(vocab_, t);
        if (text && *text) out.emplace_back(text);
    }
    return out;
}

int Model::max_piece_bytes() const {
    size_t longest = 1;
    for (llama_token t = 0; t < n_vocab(); ++t) longest = std::max(longest, token_piece(t, true).size());
    return int(longest);
}

std::string Model::description() const {
    char buf[256];
    int n = llama_model_desc(model_, buf, sizeof(buf));
    return n > 0 ? std::string(buf, size_t(n)) : std::string();
}

}  // namespace mtllm
