"""mtllm_locally: run Jaclang's `by llm()` in-process on a local GGUF model."""

import os as _os

# No network: LiteLLM fetches its model cost map at import unless this is "True". The wheel's
# mtllm_locally-offline.pth sets it when the interpreter starts (so it holds even if litellm is
# imported first); this covers interpreters that skip .pth files (python -S, a source checkout).
_os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from .errors import (
    AdapterLoadError,
    ContextOverflowError,
    EngineClosedError,
    EngineError,
    InvalidRequestError,
    ModelLoadError,
    MtllmError,
    OverloadedError,
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

# The loops (serve/, learn/) load only when one of these is used: an engine user pays for neither.
_WIRED = ("feedback", "configure_learning", "register_provider", "runtime", "use_runtime")


def __getattr__(name: str):
    if name in _WIRED:
        from . import wiring

        return getattr(wiring, name)
    raise AttributeError(f"module 'mtllm_locally' has no attribute {name!r}")
