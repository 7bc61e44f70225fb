#include "engine.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <future>
#include <sstream>
#include <thread>

#include "errors.h"
#include "log_sink.h"

namespace mtllm {

std::string adapter_key(const AdapterSet& set) {
    std::ostringstream os;
    for (const auto& [id, scale] : set) os << id << ':' << scale << ';';
    return os.str();
}

Chunk Request::take(int timeout_ms) {
    std::unique_lock<std::mutex> lock(mu);
    auto ready = [&] { return done || !out_text.empty() || !out_tokens.empty(); };
    if (timeout_ms < 0) cv.wait(lock, ready);
    else cv.wait_for(lock, std::chrono::milliseconds(timeout_ms), ready);
    Chunk c;
    c.text.swap(out_text);
    c.tokens.swap(out_tokens);
    c.done = done;
    return c;
}

namespace {
int64_t now_us() { return llama_time_us(); }
}  // namespace

Engine::Engine(std::shared_ptr<Model> model, const EngineParams& params)
    : model_(std::move(model)), params_(params) {
    if (params_.n_batch < 1) throw InvalidRequestError("n_batch must be >= 1");
    if (params_.max_running < 1) throw InvalidRequestError("max_running must be >= 1");
    if (params_.cache_sequences < 0) throw InvalidRequestError("cache_sequences must be >= 0");
    if (params_.max_queued < 0) throw InvalidRequestError("max_queued must be >= 0");
    int n_ctx = params_.n_ctx > 0 ? params_.n_ctx : std::min(model_->n_ctx_train(), 8192);
    if (n_ctx < 16) throw InvalidRequestError("n_ctx must be >= 16");
    // llama.cpp reserves one output row per sequence within a batch's outputs
    // (GGML_ASSERT otherwise): sequences are capped by the batch, which n_ctx caps.
    const int n_batch_cap = std::min(params_.n_batch, n_ctx);
    if (params_.max_running > n_batch_cap)
        throw InvalidRequestError("max_running (" + std::to_string(params_.max_running) + ") exceeds the batch size (" +
                                  std::to_string(n_batch_cap) + " = min(n_batch, n_ctx)): every running request needs a slot in each step");
    n_seq_max_ = std::min({params_.max_running + params_.cache_sequences, int(llama_max_parallel_sequences()), n_batch_cap});
    if (params_.max_running > n_seq_max_)
        throw InvalidRequestError("max_running exceeds llama.cpp's limit of " + std::to_string(llama_max_parallel_sequences()) + " sequences");

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = uint32_t(n_ctx);
    cp.n_batch = uint32_t(params_.n_batch);
    cp.n_ubatch = uint32_t(params_.n_batch);
    cp.n_seq_max = uint32_t(n_seq_max_);
    int threads = params_.n_threads > 0 ? params_.n_threads : int(std::max(1u, std::thread::hardware_concurrency()));
    cp.n_threads = threads;
    cp.n_threads_batch = threads;
    configured_threads_ = threads;
    applied_threads_.store(threads);
    cp.kv_unified = true;  // required by seq_cp prefix sharing, and one sequence may use all of n_ctx
    // Sliding-window layers (Gemma 3, ...): a full-size window cache keeps old cells until
    // their room is needed, instead of overwriting them at once, so most prefixes stay
    // reusable; the KV manager checks what is left before reusing one (window_holds).
    cp.swa_full = true;
    cp.no_perf = true;
    cp.flash_attn_type = params_.flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                         : params_.flash_attn == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_ENABLED;
    if (params_.kv_f32) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
    }
    row_mode_ = params_.mixed_adapters;
    if (row_mode_) {
        cp.cb_eval = &RowLora::callback;
        cp.cb_eval_user_data = &row_lora_;
    }
    log_clear_errors();
    ctx_ = llama_init_from_model(model_->get(), cp);
    if (!ctx_) throw ModelLoadError("cannot create a llama.cpp context: " + log_last_errors());
    n_ctx_ = int(llama_n_ctx_seq(ctx_));
    // Per-row LoRA maps a product's rows to the step's tokens: one micro-batch per decode.
    if (llama_n_ubatch(ctx_) < llama_n_batch(ctx_)) row_mode_ = false;
    kv_ = std::make_unique<KvCacheManager>(std::make_shared<LlamaKvMemory>(llama_get_memory(ctx_)), n_seq_max_,
                                           params_.prefix_reuse, llama_model_n_swa(model_->get()));
    // llama.cpp caps n_batch at n_ctx; a step larger than its cap is a GGML_ASSERT.
    scheduler_ = std::make_unique<Scheduler>(int(llama_n_batch(ctx_)), params_.max_running, *kv_);
    batch_ = llama_batch_init(params_.n_batch, 0, 1);
    worker_.start([this] { loop(); }, kGrammarStackBytes);
}

