"""The one place mtllm_locally's exceptions live.

The native engine raises these same classes (bindings.cpp looks them up here), so
C++, Python and the LiteLLM provider share one table of errors.
"""


class MtllmError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelLoadError(MtllmError):
    """The model file is missing, not a GGUF, corrupt, or of an unsupported architecture."""


class AdapterLoadError(MtllmError):
    """A LoRA adapter was rejected: corrupt, or made for another base model."""


class ContextOverflowError(MtllmError, ValueError):
    """The prompt does not fit in the context window."""


class OverloadedError(MtllmError):
    """Too many requests are waiting; retry later."""


class EngineClosedError(MtllmError):
    """The engine was closed, or stopped after a fatal error."""


class InvalidRequestError(MtllmError, ValueError):
    """Parameters that cannot be executed (bad range, wrong type, unknown adapter...)."""


class EngineError(MtllmError):
    """llama.cpp failed fatally while decoding; the engine stopped."""


class TemplateError(MtllmError, ValueError):
    """The model's chat template failed to render (or tried something unsafe)."""

