#include "cpu_backend.h"

#include <algorithm>
#include <mutex>

#include "ggml-backend.h"

namespace mtllm {

namespace {

// The CPU backend hands out a null-terminated array of its extra buffer types; the
// model loader walks that array. We remember the original entries once and rewrite
// the array's contents (never its size) to the enabled subset.
struct ExtraBufts {
    ggml_backend_buffer_type_t* array = nullptr;  // owned by ggml; nullptr-terminated
    std::vector<ggml_backend_buffer_type_t> original;
};

std::mutex g_mu;

ExtraBufts& extra_bufts() {
    static ExtraBufts e = [] {
        ExtraBufts out;
        ggml_backend_dev_t cpu = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
        if (!cpu) return out;
        auto get = (ggml_backend_dev_get_extra_bufts_t)ggml_backend_reg_get_proc_address(
            ggml_backend_dev_backend_reg(cpu), "ggml_backend_dev_get_extra_bufts");
        if (!get) return out;
        out.array = get(cpu);
        for (auto* p = out.array; p && *p; ++p) out.original.push_back(*p);
        return out;
    }();
    return e;
}

}  // namespace

std::vector<std::string> cpu_extra_buffer_types_available() {
    std::lock_guard<std::mutex> lock(g_mu);
    std::vector<std::string> names;
    for (auto* b : extra_bufts().original) names.emplace_back(ggml_backend_buft_name(b));
    return names;
}

std::vector<std::string> cpu_extra_buffer_types_enabled() {
    std::lock_guard<std::mutex> lock(g_mu);
    std::vector<std::string> names;
    for (auto* p = extra_bufts().array; p && *p; ++p) names.emplace_back(ggml_backend_buft_name(*p));
    return names;
}

std::vector<std::string> cpu_extra_buffer_types_enable(const std::vector<std::string>& names) {
    {
        std::lock_guard<std::mutex> lock(g_mu);
        ExtraBufts& e = extra_bufts();
        if (e.array) {
            size_t n = 0;
            for (auto* b : e.original)
                if (std::find(names.begin(), names.end(), ggml_backend_buft_name(b)) != names.end()) e.array[n++] = b;
            for (size_t i = n; i <= e.original.size(); ++i) e.array[i] = nullptr;
        }
    }
    return cpu_extra_buffer_types_enabled();
}

}  // namespace mtllm
