"""LiteLLM custom provider `mtllm_locally/<model>`: translation only. OpenAI-style
chat requests in (as LiteLLM hands them over) -> a CallRequest for the runtime's call
pipeline -> LiteLLM responses and stream chunks out. byllm's `Model(model_name=
"mtllm_locally/default")` reaches it through `litellm.completion` unchanged.

<model> is `default` (the embedded SmolLM2), `default-q4_1`, or a GGUF path.

Honoured: messages (string or text parts; system/user/assistant/tool roles; prior
tool calls and tool results), temperature, top_p, top_k, min_p, max_tokens /
max_completion_tokens, stop, seed, n, response_format (json_schema, json_object),
tools + tool_choice, stream, repeat_penalty. Ignored (accepted, no effect): user,
metadata (byllm's jac_caller_name / jac_invocation_id name the task and the call),
stream_options, parallel_tool_calls (one call per turn), timeout, api_key, api_base.
Anything else raises InvalidRequestError (as a 400), never a silent misbehaviour.

What the pipeline decides (greedy typed calls with a budget, loop guard and varied
retries, byllm's ReAct protocol, teacher, capture) is in pipeline.py, typed_calls.py
and react_guard.py. The temperature actually used, the prompt tokens served from the
prefix cache, the timings and `closed_by` (the engine closed a typed value: "budget"
or "loop"; finish_reason says "length" for a budget) are in the response's
`_hidden_params["mtllm_locally"]`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, AsyncIterator, Callable, Iterator

# No cost-map fetch at `import litellm`: set at interpreter start by mtllm_locally-offline.pth and by the
# package __init__ (so it holds whatever the program imported first); kept beside the import it protects.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from litellm import CustomLLM  # noqa: E402
from litellm.types.utils import ChatCompletionMessageToolCall, Choices, Function, Message, ModelResponse, Usage  # noqa: E402

from .. import errors  # noqa: E402
from .pipeline import Answer, CallRequest, TextDelta  # noqa: E402
from .runtime import Runtime  # noqa: E402

PROVIDER = "mtllm_locally"
SAMPLING_KEYS = ("temperature", "top_p", "top_k", "min_p", "seed", "stop", "repeat_penalty")
IGNORED_KEYS = frozenset({"user", "metadata", "stream_options", "parallel_tool_calls", "timeout", "api_key", "api_base",
                          "extra_body", "extra_headers", "max_retries", "drop_params", "stream"})
UNSUPPORTED_KEYS = ("logprobs", "top_logprobs", "logit_bias", "functions", "function_call", "audio", "modalities",
                    "prediction", "reasoning_effort", "web_search_options")


def status_code(e: Exception) -> int:
    if isinstance(e, errors.OverloadedError):
        return 429
    if isinstance(e, (errors.InvalidRequestError, errors.ContextOverflowError, errors.TemplateError,
                      errors.AdapterLoadError)):
        return 400
    if isinstance(e, errors.ModelLoadError):
        return 404
    return 500


def _plain(messages: list) -> list[dict]:
    """LiteLLM/pydantic message objects -> plain dicts (what templates and the store take)."""
    def enc(o):
        return o.model_dump(exclude_none=True) if hasattr(o, "model_dump") else str(o)
    return json.loads(json.dumps(list(messages), default=enc))


def call_request(model: str, messages: list, optional_params: dict, litellm_params: dict | None) -> CallRequest:
    """LiteLLM's arguments -> the pipeline's request; anything we cannot honour is refused."""
    params = dict(optional_params or {})
    tools = params.pop("tools", None)
    tool_choice = params.pop("tool_choice", "auto")
    response_format = params.pop("response_format", None)
    n = params.pop("n", None)
    n = 1 if n is None else int(n)
    if n < 1:
        raise errors.InvalidRequestError("n must be >= 1")
    sampling: dict[str, Any] = {}
    max_tokens = params.pop("max_completion_tokens", None) or params.pop("max_tokens", None)
    params.pop("max_tokens", None)
    if max_tokens is not None:
        sampling["max_tokens"] = int(max_tokens)
    for key in ("frequency_penalty", "presence_penalty"):
        if params.pop(key, 0) or 0:
            raise errors.InvalidRequestError(f"{key} is not supported (use repeat_penalty)")
    for key in UNSUPPORTED_KEYS:
        if params.pop(key, None):
            raise errors.InvalidRequestError(f"parameter {key!r} is not supported by mtllm_locally")
    for key in SAMPLING_KEYS:
        if params.get(key) is not None:
            sampling[key] = params.pop(key)
        else:
            params.pop(key, None)
    if isinstance(sampling.get("stop"), str):
        sampling["stop"] = (sampling["stop"],)
    elif sampling.get("stop") is not None:
        sampling["stop"] = tuple(sampling["stop"])
    for key in list(params):
        if key in IGNORED_KEYS:
            params.pop(key)
    if params:
        raise errors.InvalidRequestError(f"unsupported parameters for mtllm_locally: {sorted(params)}")
    return CallRequest(model=model, messages=_plain(messages), sampling=sampling, response_format=response_format,
                       tools=tools, tool_choice=tool_choice, n=n,
                       metadata=dict((litellm_params or {}).get("metadata") or {}))


def _finish(reason: str) -> str:
    return reason if reason in ("stop", "length", "tool_calls") else "stop"


def to_model_response(response: ModelResponse, model: str, answer: Answer) -> ModelResponse:
    if answer.teacher_response is not None:
        return answer.teacher_response
    choices = []
    for i, c in enumerate(answer.choices):
        if c.tool_calls:
            msg = Message(content=None, role="assistant", tool_calls=[
                ChatCompletionMessageToolCall(id=tc["id"], type="function", function=Function(**tc["function"]))
                for tc in c.tool_calls])
        else:
            msg = Message(content=c.text, role="assistant")
        choices.append(Choices(index=i, message=msg, finish_reason=_finish(c.finish_reason)))
    response.choices = choices
    response.model = f"{PROVIDER}/{model}"
    response.created = int(time.time())
    response.usage = Usage(prompt_tokens=answer.prompt_tokens, completion_tokens=answer.completion_tokens,
                           total_tokens=answer.prompt_tokens + answer.completion_tokens)
    response._hidden_params["mtllm_locally"] = {"temperature": answer.temperature,
                                                "cached_tokens": answer.cached_tokens, "timings": answer.timings,
                                                "closed_by": answer.choices[0].closed_by,
                                                "served_by": answer.served_by or "in process",
                                                "adapter": answer.adapter}
    return response


def text_chunk(text: str) -> dict:
    return {"text": text, "tool_use": None, "is_finished": False, "finish_reason": "", "usage": None, "index": 0}


def final_chunk(answer: Answer, tools: list | None) -> dict:
    usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
             "total_tokens": answer.prompt_tokens + answer.completion_tokens}
    c = answer.choices[0]
    if c.tool_calls:
        tc = c.tool_calls[0]
        return {"text": "", "tool_use": {"id": tc["id"], "type": "function", "index": 0,
                                         "function": {"name": tc["function"]["name"],
                                                      "arguments": tc["function"]["arguments"]}},
                "is_finished": True, "finish_reason": "tool_calls", "usage": usage, "index": 0}
    held_back = (c.text or "") if tools else ""  # the text of a tools request was not streamed
    return {"text": held_back, "tool_use": None, "is_finished": True, "finish_reason": _finish(c.finish_reason),
            "usage": usage, "index": 0}


def _raise(e: Exception):
    """Our error as LiteLLM's exception of the same HTTP meaning (LiteLLM passes its own
    types through; anything else from a custom provider would become APIConnectionError)."""
    message, code = f"{type(e).__name__}: {e}", status_code(e)
    kind = {400: litellm.BadRequestError, 404: litellm.NotFoundError, 429: litellm.RateLimitError}.get(code)
    if kind is not None:
        raise kind(message=message, model=PROVIDER, llm_provider=PROVIDER) from e
    raise litellm.InternalServerError(message=message, model=PROVIDER, llm_provider=PROVIDER) from e


class MtllmLocallyLLM(CustomLLM):
    """`runtime()` returns the process's runtime (wiring.runtime, or a test's own)."""

    def __init__(self, runtime: Callable[[], Runtime]):
        super().__init__()
        self.runtime = runtime

    def completion(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose, encoding,
                   api_key, logging_obj, optional_params, acompletion=None, litellm_params=None, logger_fn=None,
                   headers={}, timeout=None, client=None) -> ModelResponse:
        try:
            answer = self.runtime().calls.complete(call_request(model, messages, optional_params, litellm_params))
        except errors.MtllmError as e:
            _raise(e)
        return to_model_response(model_response, model, answer)

    async def acompletion(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose,
                          encoding, api_key, logging_obj, optional_params, acompletion=None, litellm_params=None,
                          logger_fn=None, headers={}, timeout=None, client=None) -> ModelResponse:
        try:
            answer = await self.runtime().calls.acomplete(call_request(model, messages, optional_params,
                                                                       litellm_params))
        except errors.MtllmError as e:
            _raise(e)
        return to_model_response(model_response, model, answer)

    def streaming(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose, encoding,
                  api_key, logging_obj, optional_params, acompletion=None, litellm_params=None, logger_fn=None,
                  headers={}, timeout=None, client=None) -> Iterator[dict]:
        try:
            request = call_request(model, messages, optional_params, litellm_params)
            for event in self.runtime().calls.stream(request):
                yield text_chunk(event.text) if isinstance(event, TextDelta) else final_chunk(event, request.tools)
        except errors.MtllmError as e:
            _raise(e)

    async def astreaming(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose,
                         encoding, api_key, logging_obj, optional_params, acompletion=None, litellm_params=None,
                         logger_fn=None, headers={}, timeout=None, client=None) -> AsyncIterator[dict]:
        try:
            request = call_request(model, messages, optional_params, litellm_params)
            async for event in self.runtime().calls.astream(request):
                yield text_chunk(event.text) if isinstance(event, TextDelta) else final_chunk(event, request.tools)
        except errors.MtllmError as e:
            _raise(e)


def register(handler: MtllmLocallyLLM) -> None:
    """Make `mtllm_locally/<model>` a LiteLLM provider served by `handler` (replaces an earlier one)."""
    litellm.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.WARNING)
    litellm.custom_provider_map[:] = [item for item in litellm.custom_provider_map
                                      if item.get("provider") != PROVIDER]
    litellm.custom_provider_map.append({"provider": PROVIDER, "custom_handler": handler})
    from litellm.utils import custom_llm_setup

    custom_llm_setup()
