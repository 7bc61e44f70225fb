#include "log_sink.h"

#include <deque>
#include <mutex>

#include "llama.h"

namespace mtllm {
namespace {

std::mutex g_mu;
LogSink g_sink;
int g_min_level = GGML_LOG_LEVEL_WARN;
std::deque<std::string> g_errors;  // bounded: only the tail explains a failure
int g_last_level = GGML_LOG_LEVEL_NONE;

void on_log(ggml_log_level level, const char* text, void*) {
    std::string line = text ? text : "";
    LogSink sink;
    {
        std::lock_guard<std::mutex> lock(g_mu);
        // GGML_LOG_LEVEL_CONT continues the previous line at its level.
        int effective = level == GGML_LOG_LEVEL_CONT ? g_last_level : int(level);
        if (level != GGML_LOG_LEVEL_CONT) g_last_level = level;
        if (effective >= GGML_LOG_LEVEL_WARN) {
            g_errors.push_back(line);
            while (g_errors.size() > 16) g_errors.pop_front();
        }
        if (!g_sink || effective < g_min_level) return;
        sink = g_sink;
    }
    sink(int(level == GGML_LOG_LEVEL_CONT ? g_last_level : level), line);
}

}  // namespace

void log_install() { llama_log_set(on_log, nullptr); }

void log_set_sink(LogSink sink, int min_level) {
    std::lock_guard<std::mutex> lock(g_mu);
    g_sink = std::move(sink);
    g_min_level = min_level;
}

std::string log_last_errors() {
    std::lock_guard<std::mutex> lock(g_mu);
    std::string out;
    for (const auto& l : g_errors) out += l;
    while (!out.empty() && (out.back() == '\n' || out.back() == ' ')) out.pop_back();
    return out;
}

void log_clear_errors() {
    std::lock_guard<std::mutex> lock(g_mu);
    g_errors.clear();
}

}  // namespace mtllm
