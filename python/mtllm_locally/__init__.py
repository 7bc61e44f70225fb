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

from .chat import ChatTemplate
from .engine import (
    Completion,
    Engine,
    EngineConfig,
    ModelInfo,
    Request,
    SamplingParams,
    StreamChunk,
    route_llama_logs_to_logging,
    silence_llama_logs,
)
from .learn.policy import configure as configure_learning
from .serve.recorder import feedback
