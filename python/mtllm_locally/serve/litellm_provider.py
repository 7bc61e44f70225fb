"""LiteLLM custom provider `mtllm_locally/<model>`: OpenAI-style chat completions
served in-process by the shared engine. byllm's `Model(model_name=
"mtllm_locally/default")` reaches it through `litellm.completion` unchanged.

<model> is `default` (the embedded SmolLM2), `default-q4_1`, or a GGUF path.

Honoured: messages (string or text parts; system/user/assistant/tool roles; prior
tool calls and tool results), temperature, top_p, top_k, min_p, max_tokens /
max_completion_tokens, stop, seed, n, response_format (json_schema, json_object),
tools + tool_choice, stream. Ignored (accepted, no effect): user, metadata,
stream_options, parallel_tool_calls (one call per turn), timeout, api_key, api_base.
Anything else raises InvalidRequestError (as a 400), never a silent misbehaviour.

With byllm's ReAct tools (a `finish_tool` among them) and tool_choice unset or
`auto`, every turn must be a tool call (byllm's own protocol says so); a repeated
identical call, or `settings.max_tool_turns` calls, makes the next turn finish_tool.

Typed calls (response_format or tools) are decoded greedily by default: byllm sends
temperature=0.7 even where a program asked for 0.0, and a 135M model's typed answers
get worse with sampling. `settings.typed_temperature` (global) and
`settings.task_temperature[task]` (per Jac function) change it; the temperature
actually used is returned in the response's provider_specific_fields.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator

# No cost-map fetch at `import litellm`: set at interpreter start by mtllm_locally-offline.pth and by the
# package __init__ (so it holds whatever the program imported first); kept beside the import it protects.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402
from litellm import CustomLLM  # noqa: E402
from litellm.llms.custom_llm import CustomLLMError  # noqa: E402
from litellm.types.utils import ChatCompletionMessageToolCall, Choices, Function, Message, ModelResponse, Usage  # noqa: E402

from .. import errors  # noqa: E402
from ..chat import for_template  # noqa: E402
from ..engine import Completion, SamplingParams  # noqa: E402
from . import recorder  # noqa: E402
from .deploy import BASE, Route, router  # noqa: E402
from .engines import shared_engine  # noqa: E402
from . import teacher as teaching  # noqa: E402

PROVIDER = "mtllm_locally"
SAMPLING_KEYS = {"temperature", "top_p", "top_k", "min_p", "seed", "stop", "repeat_penalty"}
IGNORED_KEYS = {"user", "metadata", "stream_options", "parallel_tool_calls", "timeout", "api_key", "api_base",
                "extra_body", "extra_headers", "max_retries", "drop_params", "stream"}


@dataclass
class Settings:
    typed_temperature: float | None = 0.0   # None = honour the request's temperature
    task_temperature: dict[str, float] = field(default_factory=dict)
    max_tool_turns: int = 8                  # ReAct: after this many tool calls, finish_tool


settings = Settings()


def _status(e: Exception) -> int:
    if isinstance(e, errors.OverloadedError):
        return 429
    if isinstance(e, (errors.InvalidRequestError, errors.ContextOverflowError, errors.TemplateError,
                      errors.AdapterLoadError)):
        return 400
    if isinstance(e, errors.ModelLoadError):
        return 404
    return 500


@dataclass
class Call:
    model: str
    messages: list
    kw: dict
    n: int
    tools: list | None
    temperature: float
    metadata: dict | None = None
    task: str = ""                    # recorder.task_key: the Jac function + what defines it
    function: str | None = None
    engine: Any = None
    route: Route = BASE               # the adapter deployed for this task, if any
    started: float = field(default_factory=time.perf_counter)


def _plain(messages: list) -> list[dict]:
    """LiteLLM/pydantic message objects -> plain dicts (what templates and the store take)."""
    def enc(o):
        return o.model_dump(exclude_none=True) if hasattr(o, "model_dump") else str(o)
    return json.loads(json.dumps(list(messages), default=enc))


def _react_loop_guard(messages: list[dict], tools: list, tool_choice: Any, max_tool_turns: int) -> Any:
    """A small model in byllm's ReAct loop can call the same tool with the same
    arguments forever (we measured 190+ turns of get_temperature("Paris"), the prompt
    growing past 7k tokens). Once it repeats a call it already has the result of, or
    after `max_tool_turns` calls, the next turn must be finish_tool."""
    if not any((t.get("function") or {}).get("name") == "finish_tool" for t in tools if isinstance(t, dict)):
        return tool_choice
    seen, repeated, turns = set(), False, 0
    for m in messages:
        for call in m.get("tool_calls") or [] if m.get("role") == "assistant" else []:
            fn = call.get("function") or {}
            args = fn.get("arguments")
            try:
                args = json.dumps(json.loads(args) if isinstance(args, str) else args, sort_keys=True)
            except (json.JSONDecodeError, TypeError):
                pass
            key = (fn.get("name"), args)
            repeated = key in seen
            seen.add(key)
            turns += 1
    if repeated or turns >= max_tool_turns:
        return {"type": "function", "function": {"name": "finish_tool"}}
    return tool_choice


def prepare(model: str, messages: list, optional_params: dict, litellm_params: dict | None) -> Call:
    messages = _plain(messages)
    params = dict(optional_params or {})
    tools = params.pop("tools", None)
    tool_choice = params.pop("tool_choice", "auto")
    response_format = params.pop("response_format", None)
    n = params.pop("n", None)
    n = 1 if n is None else int(n)
    if n < 1:
        raise errors.InvalidRequestError("n must be >= 1")
    kw: dict[str, Any] = {}
    max_tokens = params.pop("max_completion_tokens", None) or params.pop("max_tokens", None)
    params.pop("max_tokens", None)
    if max_tokens is not None:
        kw["max_tokens"] = int(max_tokens)
    for key in ("frequency_penalty", "presence_penalty"):
        v = params.pop(key, 0) or 0
        if v:
            raise errors.InvalidRequestError(f"{key} is not supported (use repeat_penalty)")
    for key in ("logprobs", "top_logprobs", "logit_bias", "functions", "function_call", "audio", "modalities",
                "prediction", "reasoning_effort", "web_search_options"):
        if params.pop(key, None):
            raise errors.InvalidRequestError(f"parameter {key!r} is not supported by mtllm_locally")
    for key in SAMPLING_KEYS:
        if key in params and params[key] is not None:
            kw[key] = params.pop(key)
    if isinstance(kw.get("stop"), str):
        kw["stop"] = (kw["stop"],)
    elif kw.get("stop") is not None:
        kw["stop"] = tuple(kw["stop"])
    for key in list(params):
        if key in IGNORED_KEYS:
            params.pop(key)
    if params:
        raise errors.InvalidRequestError(f"unsupported parameters for mtllm_locally: {sorted(params)}")
    if tools and tool_choice in (None, "auto") and any(
            (t.get("function") or {}).get("name") == "finish_tool" for t in tools if isinstance(t, dict)):
        # byllm's ReAct protocol: "only use tools ... always call finish_tool". A small
        # model drifts into prose under `auto`, so we hold it to a call every turn.
        tool_choice = "required"
    if tools:
        tool_choice = _react_loop_guard(messages, tools, tool_choice, settings.max_tool_turns)
    typed = bool(response_format) or bool(tools and tool_choice != "none")
    task = ((litellm_params or {}).get("metadata") or {}).get("jac_caller_name")
    temperature = float(kw.get("temperature", 0.0) if kw.get("temperature") is not None else 0.0)
    if task in settings.task_temperature:
        temperature = settings.task_temperature[task]
    elif typed and settings.typed_temperature is not None:
        temperature = settings.typed_temperature
    kw["temperature"] = temperature
    kw["response_format"] = response_format
    if tools:
        kw["tools"] = tools
        kw["tool_choice"] = tool_choice
    eng = shared_engine(model)
    task_key = recorder.task_key(task, messages, response_format, tools)
    route = router.route(eng, task_key, recorder.store_or_none()) if task else BASE
    if route.adapters:
        kw["adapters"] = list(route.adapters)
    return Call(model=model, messages=messages, kw=kw, n=n, tools=tools, temperature=temperature,
                metadata=(litellm_params or {}).get("metadata"), task=task_key, function=task, engine=eng,
                route=route)


def capture(call: Call, c: Completion, text: str) -> None:
    calls = _tool_calls(text, call.tools)
    recorder.record_turn(
        metadata=call.metadata, task=call.task, model=f"{PROVIDER}/{call.model}", messages=call.messages,
        response_format=call.kw.get("response_format"), tools=call.tools, output_text=None if calls else text,
        tool_calls=calls, finish_reason="tool_calls" if calls else c.finish_reason,
        latency_ms=1000 * (time.perf_counter() - call.started), prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens, cached_tokens=c.cached_tokens, temperature=call.temperature,
        adapter=call.route.adapter_id, model_path=call.engine.info.path)


def _request(call: Call, i: int) -> tuple[Any, dict]:
    """The shared engine and the Engine.submit kwargs for choice `i` of a call."""
    eng = call.engine
    kw = dict(call.kw)
    kw["messages"] = for_template(call.messages, call.tools, eng.chat_template.source)
    if i > 0 and kw.get("seed") is not None:  # n > 1: distinct samples, still reproducible
        kw["seed"] = (kw["seed"] + i) % (2**32 - 1)
    return eng, kw


def _tool_calls(text: str, tools: list | None) -> list[dict] | None:
    if not tools or not text.startswith("{"):
        return None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or "name" not in obj or "arguments" not in obj:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": obj["name"], "arguments": json.dumps(obj["arguments"])}}]


def build_response(model_response: ModelResponse, model: str, call: Call, completions: list[Completion]) -> ModelResponse:
    choices = []
    for i, c in enumerate(completions):
        calls = _tool_calls(c.text, call.tools)
        if calls:
            msg = Message(content=None, role="assistant",
                          tool_calls=[ChatCompletionMessageToolCall(id=tc["id"], type="function",
                                                                    function=Function(**tc["function"])) for tc in calls])
            finish = "tool_calls"
        else:
            msg = Message(content=c.text, role="assistant")
            finish = c.finish_reason if c.finish_reason in ("stop", "length") else "stop"
        choices.append(Choices(index=i, message=msg, finish_reason=finish))
    model_response.choices = choices
    model_response.model = f"{PROVIDER}/{model}"
    model_response.created = int(time.time())
    prompt_tokens = completions[0].prompt_tokens
    completion_tokens = sum(c.completion_tokens for c in completions)
    model_response.usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                                 total_tokens=prompt_tokens + completion_tokens)
    capture(call, completions[0], completions[0].text)
    model_response._hidden_params["mtllm_locally"] = {
        "temperature": call.temperature, "cached_tokens": completions[0].cached_tokens,
        "timings": completions[0].timings}
    return model_response


def _raise(e: Exception):
    raise CustomLLMError(status_code=_status(e), message=f"{type(e).__name__}: {e}") from e


class MtllmLocallyLLM(CustomLLM):
    def completion(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose, encoding,
                   api_key, logging_obj, optional_params, acompletion=None, litellm_params=None, logger_fn=None,
                   headers={}, timeout=None, client=None) -> ModelResponse:
        try:
            call = prepare(model, messages, optional_params, litellm_params)
            teacher = teaching.teacher_for(call)
            if teacher:  # the student runs in shadow (one sample) while the teacher answers
                shadow = [call.engine.submit(**_request(call, 0)[1])] if teacher.shadow else []
                return teaching.answer(call, teacher, optional_params, shadow)
            reqs = [eng.submit(**kw) for eng, kw in (_request(call, i) for i in range(call.n))]
            return build_response(model_response, model, call, [r.result() for r in reqs])
        except errors.MtllmError as e:
            _raise(e)

    async def acompletion(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose,
                          encoding, api_key, logging_obj, optional_params, acompletion=None, litellm_params=None,
                          logger_fn=None, headers={}, timeout=None, client=None) -> ModelResponse:
        try:
            call = prepare(model, messages, optional_params, litellm_params)
            teacher = teaching.teacher_for(call)
            if teacher:
                shadow = [call.engine.agenerate(**_request(call, 0)[1])] if teacher.shadow else []
                *students, response = await asyncio.gather(*shadow, teaching.aanswer(call, teacher, optional_params),
                                                           return_exceptions=True)
                if isinstance(response, BaseException):
                    raise response
                teaching.record(call, teacher, response, [s for s in students if not isinstance(s, BaseException)])
                return response
            outs = await asyncio.gather(*[eng.agenerate(**kw) for eng, kw in (_request(call, i) for i in range(call.n))])
            return build_response(model_response, model, call, list(outs))
        except errors.MtllmError as e:
            _raise(e)

    def streaming(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose, encoding,
                  api_key, logging_obj, optional_params, acompletion=None, litellm_params=None, logger_fn=None,
                  headers={}, timeout=None, client=None) -> Iterator[dict]:
        try:
            call = prepare(model, messages, optional_params, litellm_params)
            if call.n != 1:
                raise errors.InvalidRequestError("n > 1 is not supported with stream=True")
            eng, kw = _request(call, 0)
            req = eng.submit(**kw)
        except errors.MtllmError as e:
            _raise(e)
        text = []
        try:
            for chunk in req:
                text.append(chunk.text)
                if not call.tools:  # a tool call is sent whole at the end
                    yield _chunk(chunk.text)
            done = req.result()
            capture(call, done, done.text)
            yield _final(call, done, done.text)
        except errors.MtllmError as e:
            _raise(e)
        finally:
            if not req._done:
                req.cancel()

    async def astreaming(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose,
                         encoding, api_key, logging_obj, optional_params, acompletion=None, litellm_params=None,
                         logger_fn=None, headers={}, timeout=None, client=None) -> AsyncIterator[dict]:
        try:
            call = prepare(model, messages, optional_params, litellm_params)
            if call.n != 1:
                raise errors.InvalidRequestError("n > 1 is not supported with stream=True")
            eng, kw = _request(call, 0)
            text = []
            prompt_tokens = len(eng.encode_chat(kw["messages"], tools=kw.get("tools")))
            async for chunk in eng.astream(**kw):
                text.append(chunk.text)
                if not call.tools:
                    yield _chunk(chunk.text)
            full = "".join(text)
            done = Completion(text=full, finish_reason="stop", token_ids=[], prompt_tokens=prompt_tokens,
                              cached_tokens=0, completion_tokens=len(eng.tokenize(full, add_special=False)) if full else 0)
            capture(call, done, full)
            yield _final(call, done, full)
        except errors.MtllmError as e:
            _raise(e)


def _chunk(text: str) -> dict:
    return {"text": text, "tool_use": None, "is_finished": False, "finish_reason": "", "usage": None, "index": 0}


def _final(call: Call, c: Completion, text: str) -> dict:
    usage = {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens,
             "total_tokens": c.prompt_tokens + c.completion_tokens}
    calls = _tool_calls(text, call.tools)
    if calls:
        tc = calls[0]
        return {"text": "", "tool_use": {"id": tc["id"], "type": "function", "index": 0,
                                         "function": {"name": tc["function"]["name"],
                                                      "arguments": tc["function"]["arguments"]}},
                "is_finished": True, "finish_reason": "tool_calls", "usage": usage, "index": 0}
    first = "" if not call.tools else text  # tool-less text of a tools request was held back
    return {"text": first, "tool_use": None, "is_finished": True,
            "finish_reason": c.finish_reason if c.finish_reason in ("stop", "length") else "stop",
            "usage": usage, "index": 0}


handler = MtllmLocallyLLM()


def register() -> None:
    """Idempotent: make `mtllm_locally/<model>` a LiteLLM provider."""
    litellm.suppress_debug_info = True
    logging.getLogger("LiteLLM").setLevel(logging.WARNING)
    if not any(item.get("provider") == PROVIDER for item in litellm.custom_provider_map):
        litellm.custom_provider_map.append({"provider": PROVIDER, "custom_handler": handler})
    from litellm.utils import custom_llm_setup

    custom_llm_setup()


register()
