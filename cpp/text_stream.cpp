#include "text_stream.h"

#include <algorithm>
#include <utility>

namespace mtllm {

size_t utf8_complete_prefix(const std::string& s) {
    // Walk back over at most 3 continuation bytes to the lead byte of the last char.
    size_t n = s.size();
    size_t i = n;
    int back = 0;
    while (i > 0 && back < 4) {
        unsigned char c = static_cast<unsigned char>(s[i - 1]);
        if ((c & 0xC0) != 0x80) {  // lead byte (or ASCII)
            size_t need = c < 0x80 ? 1 : (c >> 5) == 0x6 ? 2 : (c >> 4) == 0xE ? 3 : (c >> 3) == 0x1E ? 4 : 1;
            return (n - (i - 1)) >= need ? n : i - 1;
        }
        --i;
        ++back;
    }
    return n;  // malformed: do not hold bytes forever
}

TextStream::TextStream(std::vector<std::string> stops) : stops_(std::move(stops)) {
    stops_.erase(std::remove(stops_.begin(), stops_.end(), std::string()), stops_.end());
}

std::string TextStream::push(const std::string& piece, bool* stopped) {
    *stopped = false;
    pending_ += piece;
    if (!stops_.empty()) {
        // Emitted text never ends with a proper prefix of a stop string (those are
        // held back below), so a stop string cannot start in it: searching pending_
        // is enough. The earliest stop wins.
        size_t best = std::string::npos;
        for (const auto& s : stops_) {
            size_t p = pending_.find(s);
            if (p < best) best = p;
        }
        if (best != std::string::npos) {
            std::string out = pending_.substr(0, best);
            pending_.clear();
            *stopped = true;
            return out;
        }
    }
    size_t emit = utf8_complete_prefix(pending_);
    // Hold back the longest suffix that is a proper prefix of a stop string.
    for (const auto& s : stops_) {
        size_t max_k = std::min(s.size() - 1, pending_.size());
        for (size_t k = max_k; k > 0; --k) {
            if (pending_.compare(pending_.size() - k, k, s, 0, k) == 0) {
                emit = std::min(emit, pending_.size() - k);
                break;
            }
        }
    }
    std::string out = pending_.substr(0, emit);
    pending_.erase(0, emit);
    return out;
}

std::string TextStream::flush() {
    std::string out;
    out.swap(pending_);
    return out;
}

}  // namespace mtllm
