"""mtllm_locally: run Jaclang's `by llm()` in-process on a local GGUF model."""

from .errors import (
    AdapterLoadError,
    ContextOverflowError,
    EngineClosedError,
    EngineError,
    InvalidRequestError,
    ModelLoadError,
    MtllmError,
    OverloadedError,
    RequestCancelled,
    TemplateError,
)

__version__ = "0.1.0"
