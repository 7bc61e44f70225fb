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
    : model_(std::move(model)), params_(params), scheduler_(params.n_batch) {
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
    // Sliding-window layers (Gemma 3, ...) otherwise drop cells that left the window,
    // and a reused prefix would then attend to cells that are gone.
    cp.swa_full = true;
    cp.no_perf = true;
    cp.flash_attn_type = params_.flash_attn < 0 ? LLAMA_FLASH_ATTN_TYPE_AUTO
                         : params_.flash_attn == 0 ? LLAMA_FLASH_ATTN_TYPE_DISABLED : LLAMA_FLASH_ATTN_TYPE_ENABLED;
    if (params_.kv_f32) {
        cp.type_k = GGML_TYPE_F32;
        cp.type_v = GGML_TYPE_F32;
    }
    log_clear_errors();
    ctx_ = llama_init_from_model(model_->get(), cp);
    if (!ctx_) throw ModelLoadError("cannot create a llama.cpp context: " + log_last_errors());
    n_ctx_ = int(llama_n_ctx_seq(ctx_));
    // llama.cpp caps n_batch at n_ctx; a step larger than its cap is a GGML_ASSERT.
    scheduler_.set_budget(int(llama_n_batch(ctx_)));
    kv_ = std::make_unique<KvCacheManager>(llama_get_memory(ctx_), n_seq_max_, params_.prefix_reuse);
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
        run_with_big_stack([&] { r->constraint = std::make_unique<Constraint>(tok, constraint_kind, constraint_data); });
    }
    {
        std::lock_guard<std::mutex> lock(mu_);
        if (closed_) throw EngineClosedError("engine is closed");
        if (!broken_.empty()) throw EngineClosedError("engine stopped after a fatal error: " + broken_);
        if (n_waiting_shared_ >= size_t(params_.max_queued))
            throw OverloadedError("engine overloaded: " + std::to_string(n_waiting_shared_) +
                                  " requests already waiting (max_queued=" + std::to_string(params_.max_queued) + ")");
        for (size_t i = 0; i < r->adapters.size(); ++i) {
            auto it = adapters_.find(r->adapters[i].first);
            if (it == adapters_.end() || it->second.unload_pending)
                throw InvalidRequestError("adapter " + std::to_string(r->adapters[i].first) + " is not loaded");
            if (i > 0 && r->adapters[i].first == r->adapters[i - 1].first)
                throw InvalidRequestError("adapter " + std::to_string(r->adapters[i].first) + " named twice");
        }
        for (auto& [id, scale] : r->adapters) adapters_[id].users++;
        r->id = next_id_++;
        incoming_.push_back(r);
        ++n_waiting_shared_;
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
        std::lock_guard<std::mutex> lock(mu_);
        uint64_t id = next_adapter_id_++;
        adapters_[id] = LoadedAdapter{a, path, 0, false};
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

void Engine::finish(Request* r, const std::string& reason, const std::string& err_kind, const std::string& err_msg) {
    std::string tail = r->stream ? r->stream->flush() : std::string();
    int64_t t = now_us();
    {
        std::lock_guard<std::mutex> lock(r->mu);
        r->finish_reason = reason;
        r->error_kind = err_kind;
        r->error_message = err_msg;
        r->stats.completion_tokens = r->n_generated;
        r->stats.total_ms = double(t - r->t_submit_us) / 1000.0;
        if (r->stats.ttft_ms == 0 && r->n_generated > 0) r->stats.ttft_ms = r->stats.total_ms;
    }
    if (r->seq >= 0) {
        if (err_kind.empty()) kv_->release(r->seq);
        else kv_->drop(r->seq);
        r->seq = -1;
        kv_pressure_ = false;  // its cells are free: waiting requests may be admitted again
    }
    {
        std::lock_guard<std::mutex> lock(mu_);
        for (auto& [id, scale] : r->adapters) adapters_[id].users--;
    }
    {
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.requests_finished++;
    }
    deliver(r, tail, {}, true);
}

void Engine::fail_all(const std::string& kind, const std::string& msg) {
    for (auto& r : running_) finish(r.get(), "error", kind, msg);
    running_.clear();
    for (auto& r : waiting_) finish(r.get(), "error", kind, msg);
    waiting_.clear();
    std::deque<std::shared_ptr<Request>> incoming;
    {
        std::lock_guard<std::mutex> lock(mu_);
        incoming.swap(incoming_);
        n_waiting_shared_ = 0;
    }
    for (auto& r : incoming) finish(r.get(), "error", kind, msg);
}

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

void Engine::admit() {
    if (running_.empty()) kv_pressure_ = false;
    while (!waiting_.empty() && int(running_.size()) < params_.max_running && !kv_pressure_) {
        std::shared_ptr<Request> r = waiting_.front();
        SlotPlan plan;
        // logits_all wants every prompt position's logits, so it cannot start from a cached prefix.
        if (!kv_->acquire(r->tokens, r->key, !r->params.logits_all, &plan)) break;
        waiting_.pop_front();
        {
            std::lock_guard<std::mutex> lock(mu_);
            --n_waiting_shared_;
        }
        r->seq = plan.seq;
        r->n_computed = plan.n_reuse;
        try {
            if (!r->admitted_once) {
                r->admitted_once = true;
                r->t_admit_us = now_us();
                r->stats.cached_tokens = plan.n_reuse;
                r->stats.queue_ms = double(r->t_admit_us - r->t_submit_us) / 1000.0;
                build_sampler(r.get());
                if (r->params.logits_all) r->logits.reserve(r->prompt.size() * size_t(model_->n_vocab()));
            }
        } catch (const std::exception& e) {
            finish(r.get(), "error", "EngineError", std::string("cannot start the request: ") + e.what());
            continue;
        }
        running_.push_back(std::move(r));
    }
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
        }
    }
    int wanted = wanted_threads_.load();
    int threads = wanted > 0 ? std::min(wanted, configured_threads_) : configured_threads_;
    if (threads != applied_threads_.load()) {
        llama_set_n_threads(ctx_, threads, threads);
        applied_threads_.store(threads);
    }
    int64_t t0 = now_us();
    int ret = llama_decode(ctx_, batch_);
    std::lock_guard<std::mutex> lock(stats_mu_);
    stats_.decode_ms += double(now_us() - t0) / 1000.0;
    if (ret == 0) {
        stats_.steps++;
        stats_.tokens_decoded += uint64_t(batch_.n_tokens);
    }
    return ret;
}

