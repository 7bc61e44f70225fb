// `_engine._internals`: the scheduler, the KV cache manager and the text stream,
// bound for unit tests only (tests/test_scheduler.py and siblings). The KV cache
// manager runs against FakeKvMemory, which records the llama.cpp memory calls it
// would make; requests are made here without a model. Not a public API.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine.h"
#include "errors.h"
#include "kv_cache_manager.h"
#include "scheduler.h"
#include "text_stream.h"

namespace py = pybind11;
using namespace mtllm;

namespace {

// Records calls as tuples: ("rm", seq, p0, p1) and ("cp", src, dst, p0, p1).
// fail_partial_rm mimics a memory that cannot drop part of a sequence (recurrent models);
// pos_min[seq] what seq_pos_min answers (0 when unset: every cell still there).
class FakeKvMemory final : public KvMemory {
public:
    int seq_pos_min(int seq) override {
        auto it = pos_min.find(seq);
        return it == pos_min.end() ? 0 : it->second;
    }
    std::map<int, int> pos_min;
    bool seq_rm(int seq, int p0, int p1) override {
        calls.push_back(py::make_tuple("rm", seq, p0, p1));
        return !(fail_partial_rm && p0 > 0);
    }
    void seq_cp(int src, int dst, int p0, int p1) override { calls.push_back(py::make_tuple("cp", src, dst, p0, p1)); }
    std::vector<py::tuple> calls;
    bool fail_partial_rm = false;
};

// A scheduler with the KV cache manager it reaches llama.cpp through, kept together
// so that Python cannot free one before the other.
struct SchedulerHarness {
    SchedulerHarness(int budget, int max_running, std::shared_ptr<KvCacheManager> kv_)
        : kv(std::move(kv_)), scheduler(budget, max_running, *kv) {}
    std::shared_ptr<KvCacheManager> kv;
    Scheduler scheduler;
    StepPlan last_plan;  // slices point at running requests: kept here, read by index
};

std::vector<uint64_t> ids(const std::vector<std::shared_ptr<Request>>& v) {
    std::vector<uint64_t> out;
    for (const auto& r : v) out.push_back(r->id);
    return out;
}

void check_seq(const KvCacheManager& kv, int seq) {
    if (seq < 0 || seq >= kv.n_seq()) throw InvalidRequestError("no sequence " + std::to_string(seq));
}

}  // namespace

