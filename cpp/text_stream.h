// Turns generated token pieces into text a caller may see now: it holds back an
// incomplete UTF-8 character and any tail that could still grow into a stop
// string, so a streamed response never shows a stop string or half a character.
#pragma once
#include <string>
#include <vector>

namespace mtllm {

class TextStream {
public:
    explicit TextStream(std::vector<std::string> stops);

    // Appends a piece; returns the newly visible text. Sets *stopped when a stop
    // string completed (the stop string and everything after it are dropped).
    std::string push(const std::string& piece, bool* stopped);
    // End of generation: releases held-back text (a partial stop is just text).
    std::string flush();

private:
    std::vector<std::string> stops_;
    std::string pending_;  // received, not yet emitted
};

// Length of the longest prefix of s that ends on a UTF-8 character boundary.
size_t utf8_complete_prefix(const std::string& s);

}  // namespace mtllm