bool Engine::handle_no_kv_slot(const StepPlan& plan) {
    // No room in the KV cache: first drop idle prefix caches, then preempt the most
    // recently admitted request (it recomputes later, keeping what it generated).
    if (kv_->evict_one()) {
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.evictions++;
        return true;
    }
    if (running_.size() > 1) {
        auto victim = running_.back();
        running_.pop_back();
        kv_->drop(victim->seq);
        victim->seq = -1;
        victim->n_computed = 0;
        victim->stats.preemptions++;
        {
            std::lock_guard<std::mutex> lock(victim->mu);
            victim->logits.clear();  // recomputed from the first prompt token
        }
        waiting_.push_front(victim);
        kv_pressure_ = true;
        {
            std::lock_guard<std::mutex> lock(mu_);
            ++n_waiting_shared_;
        }
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.preemptions++;
        return true;
    }
    return false;
}

void Engine::sample_next(Request* r, int batch_index) {
    if (r->params.max_tokens == 0) {
        finish(r, "length");
        return;
    }
    llama_token tok = llama_sampler_sample(r->sampler, ctx_, batch_index);
    if (r->n_generated == 0) {
        std::lock_guard<std::mutex> lock(r->mu);
        r->stats.ttft_ms = double(now_us() - r->t_submit_us) / 1000.0;
    }
    r->n_generated++;
    {
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.tokens_generated++;
    }
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
        if (i > 0) {
            r->n_generated++;
            std::lock_guard<std::mutex> lock(stats_mu_);
            stats_.tokens_generated++;
        }
        r->tokens.push_back(t);
        bool stopped = false;
        std::string text = r->stream->push(model_->token_piece(t, false), &stopped);
        deliver(r, text, {t}, false);
        if (stopped) return finish(r, "stop");
        if (r->n_generated >= r->params.max_tokens) return finish(r, "length");
        if (int(r->tokens.size()) >= n_ctx_) return finish(r, "length");
        if (i == 0 && r->constraint) forced = r->constraint->take_forced();
        if (i < forced.size()) continue;
        // The grammar's state is past every forced token only now.
        if (r->constraint && r->constraint->error())
            return finish(r, "error", "EngineError", std::string("constraint failed: ") + r->constraint->error());
        if (r->constraint && r->constraint->finished()) return finish(r, "stop");  // grammar complete
        break;
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
            kv_->on_computed(r->seq, r->tokens.data() + s.start, s.n_tokens);
            if (r->params.logits_all) {
                std::lock_guard<std::mutex> lock(r->mu);  // the caller may be reading them
                for (int i = 0; i < s.n_tokens; ++i) {
                    if (s.start + i >= int(r->prompt.size())) break;
                    const float* row = llama_get_logits_ith(ctx_, batch_index - s.n_tokens + i);
                    r->logits.insert(r->logits.end(), row, row + n_vocab);
                }
            }
            r->n_computed += s.n_tokens;
            if (s.sample) sample_next(r, batch_index - 1);
        } catch (const std::exception& e) {
            fail_request(r, e.what());
        }
    }
    running_.erase(std::remove_if(running_.begin(), running_.end(),
                                  [](const std::shared_ptr<Request>& r) { return r->seq < 0; }),
                   running_.end());
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
    for (auto& r : running_) {
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
    running_.clear();
    kv_pressure_ = false;
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
    if (running_.empty() && waiting_.empty() && busy_since_idle_) {
        // Going idle: hand the pages freed while serving back to the OS, so the host's
        // memory after a burst of calls is what it was before (glibc keeps them otherwise).
        busy_since_idle_ = false;
#if defined(__GLIBC__)
        malloc_trim(0);
#endif
    }
    {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] {
            return stop_ || !incoming_.empty() || !running_.empty() || !waiting_.empty() || !tasks_.empty();
        });
        while (!incoming_.empty()) {
            waiting_.push_back(std::move(incoming_.front()));
            incoming_.pop_front();
        }
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
    for (auto it = waiting_.begin(); it != waiting_.end();) {
        if ((*it)->cancel_requested) {
            finish(it->get(), "cancelled");
            it = waiting_.erase(it);
            std::lock_guard<std::mutex> lock(mu_);
            --n_waiting_shared_;
        } else {
            ++it;
        }
    }
    for (auto& r : running_)
        if (r->cancel_requested) finish(r.get(), "cancelled");
    running_.erase(std::remove_if(running_.begin(), running_.end(), [](const auto& r) { return r->seq < 0; }),
                   running_.end());

    admit();
    if (!running_.empty()) busy_since_idle_ = true;
    {
        std::lock_guard<std::mutex> lock(stats_mu_);
        stats_.running = int(running_.size());
        stats_.waiting = int(waiting_.size());
        stats_.cached_sequences = kv_->cached_sequences();
        stats_.tokens_reused = kv_->reused_tokens();
    }
    StepPlan plan = scheduler_.schedule([&] {
        std::vector<Request*> v;
        for (auto& r : running_) v.push_back(r.get());
        return v;
    }());
    if (plan.empty()) return true;

    int ret = execute(plan);
    if (ret == 0) {
        failed_steps_ = 0;
        update(plan);
    } else if (ret == 1) {
        if (!handle_no_kv_slot(plan)) {
            Request* r = running_.front().get();
            finish(r, "error", "ContextOverflowError", "the KV cache cannot hold this request (" +
                   std::to_string(r->tokens.size()) + " tokens, n_ctx=" + std::to_string(n_ctx_) + ")");
            running_.erase(running_.begin());
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