Engine::~Engine() {
    close();
    {
        std::lock_guard<std::mutex> lock(mu_);
        for (auto& [id, a] : adapters_) llama_adapter_lora_free(a.ptr);
        adapters_.clear();
    }
    llama_batch_free(batch_);
    if (ctx_) llama_free(ctx_);
}

void Engine::close() {
    if (closed_.exchange(true)) {
        if (worker_.joinable()) worker_.join();
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mu_);  // under the lock, or the wake-up can be lost
        stop_ = true;
    }
    cv_.notify_all();
    if (worker_.joinable()) worker_.join();
    ready_cv_.notify_all();  // wake the asyncio pump so it can exit
}

void Engine::set_guidance_library(const std::string& path) {
    std::lock_guard<std::mutex> lock(guidance_mu_);
    if (path != guidance_path_) guidance_.reset();
    guidance_path_ = path;
}

std::shared_ptr<Request> Engine::submit(std::vector<llama_token> prompt, const SamplingParams& params,
                                        const AdapterSet& adapters, bool notify,
                                        const std::string& constraint_kind, const std::string& constraint_data) {
    if (prompt.empty()) throw InvalidRequestError("prompt is empty");
    const int n_vocab = model_->n_vocab();
    for (llama_token t : prompt)
        if (t < 0 || t >= n_vocab) throw InvalidRequestError("token id " + std::to_string(t) + " out of range [0, " + std::to_string(n_vocab) + ")");
    if (int(prompt.size()) >= n_ctx_)
        throw ContextOverflowError("prompt is " + std::to_string(prompt.size()) + " tokens; the context holds " +
                                   std::to_string(n_ctx_) + " (prompt plus at least one generated token)");
    // Python validates first; these are the native engine's own limits, so that no
    // caller can hand the scheduler thread something that aborts it.
    if (params.max_tokens < 0) throw InvalidRequestError("max_tokens must be >= 0");
    auto finite = [](float v) { return std::isfinite(v); };
    if (!finite(params.temperature) || params.temperature < 0) throw InvalidRequestError("temperature must be a finite number >= 0");
    if (!finite(params.top_p) || params.top_p <= 0 || params.top_p > 1) throw InvalidRequestError("top_p must be in (0, 1]");
    if (!finite(params.min_p) || params.min_p < 0 || params.min_p > 1) throw InvalidRequestError("min_p must be in [0, 1]");
    if (!finite(params.repeat_penalty) || params.repeat_penalty <= 0) throw InvalidRequestError("repeat_penalty must be a finite number > 0");
    if (params.top_k < 0) throw InvalidRequestError("top_k must be >= 0");
    if (params.repeat_last_n < -1) throw InvalidRequestError("repeat_last_n must be >= -1");
    if (params.stop.size() > kMaxStops) throw InvalidRequestError("at most " + std::to_string(kMaxStops) + " stop strings");
    for (const auto& s : params.stop)
        if (s.size() > kMaxStopBytes) throw InvalidRequestError("a stop string is longer than " + std::to_string(kMaxStopBytes) + " bytes");
    if (params.logits_all && double(prompt.size()) * double(n_vocab) > double(kMaxLogitsFloats))
        throw InvalidRequestError("logits_all for " + std::to_string(prompt.size()) + " prompt tokens would need more than " +
                                  std::to_string(kMaxLogitsFloats / (1 << 28)) + " GiB");
    for (const auto& [id, scale] : adapters)
        if (!std::isfinite(scale) || std::fabs(scale) > kMaxAdapterScale)
            throw InvalidRequestError("adapter scale must be finite and within [-" + std::to_string(int(kMaxAdapterScale)) +
                                      ", " + std::to_string(int(kMaxAdapterScale)) + "]");

    auto r = std::make_shared<Request>();
    r->prompt = std::move(prompt);
    r->params = params;
    r->adapters = adapters;
    std::sort(r->adapters.begin(), r->adapters.end());
    r->key = adapter_key(r->adapters);
    r->notify_engine = notify;
    r->tokens = r->prompt;
    r->stream = std::make_unique<TextStream>(params.stop);
    r->t_submit_us = now_us();
    r->stats.prompt_tokens = int(r->prompt.size());
    r->n_vocab = n_vocab;
    if (!constraint_kind.empty()) {
        std::shared_ptr<GuidanceTokenizer> tok;
        {
            std::lock_guard<std::mutex> lock(guidance_mu_);
            if (guidance_path_.empty()) throw InvalidRequestError("constrained decoding needs the llguidance package");
            if (!guidance_) guidance_ = std::make_shared<GuidanceTokenizer>(guidance_path_, model_);
            tok = guidance_;
        }
        if (constraint_data.size() > kMaxGrammarBytes)
            throw InvalidRequestError("the " + constraint_kind + " constraint is " + std::to_string(constraint_data.size()) +
                                      " bytes; the limit is " + std::to_string(kMaxGrammarBytes));
        // Compiled now, so a bad schema fails at submit; on a big stack, because the
        // compiler recurses as deep as the grammar nests.
        Closing shortest;
        const bool closes = params.close_at_budget;
        run_with_big_stack([&] {
            r->constraint = std::make_unique<Constraint>(tok, constraint_kind, constraint_data);
            if (closes) shortest = r->constraint->closing(kMaxClosingTokens);
        });
        if (closes) {
            // The budget-aware closing needs a completion from the start; a request whose
            // budget cannot hold the shortest one would end as invalid output.
            const std::string what = constraint_kind == "json_schema" ? "schema" : constraint_kind + " grammar";
            if (shortest.status != Closing::kFound)
                throw InvalidRequestError("the " + what + " has no completion the engine can find (none of at most " +
                                          std::to_string(kMaxClosingTokens) + " tokens): its output could never be closed");
            const int need = int(shortest.tokens.size());
            if (need > params.max_tokens)
                throw InvalidRequestError("max_tokens=" + std::to_string(params.max_tokens) + " is below the " + std::to_string(need) +
                                          " tokens this " + what + " needs at least");
            if (int(r->prompt.size()) + need > n_ctx_)
                throw ContextOverflowError("prompt is " + std::to_string(r->prompt.size()) + " tokens and this " + what + " needs " +
                                           std::to_string(need) + " more; the context holds " + std::to_string(n_ctx_));
            r->constraint->close_len = need;
        }
    }
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (closed_) throw EngineClosedError("engine is closed");
        if (!broken_.empty()) throw EngineClosedError("engine stopped after a fatal error: " + broken_);
        const size_t queued = incoming_.size() + queued_;
        if (queued >= size_t(params_.max_queued))
            throw OverloadedError("engine overloaded: " + std::to_string(queued) +
                                  " requests already waiting (max_queued=" + std::to_string(params_.max_queued) + ")");
        for (size_t i = 0; i < r->adapters.size(); ++i) {
            auto it = adapters_.find(r->adapters[i].first);
            if (it == adapters_.end() || it->second.unload_pending)
                throw InvalidRequestError("adapter " + std::to_string(r->adapters[i].first) + " is not loaded");
            if (i > 0 && r->adapters[i].first == r->adapters[i - 1].first)
                throw InvalidRequestError("adapter " + std::to_string(r->adapters[i].first) + " named twice");
        }
        for (auto& [id, scale] : r->adapters) adapters_[id].users++;
        bool per_row = row_mode_;
        for (auto& [id, scale] : r->adapters) {
            const auto& host = adapters_[id].host;
            if (!host) per_row = false;
            else r->host_adapters.emplace_back(host, scale);
        }
        if (!per_row) r->host_adapters.clear();
        r->group = per_row ? std::string() : r->key;
        r->id = next_id_++;
        incoming_.push_back(r);
    }
    cv_.notify_one();
    return r;
}

