// A loaded GGUF model: weights, vocabulary and metadata. Immutable after load and
// shared (shared_ptr) by every engine and adapter that uses it, so it outlives them.
#pragma once
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "llama.h"

namespace mtllm {

struct ModelParams {
    int n_gpu_layers = 0;   // CPU by default; a GPU build of llama.cpp can offload
    bool use_mmap = true;   // weights paged in from the file, shared across processes
    bool use_repack = true; // llama.cpp's repacked CPU kernels (Q4_0 on AVX-512 etc.)
    bool vocab_only = false; // tokenizer and metadata only (the trainer's tokenizer)
};

class Model {
public:
    Model(const std::string& path, const ModelParams& params);
    ~Model();
    Model(const Model&) = delete;
    Model& operator=(const Model&) = delete;

    llama_model* get() const { return model_; }
    const llama_vocab* vocab() const { return vocab_; }
    const std::string& path() const { return path_; }

    std::vector<llama_token> tokenize(const std::string& text, bool add_special, bool parse_special) const;
    std::string detokenize(const std::vector<llama_token>& tokens, bool special) const;
    std::string token_piece(llama_token token, bool special) const;
    bool is_eog(llama_token token) const { return llama_vocab_is_eog(vocab_, token); }

    int n_vocab() const { return llama_vocab_n_tokens(vocab_); }
    int n_ctx_train() const { return llama_model_n_ctx_train(model_); }
    int n_embd() const { return llama_model_n_embd(model_); }
    int n_layer() const { return llama_model_n_layer(model_); }
    std::string meta(const std::string& key) const;   // "" when absent
    std::map<std::string, std::string> metadata() const;
    std::string chat_template() const;
    // Text of every token llama_tokenize matches as one piece when parse_special is
    // on (control, user-defined, unknown): what user content must not smuggle in.
    std::vector<std::string> special_texts() const;
    // Bytes of the vocabulary's longest token text: a text of more bytes than
    // n_ctx * this cannot fit in n_ctx tokens, whatever the tokenizer does.
    int max_piece_bytes() const;
    std::string description() const;

private:
    std::string path_;
    llama_model* model_ = nullptr;
    const llama_vocab* vocab_ = nullptr;
};

}  // namespace mtllm
