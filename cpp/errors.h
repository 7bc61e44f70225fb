// The engine's error kinds. bindings.cpp maps each one to the Python class of the
// same name in mtllm_locally.errors; nothing here knows about Python.
#pragma once
#include <stdexcept>
#include <string>

namespace mtllm {

#define MTLLM_ERROR(Name)                                               \
    struct Name : std::runtime_error {                                  \
        explicit Name(const std::string& m) : std::runtime_error(m) {}  \
    };

MTLLM_ERROR(ModelLoadError)        // file missing, not a GGUF, unsupported architecture
MTLLM_ERROR(AdapterLoadError)      // adapter file rejected (other base model, corrupt)
MTLLM_ERROR(ContextOverflowError)  // prompt does not fit in the context
MTLLM_ERROR(OverloadedError)       // admission queue full
MTLLM_ERROR(EngineClosedError)     // engine closed (or stopped after a fatal error)
MTLLM_ERROR(InvalidRequestError)   // parameters the engine cannot execute
MTLLM_ERROR(EngineError)           // llama_decode failed fatally

#undef MTLLM_ERROR

}  // namespace mtllm