std::vector<uint64_t> Engine::wait_ready(int timeout_ms) {
    std::unique_lock<std::mutex> lock(ready_mu_);
    ready_cv_.wait_for(lock, std::chrono::milliseconds(timeout_ms), [&] { return !ready_.empty() || closed_.load(); });
    std::vector<uint64_t> out;
    out.swap(ready_);
    return out;
}

uint64_t Engine::load_adapter(const std::string& path) {
    auto task = std::make_shared<std::packaged_task<uint64_t()>>([this, path] {
        log_clear_errors();
        llama_adapter_lora* a = llama_adapter_lora_init(model_->get(), path.c_str());
        if (!a) {
            std::string why = log_last_errors();
            throw AdapterLoadError("cannot load LoRA adapter '" + path + "'" + (why.empty() ? "" : ": " + why));
        }
        // The host copy for per-row application; an adapter it cannot hold (an embedding
        // or output LoRA) is served per context, as without mixed_adapters.
        std::shared_ptr<const HostLora> host;
        if (row_mode_) {
            try {
                std::string why;
                host = HostLora::load(path, &why);
            } catch (...) {
                llama_adapter_lora_free(a);
                throw;
            }
        }
        std::lock_guard<std::mutex> lock(mu_);
        uint64_t id = next_adapter_id_++;
        adapters_[id] = LoadedAdapter{a, std::move(host), path, 0, false};
        return id;
    });
    std::future<uint64_t> done = task->get_future();
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (closed_ || stop_) throw EngineClosedError("engine is closed");
        tasks_.push_back([task] { (*task)(); });
    }
    cv_.notify_one();
    return done.get();  // the scheduler thread runs every queued task before it exits
}

