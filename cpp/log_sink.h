// llama.cpp logs through one process-wide callback. We keep it silent by default,
// remember the last error lines (they explain a failed load better than a NULL
// return does), and optionally forward everything to a sink (Python `logging`).
#pragma once
#include <functional>
#include <string>

namespace mtllm {

using LogSink = std::function<void(int level, const std::string& text)>;

void log_install();                       // route llama.cpp's log through us (silent)
void log_set_sink(LogSink sink, int min_level);  // empty sink = silent again
std::string log_last_errors();            // recent ERROR/WARN lines, newest last
void log_clear_errors();

}  // namespace mtllm
