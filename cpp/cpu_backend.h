// Which of the CPU backend's extra weight buffer types llama.cpp may use.
//
// llama.cpp places a weight in the first "extra" buffer type whose kernels support
// it (AMX, KleidiAI, CPU_REPACK, ...) before plain CPU memory. Its AMX matmul
// segfaults on any batch of more than one token (llama.cpp #20824, closed without
// a fix), and an in-process runtime may not crash its host, so AMX is left out by
// default while the others stay. The list is the CPU backend's own, process-wide:
// a model loaded afterwards, by us or by anything else in the process, sees it.
#pragma once
#include <string>
#include <vector>

namespace mtllm {

// Names of the extra buffer types this llama.cpp build and CPU offer, in order.
std::vector<std::string> cpu_extra_buffer_types_available();
// Names of those llama.cpp will use for models loaded from now on.
std::vector<std::string> cpu_extra_buffer_types_enabled();
// Keep only the available types whose names are in `names` (order preserved).
// Returns what is enabled afterwards; names that are not available are ignored.
std::vector<std::string> cpu_extra_buffer_types_enable(const std::vector<std::string>& names);

}  // namespace mtllm