void Engine::unload_adapter(uint64_t id) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = adapters_.find(id);
    if (it == adapters_.end() || it->second.unload_pending)
        throw InvalidRequestError("adapter " + std::to_string(id) + " is not loaded");
    // Freed by the scheduler thread once no request uses it and it is not set on
    // the context; new requests can no longer name it.
    it->second.unload_pending = true;
    cv_.notify_one();
}

std::vector<AdapterInfo> Engine::adapters() const {
    std::lock_guard<std::mutex> lock(mu_);
    std::vector<AdapterInfo> out;
    for (const auto& [id, a] : adapters_)
        if (!a.unload_pending) out.push_back({id, a.path});
    return out;
}

EngineStats Engine::stats() const {
    std::lock_guard<std::mutex> lock(stats_mu_);
    return stats_;
}

// ---------------------------------------------------------------- scheduler thread

void Engine::deliver(Request* r, const std::string& text, const std::vector<llama_token>& tokens, bool done) {
    {
        std::lock_guard<std::mutex> lock(r->mu);
        r->out_text += text;
        r->out_tokens.insert(r->out_tokens.end(), tokens.begin(), tokens.end());
        if (done) r->done = true;
    }
    r->cv.notify_all();
    if (r->notify_engine) {
        {
            std::lock_guard<std::mutex> lock(ready_mu_);
            ready_.push_back(r->id);
        }
        ready_cv_.notify_all();
    }
}

void Engine::finish(Request* r, const std::string& reason_in, const std::string& err_kind, const std::string& err_msg) {
    std::string tail = r->stream ? r->stream->flush() : std::string();
    int64_t t = now_us();
    std::string reason = reason_in;
    {
        std::lock_guard<std::mutex> lock(r->mu);
        // The budget shaped this value (tokens were refused so that it could close in
        // time) even if the model wrote the end itself: it was cut short.
        if (r->constraint && r->constraint->steered && r->closed_by.empty() && (reason == "stop" || reason == "length") &&
            r->constraint->accepting()) {
            r->closed_by = "budget";
            reason = "length";
        }
        r->finish_reason = reason;
        r->error_kind = err_kind;
        r->error_message = err_msg;
        r->stats.completion_tokens = r->n_generated;
        r->stats.total_ms = double(t - r->t_submit_us) / 1000.0;
        if (r->stats.ttft_ms == 0 && r->n_generated > 0) r->stats.ttft_ms = r->stats.total_ms;
    }
    scheduler_->release(r, err_kind.empty());  // an error's KV is not trusted as cache
    {
        std::lock_guard<std::mutex> lock(mu_);
        for (auto& [id, scale] : r->adapters) adapters_[id].users--;
    }
    {
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.requests_finished++;
        if (r->constraint) {
            stats_.closing_searches += r->constraint->searches;
            stats_.closing_checks += r->constraint->search_checks;
            stats_.closing_ms += r->constraint->search_ms;
            r->constraint->searches = r->constraint->search_checks = 0;
            r->constraint->search_ms = 0;
        }
        if (r->closed_by == "budget") stats_.closed_by_budget++;
        if (r->closed_by == "loop") stats_.closed_by_loop++;
    }
    deliver(r, tail, {}, true);
}

void Engine::fail_all(const std::string& kind, const std::string& msg) {
    for (auto& r : scheduler_->take_all()) finish(r.get(), "error", kind, msg);
    std::deque<std::shared_ptr<Request>> incoming;
    {
        std::lock_guard<std::mutex> lock(mu_);
        incoming.swap(incoming_);
        publish_queue_depth();
    }
    for (auto& r : incoming) finish(r.get(), "error", kind, msg);
}

void Engine::publish_queue_depth() { queued_ = scheduler_->n_waiting(); }

void Engine::build_sampler(Request* r) {
    const SamplingParams& p = r->params;
    // Windows longer than the context or the vocabulary mean the same as those sizes;
    // clamped, because llama.cpp allocates them up front (2^31-1 was a bad_alloc).
    const int last_n = p.repeat_last_n < 0 || p.repeat_last_n > n_ctx_ ? n_ctx_ : p.repeat_last_n;
    const int top_k = std::min(p.top_k, model_->n_vocab());
    llama_sampler* chain = llama_sampler_chain_init(llama_sampler_chain_default_params());
    r->sampler = chain;  // owned by the request from here on, even if a step below throws
    if (r->constraint) llama_sampler_chain_add(chain, constraint_sampler(r->constraint.get()));
    if (p.repeat_penalty != 1.0f)
        llama_sampler_chain_add(chain, llama_sampler_init_penalties(model_->n_vocab(), last_n, p.repeat_penalty, 0.0f, 0.0f));
    if (p.temperature <= 0.0f) {
        llama_sampler_chain_add(chain, llama_sampler_init_greedy());
    } else {
        if (top_k > 0) llama_sampler_chain_add(chain, llama_sampler_init_top_k(top_k));
        if (p.top_p < 1.0f) llama_sampler_chain_add(chain, llama_sampler_init_top_p(p.top_p, 1));
        if (p.min_p > 0.0f) llama_sampler_chain_add(chain, llama_sampler_init_min_p(p.min_p, 1));
        llama_sampler_chain_add(chain, llama_sampler_init_temp(p.temperature));
        llama_sampler_chain_add(chain, llama_sampler_init_dist(p.seed));
    }
}

