"""The vLLM client lives in state/ (the learning loop pushes adapters with it); kept here for
code that imported it from serve/."""

from ..state.vllm_target import VLLMError, VLLMTarget  # noqa: F401