void bind_internals(py::module_& parent) {
    py::module_ m = parent.def_submodule("_internals", "Scheduler, KV cache manager and text stream, for unit tests only");

    m.def("make_request", [](uint64_t id, std::vector<llama_token> prompt, AdapterSet adapters, bool logits_all, bool per_row) {
              auto r = std::make_shared<Request>();
              r->id = id;
              r->prompt = std::move(prompt);
              r->tokens = r->prompt;
              r->params.logits_all = logits_all;
              std::sort(adapters.begin(), adapters.end());
              r->adapters = adapters;
              r->key = adapter_key(r->adapters);
              r->group = per_row ? std::string() : r->key;
              return r;
          }, py::arg("id"), py::arg("prompt"), py::arg("adapters") = AdapterSet{}, py::arg("logits_all") = false,
          py::arg("per_row") = false,
          "A request as the engine's submit makes it (no sampler, no model); per_row: its adapters are applied per row.");
    m.def("progress", [](const Request& r) {
              py::dict d;
              d["tokens"] = r.tokens;
              d["n_computed"] = r.n_computed;
              d["seq"] = r.seq;
              d["key"] = r.key;
              d["preemptions"] = r.stats.preemptions;
              return d;
          }, "The scheduler-side state of a request.");
    m.def("append_token", [](Request& r, llama_token t) { r.tokens.push_back(t); },
          "What sampling does: one more known token.");
    m.def("adapter_key", &adapter_key);

    py::class_<FakeKvMemory, std::shared_ptr<FakeKvMemory>>(m, "FakeKvMemory")
        .def(py::init<>())
        .def_readonly("calls", &FakeKvMemory::calls)
        .def("clear_calls", [](FakeKvMemory& f) { f.calls.clear(); })
        .def_readwrite("fail_partial_rm", &FakeKvMemory::fail_partial_rm)
        .def_readwrite("pos_min", &FakeKvMemory::pos_min);

    py::class_<KvCacheManager, std::shared_ptr<KvCacheManager>>(m, "KvCacheManager")
        .def(py::init([](std::shared_ptr<FakeKvMemory> mem, int n_seq, bool prefix_reuse, int n_swa) {
                 if (n_seq < 1) throw InvalidRequestError("n_seq must be >= 1");
                 return std::make_shared<KvCacheManager>(std::move(mem), n_seq, prefix_reuse, n_swa);
             }), py::arg("memory"), py::arg("n_seq"), py::arg("prefix_reuse") = true, py::arg("n_swa") = 0)
        .def("acquire", [](KvCacheManager& kv, const std::vector<llama_token>& tokens, const std::string& key,
                           bool allow_reuse) -> py::object {
                 SlotPlan plan;
                 if (!kv.acquire(tokens, key, allow_reuse, &plan)) return py::none();
                 return py::make_tuple(plan.seq, plan.n_reuse);
             }, py::arg("tokens"), py::arg("key") = "", py::arg("allow_reuse") = true,
             "(seq, n_reuse), or None when every sequence is busy.")
        .def("on_computed", [](KvCacheManager& kv, int seq, const std::vector<llama_token>& tokens) {
                 check_seq(kv, seq);
                 kv.on_computed(seq, tokens.data(), int(tokens.size()));
             }, py::arg("seq"), py::arg("tokens"))
        .def("release", [](KvCacheManager& kv, int seq) { check_seq(kv, seq); kv.release(seq); }, py::arg("seq"))
        .def("drop", [](KvCacheManager& kv, int seq) { check_seq(kv, seq); kv.drop(seq); }, py::arg("seq"))
        .def("evict_one", &KvCacheManager::evict_one)
        .def_property_readonly("n_seq", &KvCacheManager::n_seq)
        .def_property_readonly("reused_tokens", &KvCacheManager::reused_tokens)
        .def_property_readonly("cached_sequences", &KvCacheManager::cached_sequences);

    py::class_<SchedulerHarness>(m, "Scheduler")
        .def(py::init([](int budget, int max_running, std::shared_ptr<KvCacheManager> kv) {
                 if (budget < 1 || max_running < 1) throw InvalidRequestError("budget and max_running must be >= 1");
                 return new SchedulerHarness(budget, max_running, std::move(kv));
             }), py::arg("token_budget"), py::arg("max_running"), py::arg("kv"))
        .def("add", [](SchedulerHarness& h, std::shared_ptr<Request> r) { h.scheduler.add(std::move(r)); })
        .def("admit", [](SchedulerHarness& h) { return ids(h.scheduler.admit()); }, "Ids admitted, in order.")
        .def("schedule", [](SchedulerHarness& h) {
                 h.last_plan = h.scheduler.schedule();
                 py::list slices;
                 for (const auto& s : h.last_plan.slices)
                     slices.append(py::make_tuple(s.request->id, s.start, s.n_tokens, s.sample));
                 py::dict d;
                 d["adapter_key"] = h.last_plan.adapter_key;
                 d["adapters"] = h.last_plan.adapters;
                 d["n_tokens"] = h.last_plan.n_tokens;
                 d["slices"] = slices;  // (request id, start, n_tokens, sample)
                 return d;
             })
        .def("computed", [](SchedulerHarness& h) {
                 for (const auto& s : h.last_plan.slices) h.scheduler.on_computed(s);
                 h.last_plan = StepPlan{};
             }, "Reports the last plan decoded (each slice's KV is in the cache).")
        .def("relieve_kv_pressure", [](SchedulerHarness& h) {
                 h.last_plan = StepPlan{};  // a preemption may free a request the plan points at
                 switch (h.scheduler.relieve_kv_pressure()) {
                     case KvRelief::kEvicted: return "evicted";
                     case KvRelief::kPreempted: return "preempted";
                     default: return "none";
                 }
             })
        .def("finish", [](SchedulerHarness& h, uint64_t id, bool keep_cache) {
                 h.last_plan = StepPlan{};
                 for (const auto& r : h.scheduler.running())
                     if (r->id == id) {
                         h.scheduler.release(r.get(), keep_cache);
                         h.scheduler.remove_finished();
                         return;
                     }
                 throw InvalidRequestError("request " + std::to_string(id) + " is not running");
             }, py::arg("id"), py::arg("keep_cache") = true, "What the engine does when a request ends.")
        .def("take_cancelled_waiting", [](SchedulerHarness& h) { return ids(h.scheduler.take_cancelled_waiting()); })
        .def("take_all", [](SchedulerHarness& h) {
                 h.last_plan = StepPlan{};
                 return ids(h.scheduler.take_all());
             })
        .def_property_readonly("running", [](const SchedulerHarness& h) { return ids(h.scheduler.running()); })
        .def_property_readonly("waiting", [](const SchedulerHarness& h) {
                 std::vector<uint64_t> out;
                 for (const auto& r : h.scheduler.waiting()) out.push_back(r->id);
                 return out;
             })
        .def_property_readonly("kv_pressure", [](const SchedulerHarness& h) { return h.scheduler.kv_pressure(); })
        .def_property_readonly("budget", [](const SchedulerHarness& h) { return h.scheduler.budget(); });

    py::class_<TextStream>(m, "TextStream")
        .def(py::init<std::vector<std::string>>(), py::arg("stops"))
        .def("push", [](TextStream& t, py::bytes piece) {
                 bool stopped = false;
                 std::string out = t.push(std::string(piece), &stopped);
                 return py::make_tuple(py::bytes(out), stopped);
             }, py::arg("piece"), "(newly visible bytes, stopped)")
        .def("flush", [](TextStream& t) { return py::bytes(t.flush()); });
    m.def("utf8_complete_prefix", [](py::bytes s) { return utf8_complete_prefix(std::string(s)); });
}