void Engine::start_admitted() {
    for (auto& r : scheduler_->admit()) {
        if (r->admitted_once) continue;  // preempted before: it keeps its sampler and stats
        try {
            r->admitted_once = true;
            r->t_admit_us = now_us();
            {
                std::lock_guard<std::mutex> lock(r->mu);
                r->stats.cached_tokens = r->n_computed;  // admission starts it after its cached prefix
                r->stats.queue_ms = double(r->t_admit_us - r->t_submit_us) / 1000.0;
            }
            build_sampler(r.get());
            if (r->params.logits_all) r->logits.reserve(r->prompt.size() * size_t(model_->n_vocab()));
        } catch (const std::exception& e) {
            finish(r.get(), "error", "EngineError", std::string("cannot start the request: ") + e.what());
        }
    }
    scheduler_->remove_finished();
}

int Engine::execute(const StepPlan& plan) {
    // LoRA is per context: set this group's adapters (a no-op when unchanged).
    if (plan.adapter_key != current_adapter_key_) {
        std::vector<llama_adapter_lora*> ptrs;
        std::vector<float> scales;
        {
            std::lock_guard<std::mutex> lock(mu_);
            for (const auto& [id, scale] : plan.adapters) {
                ptrs.push_back(adapters_.at(id).ptr);
                scales.push_back(scale);
            }
        }
        int64_t t_switch = now_us();
        if (llama_set_adapters_lora(ctx_, ptrs.data(), ptrs.size(), scales.data()) != 0) return -100;
        current_adapter_key_ = plan.adapter_key;
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.adapter_switches++;
        stats_.adapter_switch_ms += double(now_us() - t_switch) / 1000.0;
    }
    // Group "": rows under different adapters; the engine adds their LoRA terms.
    std::vector<const HostAdapterSet*> token_rows, output_rows;
    bool rows_adapted = false;
    batch_.n_tokens = 0;
    for (const ScheduledSlice& s : plan.slices) {
        Request* r = s.request;
        for (int i = 0; i < s.n_tokens; ++i) {
            int j = batch_.n_tokens++;
            int pos = s.start + i;
            batch_.token[j] = r->tokens[size_t(pos)];
            batch_.pos[j] = pos;
            batch_.n_seq_id[j] = 1;
            batch_.seq_id[j][0] = r->seq;
            bool last = i == s.n_tokens - 1;
            bool want_prompt_logits = r->params.logits_all && pos < int(r->prompt.size());
            batch_.logits[j] = (last && s.sample) || want_prompt_logits;
            if (row_mode_) {
                const HostAdapterSet* set = r->host_adapters.empty() ? nullptr : &r->host_adapters;
                rows_adapted = rows_adapted || set;
                token_rows.push_back(set);
                if (batch_.logits[j]) output_rows.push_back(set);
            }
        }
    }
    int wanted = wanted_threads_.load();
    int threads = wanted > 0 ? std::min(wanted, configured_threads_) : configured_threads_;
    if (threads != applied_threads_.load()) {
        llama_set_n_threads(ctx_, threads, threads);
        applied_threads_.store(threads);
    }
    if (rows_adapted) row_lora_.begin(token_rows, output_rows, threads);
    int64_t t0 = now_us();
    const double row_ms0 = row_lora_.apply_ms();
    int ret = llama_decode(ctx_, batch_);
    const std::string row_error = rows_adapted ? row_lora_.error() : std::string();
    row_lora_.end();
    {
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.decode_ms += double(now_us() - t0) / 1000.0;
        if (ret == 0) {
            stats_.steps++;
            stats_.tokens_decoded += uint64_t(batch_.n_tokens);
        }
        if (rows_adapted) {
            stats_.row_lora_steps++;
            stats_.row_lora_ms += row_lora_.apply_ms() - row_ms0;
        }
    }
    // The rows' output misses LoRA terms: fail this step's requests (recover()), never serve it.
    if (ret == 0 && !row_error.empty()) throw EngineError(row_error);
    return ret;
}

