// pybind11 only: classes, exception translation and the GIL. Validation of
// arguments happens in Python (mtllm_locally/engine.py); execution happens here.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "cpu_backend.h"
#include "engine.h"
#include "errors.h"
#include "log_sink.h"
#include "model.h"

namespace py = pybind11;
using namespace mtllm;

void bind_internals(py::module_& parent);  // bindings_internals.cpp: _engine._internals, for unit tests

namespace {

// Objects whose destructor joins a thread that may call back into Python (the
// log sink) must be destroyed without holding the GIL.
template <typename T>
std::shared_ptr<T> make_gil_free_deleting(T* p) {
    return std::shared_ptr<T>(p, [](T* q) {
        if (Py_IsInitialized() && PyGILState_Check()) {
            py::gil_scoped_release release;
            delete q;
        } else {
            delete q;
        }
    });
}

[[noreturn]] void raise_python(const char* cls, const std::string& msg) {
    py::object errors = py::module_::import("mtllm_locally.errors");
    PyErr_SetString(errors.attr(cls).ptr(), msg.c_str());
    throw py::error_already_set();
}

py::dict stats_dict(const RequestStats& s) {
    py::dict d;
    d["prompt_tokens"] = s.prompt_tokens;
    d["cached_tokens"] = s.cached_tokens;
    d["completion_tokens"] = s.completion_tokens;
    d["preemptions"] = s.preemptions;
    d["queue_ms"] = s.queue_ms;
    d["ttft_ms"] = s.ttft_ms;
    d["total_ms"] = s.total_ms;
    return d;
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
    m.doc() = "mtllm_locally native engine over llama.cpp (private; use mtllm_locally.Engine)";
    m.attr("__version__") = MTLLM_VERSION;
    llama_backend_init();
    log_install();

    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const ModelLoadError& e) { raise_python("ModelLoadError", e.what());
        } catch (const AdapterLoadError& e) { raise_python("AdapterLoadError", e.what());
        } catch (const ContextOverflowError& e) { raise_python("ContextOverflowError", e.what());
        } catch (const OverloadedError& e) { raise_python("OverloadedError", e.what());
        } catch (const EngineClosedError& e) { raise_python("EngineClosedError", e.what());
        } catch (const InvalidRequestError& e) { raise_python("InvalidRequestError", e.what());
        } catch (const EngineError& e) { raise_python("EngineError", e.what());
        }
    });

    m.def("set_log_sink", [](py::object sink, int min_level) {
        if (sink.is_none()) {
            log_set_sink(nullptr, min_level);
            return;
        }
        auto fn = std::make_shared<py::object>(sink);
        log_set_sink([fn](int level, const std::string& text) {
            if (!Py_IsInitialized()) return;
            py::gil_scoped_acquire gil;
            try {
                (*fn)(level, text);
            } catch (py::error_already_set& e) {
                e.discard_as_unraisable("mtllm_locally log sink");
            }
        }, min_level);
    }, py::arg("sink"), py::arg("min_level") = 3,
       "Forward llama.cpp log lines (level, text) to `sink`; None silences them (default).");
    m.def("last_log_errors", &log_last_errors);
    m.def("system_info", [] { return std::string(llama_print_system_info()); });
    m.def("llama_version", [] { const char* v = llama_version(); return std::string(v ? v : ""); },
          "The linked llama.cpp's version string (build number and commit).");
    m.def("supports_gpu_offload", [] { return llama_supports_gpu_offload(); },
          "Whether the linked llama.cpp has a backend n_gpu_layers can offload to (CUDA, Metal, ...).");
    m.def("cpu_extra_buffer_types_available", &cpu_extra_buffer_types_available,
          "Extra CPU weight buffer types (AMX, CPU_REPACK, ...) this llama.cpp build offers on this CPU.");
    m.def("cpu_extra_buffer_types_enabled", &cpu_extra_buffer_types_enabled,
          "Those that models loaded from now on will use.");
    m.def("cpu_extra_buffer_types_enable", &cpu_extra_buffer_types_enable, py::arg("names"),
          "Use only these (process-wide, for models loaded from now on); returns the enabled list.");
    {
        py::dict limits;
        limits["max_stops"] = kMaxStops;
        limits["max_stop_bytes"] = kMaxStopBytes;
        limits["max_grammar_bytes"] = kMaxGrammarBytes;
        limits["max_adapter_scale"] = kMaxAdapterScale;
        limits["max_logits_floats"] = kMaxLogitsFloats;
        limits["max_closing_tokens"] = kMaxClosingTokens;
        m.attr("limits") = limits;
    }
    m.def("max_parallel_sequences", [] { return llama_max_parallel_sequences(); });
    m.def("quantize", [](const std::string& src, const std::string& dst, int ftype, int nthread) {
        llama_model_quantize_params qp = llama_model_quantize_default_params();
        qp.ftype = llama_ftype(ftype);
        qp.nthread = nthread;
        qp.allow_requantize = true;
        uint32_t rc;
        {
            py::gil_scoped_release release;
            log_clear_errors();
            rc = llama_model_quantize(src.c_str(), dst.c_str(), &qp);
        }
        if (rc != 0) throw ModelLoadError("quantizing '" + src + "' failed: " + log_last_errors());
    }, py::arg("src"), py::arg("dst"), py::arg("ftype"), py::arg("nthread") = 0);

    py::class_<ModelParams>(m, "ModelParams")
        .def(py::init<>())
        .def_readwrite("n_gpu_layers", &ModelParams::n_gpu_layers)
        .def_readwrite("use_mmap", &ModelParams::use_mmap)
        .def_readwrite("use_repack", &ModelParams::use_repack)
        .def_readwrite("vocab_only", &ModelParams::vocab_only);

    py::class_<Model, std::shared_ptr<Model>>(m, "Model")
        .def(py::init([](const std::string& path, const ModelParams& p) {
                 py::gil_scoped_release release;
                 return std::make_shared<Model>(path, p);
             }), py::arg("path"), py::arg("params") = ModelParams())
        .def("tokenize", &Model::tokenize, py::arg("text"), py::arg("add_special"), py::arg("parse_special"),
             py::call_guard<py::gil_scoped_release>())
        .def("detokenize", &Model::detokenize, py::arg("tokens"), py::arg("special") = false,
             py::call_guard<py::gil_scoped_release>())
        .def("token_piece", [](const Model& m_, llama_token t, bool special) {
                 if (t < 0 || t >= m_.n_vocab()) throw InvalidRequestError("token id out of range");
                 return py::bytes(m_.token_piece(t, special));
             }, py::arg("token"), py::arg("special") = false)
        .def("is_eog", &Model::is_eog)
        .def("meta", &Model::meta)
        .def("metadata", &Model::metadata)
        .def_property_readonly("chat_template", &Model::chat_template)
        .def_property_readonly("max_piece_bytes", &Model::max_piece_bytes)
        .def_property_readonly("chat_template_bytes", [](const Model& m_) { return py::bytes(m_.chat_template()); })
        .def("special_texts", [](const Model& m_) {
                 py::list out;
                 for (const auto& t : m_.special_texts()) out.append(py::bytes(t));
                 return out;
             }, "Texts of the tokens the tokenizer matches whole when parse_special is on (bytes).")
        .def_property_readonly("description", &Model::description)
        .def_property_readonly("path", &Model::path)
        .def_property_readonly("n_vocab", &Model::n_vocab)
        .def_property_readonly("n_ctx_train", &Model::n_ctx_train)
        .def_property_readonly("n_embd", &Model::n_embd)
        .def_property_readonly("n_layer", &Model::n_layer)
        .def_property_readonly("n_params", [](const Model& m_) { return llama_model_n_params(m_.get()); })
        .def_property_readonly("size_bytes", [](const Model& m_) { return llama_model_size(m_.get()); })
        .def_property_readonly("ftype", [](const Model& m_) { return int(llama_model_ftype(m_.get())); })
        .def_property_readonly("bos", [](const Model& m_) { return llama_vocab_bos(m_.vocab()); })
        .def_property_readonly("eos", [](const Model& m_) { return llama_vocab_eos(m_.vocab()); })
        .def_property_readonly("eot", [](const Model& m_) { return llama_vocab_eot(m_.vocab()); })
        .def_property_readonly("add_bos", [](const Model& m_) { return llama_vocab_get_add_bos(m_.vocab()); });

    py::class_<SamplingParams>(m, "SamplingParams")
        .def(py::init<>())
        .def_readwrite("max_tokens", &SamplingParams::max_tokens)
        .def_readwrite("temperature", &SamplingParams::temperature)
        .def_readwrite("top_p", &SamplingParams::top_p)
        .def_readwrite("top_k", &SamplingParams::top_k)
        .def_readwrite("min_p", &SamplingParams::min_p)
        .def_readwrite("repeat_penalty", &SamplingParams::repeat_penalty)
        .def_readwrite("repeat_last_n", &SamplingParams::repeat_last_n)
        .def_readwrite("seed", &SamplingParams::seed)
        .def_readwrite("stop", &SamplingParams::stop)
        .def_readwrite("ignore_eos", &SamplingParams::ignore_eos)
        .def_readwrite("logits_all", &SamplingParams::logits_all)
        .def_readwrite("loop_guard", &SamplingParams::loop_guard)
        .def_readwrite("close_at_budget", &SamplingParams::close_at_budget);

    py::class_<EngineParams>(m, "EngineParams")
        .def(py::init<>())
        .def_readwrite("n_ctx", &EngineParams::n_ctx)
        .def_readwrite("n_batch", &EngineParams::n_batch)
        .def_readwrite("max_running", &EngineParams::max_running)
        .def_readwrite("cache_sequences", &EngineParams::cache_sequences)
        .def_readwrite("max_queued", &EngineParams::max_queued)
        .def_readwrite("n_threads", &EngineParams::n_threads)
        .def_readwrite("prefix_reuse", &EngineParams::prefix_reuse)
        .def_readwrite("flash_attn", &EngineParams::flash_attn)
        .def_readwrite("kv_f32", &EngineParams::kv_f32)
        .def_readwrite("mixed_adapters", &EngineParams::mixed_adapters);

    py::class_<Request, std::shared_ptr<Request>>(m, "Request")
        .def_property_readonly("id", [](const Request& r) { return r.id; })
        .def("take", [](Request& r, int timeout_ms) {
                 Chunk c;
                 {
                     py::gil_scoped_release release;
                     c = r.take(timeout_ms);
                 }
                 return py::make_tuple(py::bytes(c.text), c.tokens, c.done);
             }, py::arg("timeout_ms") = -1,
             "Wait up to timeout_ms (-1: forever) for output: (utf-8 bytes, token ids, done).")
        .def("cancel", [](Request& r) { r.cancel_requested = true; })
        .def("outcome", [](Request& r) {
                 std::lock_guard<std::mutex> lock(r.mu);
                 py::dict d;
                 d["done"] = r.done;
                 d["finish_reason"] = r.finish_reason;
                 d["closed_by"] = r.closed_by;
                 d["error_kind"] = r.error_kind;
                 d["error_message"] = r.error_message;
                 d["stats"] = stats_dict(r.stats);
                 return d;
             })
        .def("logits", [](Request& r) {
                 std::lock_guard<std::mutex> lock(r.mu);
                 size_t width = size_t(r.n_vocab > 0 ? r.n_vocab : 1);
                 size_t rows = r.logits.size() / width;  // rows computed so far (whole rows only)
                 py::array_t<float> a({rows, width});
                 if (rows) std::memcpy(a.mutable_data(), r.logits.data(), rows * width * sizeof(float));
                 return a;
             });

    py::class_<Engine, std::shared_ptr<Engine>>(m, "Engine")
        .def(py::init([](std::shared_ptr<Model> model, const EngineParams& p) {
                 py::gil_scoped_release release;
                 return make_gil_free_deleting(new Engine(std::move(model), p));
             }), py::arg("model"), py::arg("params") = EngineParams())
        .def("submit", &Engine::submit, py::arg("prompt"), py::arg("params"), py::arg("adapters") = AdapterSet{},
             py::arg("notify") = false, py::arg("constraint_kind") = "", py::arg("constraint_data") = "",
             py::call_guard<py::gil_scoped_release>())
        .def("set_guidance_library", &Engine::set_guidance_library, py::arg("path"))
        .def("close", &Engine::close, py::call_guard<py::gil_scoped_release>())
        .def_property_readonly("closed", &Engine::closed)
        .def("wait_ready", &Engine::wait_ready, py::arg("timeout_ms"), py::call_guard<py::gil_scoped_release>())
        .def("load_adapter", &Engine::load_adapter, py::arg("path"), py::call_guard<py::gil_scoped_release>())
        .def("unload_adapter", &Engine::unload_adapter, py::arg("id"), py::call_guard<py::gil_scoped_release>())
        .def("set_threads", &Engine::set_threads, py::arg("n"))
        .def_property_readonly("threads", &Engine::threads)
        .def("adapters", [](const Engine& e) {
                 std::vector<AdapterInfo> list;
                 {
                     py::gil_scoped_release release;  // the engine's lock is never waited for with the GIL held
                     list = e.adapters();
                 }
                 py::list out;
                 for (const auto& a : list) out.append(py::make_tuple(a.id, a.path));
                 return out;
             })
        .def("stats", [](const Engine& e) {
                 EngineStats s = e.stats();
                 py::dict d;
                 d["steps"] = s.steps;
                 d["tokens_decoded"] = s.tokens_decoded;
                 d["tokens_generated"] = s.tokens_generated;
                 d["tokens_reused"] = s.tokens_reused;
                 d["preemptions"] = s.preemptions;
                 d["evictions"] = s.evictions;
                 d["internal_errors"] = s.internal_errors;
                 d["requests_finished"] = s.requests_finished;
                 d["running"] = s.running;
                 d["waiting"] = s.waiting;
                 d["cached_sequences"] = s.cached_sequences;
                 d["decode_ms"] = s.decode_ms;
                 d["adapter_switches"] = s.adapter_switches;
                 d["adapter_switch_ms"] = s.adapter_switch_ms;
                 d["row_lora_steps"] = s.row_lora_steps;
                 d["row_lora_ms"] = s.row_lora_ms;
                 d["closing_searches"] = s.closing_searches;
                 d["closing_checks"] = s.closing_checks;
                 d["closing_ms"] = s.closing_ms;
                 d["closed_by_budget"] = s.closed_by_budget;
                 d["closed_by_loop"] = s.closed_by_loop;
                 return d;
             })
        .def_property_readonly("n_ctx", &Engine::n_ctx)
        .def_property_readonly("n_seq_max", &Engine::n_seq_max)
        .def_property_readonly("model", &Engine::model);

    bind_internals(m);
}