// Budget-aware closing (constrained requests). Every request knows its room (tokens
// it may still append: max_tokens and the context) and the closing length L of its
// grammar state (Constraint::closing). Far from the end of its budget a request
// samples as usual, re-checking L every kRecheckEvery tokens; once room <= 2L +
// kCloseMargin it checks every token before taking it: the sampled token is taken
// only if, after it and what the grammar forces, the closing still fits in the room
// (candidates are tried in the sampler's order); when none of kMaxCandidates does,
// the engine appends the closing instead. The loop guard (SamplingParams.loop_guard)
// closes a value whose last tokens repeat one item (repetition_period): it lets the
// loop run one more period to find the point where closing is shortest (the end of
// an item), then closes there.
namespace {
constexpr int kCloseMargin = 16;
constexpr int kRecheckEvery = 16;
constexpr int kMaxCandidates = 8;
}  // namespace

int Engine::room(const Request* r) const {
    return std::min(r->params.max_tokens - r->n_generated, n_ctx_ - int(r->tokens.size()));
}

llama_token Engine::sample_candidate(Request* r, int batch_index, const std::vector<llama_token>& banned) {
    const float* logits = llama_get_logits_ith(ctx_, batch_index);
    const int n_vocab = model_->n_vocab();
    candidates_.resize(size_t(n_vocab));
    for (llama_token t = 0; t < n_vocab; ++t) candidates_[size_t(t)] = llama_token_data{t, logits[t], 0.0f};
    for (llama_token t : banned) candidates_[size_t(t)].logit = -INFINITY;
    llama_token_data_array cur{candidates_.data(), candidates_.size(), -1, false};
    llama_sampler_apply(r->sampler, &cur);
    if (cur.selected < 0 || size_t(cur.selected) >= cur.size) return -1;
    return cur.data[cur.selected].id;
}

void Engine::next_constrained(Request* r, int batch_index, llama_token* tok, std::vector<llama_token>* closing,
                              std::string* closed_by) {
    Constraint& c = *r->constraint;
    const int room = this->room(r);
    if (c.loop_period > 0) {
        Closing now = c.closing(room);
        if (now.status == Closing::kFound) {
            const int L = int(now.tokens.size());
            const bool first_period = c.loop_steps < c.loop_period;
            const bool close_now = c.loop_steps >= 2 * c.loop_period || (!first_period && L <= c.loop_best) || L >= room;
            if (first_period) c.loop_best = c.loop_best < 0 ? L : std::min(c.loop_best, L);
            if (close_now) {
                *closing = std::move(now.tokens);
                *closed_by = "loop";
                return;
            }
        }
    }
    if (!r->params.close_at_budget) {  // the loop guard alone
        *tok = llama_sampler_sample(r->sampler, ctx_, batch_index);
        return;
    }
    const bool check = c.close_len < 0 || room <= 2 * c.close_len + kCloseMargin || c.since_check >= kRecheckEvery;
    if (c.close_len < 0) c.close_len = room;  // unknown: check from here on
    if (!check) {
        *tok = llama_sampler_sample(r->sampler, ctx_, batch_index);
        return;
    }
    c.since_check = 0;
    // Far from the end (a periodic re-check) the sampled token is taken whatever its
    // cost: refusing tokens is for the last stretch only.
    const bool stretch = c.close_len >= 0 && room <= 2 * c.close_len + kCloseMargin;
    if (!stretch) {
        *tok = llama_sampler_sample(r->sampler, ctx_, batch_index);
        if (model_->is_eog(*tok)) return;
        Closing after = c.closing(room - 1);
        c.close_len = after.status == Closing::kFound ? int(after.tokens.size()) : room;
        return;
    }
    std::vector<llama_token> banned;
    for (int k = 0; k < kMaxCandidates; ++k) {
        llama_token t = sample_candidate(r, batch_index, banned);
        if (t < 0) break;
        if (!r->params.ignore_eos && model_->is_eog(t)) {  // allowed only where the grammar accepts
            llama_sampler_accept(r->sampler, t);
            *tok = t;
            return;
        }
        const int cost = c.cost_with(t, room);
        if (cost >= 0) {
            llama_sampler_accept(r->sampler, t);
            c.close_len = cost - 1;  // an upper bound: it counts what the grammar forces next
            *tok = t;
            return;
        }
        banned.push_back(t);
        c.steered = true;
    }
    Closing now = c.closing(room);
    if (now.status == Closing::kFound) {
        *closing = std::move(now.tokens);
        *closed_by = "budget";
        return;
    }
    if (now.status == Closing::kNone)
        throw EngineError("the output cannot be closed: the grammar has no completion the engine can find after " +
                          std::to_string(r->n_generated) + " tokens");
    // Too long for the room left (the window above missed a jump): the output will be cut.
    c.close_len = room;
    *tok = llama_sampler_sample(r->sampler, ctx_, batch_index);
}

void Engine::sample_next(Request* r, int batch_index) {
    if (r->params.max_tokens == 0) {
        finish(r, "length");
        return;
    }
    llama_token tok = -1;
    std::vector<llama_token> closing;  // appended instead of a sampled token: they close the value
    std::string closed_by;
    if (r->constraint && (r->params.close_at_budget || r->params.loop_guard))
        next_constrained(r, batch_index, &tok, &closing, &closed_by);
    else tok = llama_sampler_sample(r->sampler, ctx_, batch_index);
    if (r->n_generated == 0) {
        std::lock_guard<std::mutex> lock(r->mu);
        r->stats.ttft_ms = double(now_us() - r->t_submit_us) / 1000.0;
    }
    auto count_token = [&] {
        r->n_generated++;
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.tokens_generated++;
    };
    auto finish_closed = [&] {
        {
            std::lock_guard<std::mutex> lock(r->mu);
            r->closed_by = closed_by;
        }
        finish(r, closed_by == "budget" ? "length" : "stop");
    };
    if (!closed_by.empty()) {
        if (!r->constraint->force(closing))
            throw EngineError(std::string("the grammar refused its own closing: ") + (r->constraint->error() ? r->constraint->error() : "?"));
        for (llama_token t : closing) {
            count_token();
            r->tokens.push_back(t);
            bool stopped = false;
            std::string text = r->stream->push(model_->token_piece(t, false), &stopped);
            deliver(r, text, {t}, false);
        }
        return finish_closed();
    }
    count_token();
    if (!r->params.ignore_eos && model_->is_eog(tok)) {
        deliver(r, "", {tok}, false);
        finish(r, "stop");
        return;
    }
    // A sampled token, then any tokens the grammar forces after it (appended without
    // sampling; the scheduler computes them as one multi-token slice next step).
    std::vector<llama_token> forced;
    for (size_t i = 0;; ++i) {
        llama_token t = i == 0 ? tok : forced[i - 1];
        if (i > 0) count_token();
        r->tokens.push_back(t);
        bool stopped = false;
        std::string text = r->stream->push(model_->token_piece(t, false), &stopped);
        deliver(r, text, {t}, false);
        if (stopped) return finish(r, "stop");
        if (r->n_generated >= r->params.max_tokens || int(r->tokens.size()) >= n_ctx_) {
            // At the limit with the value complete (every forced token appended): a stop.
            const bool complete = r->constraint && i >= forced.size() && r->constraint->finished();
            return finish(r, complete ? "stop" : "length");
        }
        if (i == 0 && r->constraint) forced = r->constraint->take_forced();
        if (i < forced.size()) continue;
        // The grammar's state is past every forced token only now.
        if (r->constraint && r->constraint->error())
            return finish(r, "error", "EngineError", std::string("constraint failed: ") + r->constraint->error());
        if (r->constraint && r->constraint->finished()) return finish(r, "stop");  // grammar complete
        break;
    }
    if (r->constraint) {
        Constraint& c = *r->constraint;
        const int appended = int(1 + forced.size());
        c.since_check += appended;
        if (c.loop_period > 0) c.loop_steps += appended;
        else if (r->params.loop_guard) {
            const size_t n0 = r->prompt.size();
            int p = repetition_period(*c.tokenizer(), r->tokens.data() + n0, int(r->tokens.size() - n0));
            if (p > 0) {
                c.loop_period = p;
                c.loop_steps = 0;
                c.loop_best = -1;
            }
        }
    }
}

void Engine::update(const StepPlan& plan) {
    int batch_index = 0;
    const int n_vocab = model_->n_vocab();
    for (const ScheduledSlice& s : plan.slices) {
        Request* r = s.request;
        batch_index += s.n_tokens;
        if (r->seq < 0) continue;  // failed earlier in this update
        // One request's failure (a grammar error, an allocation) ends that request only.
        try {
            scheduler_->on_computed(s);
            if (r->params.logits_all) {
                std::lock_guard<std::mutex> lock(r->mu);  // the caller may be reading them
                for (int i = 0; i < s.n_tokens; ++i) {
                    if (s.start + i >= int(r->prompt.size())) break;
                    const float* row = llama_get_logits_ith(ctx_, batch_index - s.n_tokens + i);
                    r->logits.insert(r->logits.end(), row, row + n_vocab);
                }
            }
            if (s.sample) sample_next(r, batch_index - 1);
        } catch (const std::exception& e) {
            fail_request(r, e.what());
        }
    }
    scheduler_->remove_finished();
}

void Engine::fail_request(Request* r, const std::string& what) {
    {
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.internal_errors++;
    }
    finish(r, "error", "EngineError", "internal error while serving the request: " + what);
}

void Engine::loop() {
    // Nothing may escape this thread: an exception here would end the host process.
    for (;;) {
        try {
            if (!step()) return;
        } catch (const std::exception& e) {
            recover(e.what());
        } catch (...) {
            recover("unknown exception");
        }
    }
}

void Engine::recover(const char* what) {
    // A step failed outside any one request: the running requests' KV and samplers
    // are in an unknown state, so they fail; waiting requests are untouched. A fault
    // that repeats step after step would spin: after a few, the engine stops.
    {
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.internal_errors++;
    }
    const std::string msg = std::string("internal error in the engine: ") + what;
    for (auto& r : scheduler_->take_running()) {
        try {
            if (r->seq >= 0) finish(r.get(), "error", "EngineError", msg);
        } catch (...) {
            // finish() itself failed: still never leave the caller waiting.
            std::lock_guard<std::mutex> lock(r->mu);
            r->finish_reason = "error";
            r->error_kind = "EngineError";
            r->error_message = msg;
            r->done = true;
            r->cv.notify_all();
        }
    }
    if (++failed_steps_ >= 8) {
        {
            std::lock_guard<std::mutex> lock(mu_);
            broken_ = msg;
        }
        try {
            fail_all("EngineError", msg);
        } catch (...) {
        }
    }
}

bool Engine::step() {
    std::deque<std::function<void()>> tasks;
    std::vector<llama_adapter_lora*> to_free;
    if (scheduler_->idle() && busy_since_idle_) {
        // Going idle: hand the pages freed while serving back to the OS, so the host's
        // memory after a burst of calls is what it was before (glibc keeps them otherwise).
        busy_since_idle_ = false;
#if defined(__GLIBC__)
        malloc_trim(0);
#endif
    }
    {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return stop_ || !incoming_.empty() || !scheduler_->idle() || !tasks_.empty(); });
        while (!incoming_.empty()) {
            scheduler_->add(std::move(incoming_.front()));
            incoming_.pop_front();
        }
        publish_queue_depth();  // under the same lock: a drained request is counted throughout
        tasks.swap(tasks_);
        // Adapters whose unload was requested are freed once nothing uses them.
        for (auto it = adapters_.begin(); it != adapters_.end();) {
            if (it->second.unload_pending && it->second.users == 0) {
                to_free.push_back(it->second.ptr);
                it = adapters_.erase(it);
            } else {
                ++it;
            }
        }
    }
    for (auto& task : tasks) task();  // a packaged_task: its exception goes to its caller
    if (!to_free.empty()) {
        llama_set_adapters_lora(ctx_, nullptr, 0, nullptr);  // never free an adapter set on the context
        current_adapter_key_.clear();
        for (auto* a : to_free) llama_adapter_lora_free(a);
    }
    if (stop_) {
        fail_all("EngineClosedError", "engine closed before the request finished");
        return false;
    }
    // Cancellations, wherever the request is.
    for (auto& r : scheduler_->take_cancelled_waiting()) finish(r.get(), "cancelled");
    for (auto& r : scheduler_->running())
        if (r->cancel_requested) finish(r.get(), "cancelled");
    scheduler_->remove_finished();

    start_admitted();
    {
        std::lock_guard<std::mutex> lock(mu_);
        publish_queue_depth();
    }
    if (!scheduler_->running().empty()) busy_since_idle_ = true;
    {
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.running = int(scheduler_->running().size());
        stats_.waiting = int(scheduler_->n_waiting());
        stats_.cached_sequences = kv_->cached_sequences();
        stats_.tokens_reused = kv_->reused_tokens();
    }
    StepPlan plan = scheduler_->schedule();
    if (plan.empty()) return true;

    int ret = execute(plan);
    if (ret == 0) {
        failed_steps_ = 0;
        update(plan);
    } else if (ret == 1) {
        // No room in the KV cache: the scheduler evicts an idle prefix cache or
        // preempts a request; the next step retries with what remains.
        KvRelief relief = scheduler_->relieve_kv_pressure();
        if (relief == KvRelief::kNone) {
            Request* r = scheduler_->running().front().get();
            finish(r, "error", "ContextOverflowError", "the KV cache cannot hold this request (" +
                   std::to_string(r->tokens.size()) + " tokens, n_ctx=" + std::to_string(n_ctx_) + ")");
            scheduler_->remove_finished();
        } else {
            std::lock_guard<std::mutex> lock(stats_mu_);
            if (relief == KvRelief::kEvicted) stats_.evictions++;
            else stats_.preemptions++;
        }
    } else {
        std::string msg = ret == -100 ? "llama_set_adapters_lora failed"
                                      : "llama_decode failed with code " + std::to_string(ret) + ": " + log_last_errors();
        {
            std::lock_guard<std::mutex> lock(mu_);
            broken_ = msg;
        }
        fail_all("EngineError", msg);
    }
    return true;
}

}  // namespace mtllm
