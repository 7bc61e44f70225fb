"""The call pipeline: every served call, whichever way it arrived, goes

    prepare  (decoding policy: temperature, ReAct guard; the task; the engine)
    route    (the task's deployed adapter, the base model, or a teacher)
    run      (the engine: one request per choice; or the teacher, the student in shadow)
    capture  (the store, then the runtime's subscribers)

One core (`_core`): it decides, and asks a driver for each step that waits (a
model load, the engine, the teacher, a store write). Two drivers run it: a blocking
one in the caller's thread (`complete`, `stream`) and an asyncio one on the caller's
event loop (`acomplete`, `astream`). The provider only translates shapes.

A call the teacher answers returns as soon as the teacher does: its student, run in
shadow on the same input, is left to the runtime's shadows (shadows.py), which store
its answer into the captured turn when it finishes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Iterator

import litellm

from ..demonstrations import with_demonstrations
from ..engine import Completion, Engine, Request
from ..errors import InvalidRequestError
from ..state.task import task_key
from . import react_guard, remote_calls, teacher, typed_calls
from .remote_calls import RemoteReply, RemoteStreamBroken, StreamedReply
from .router import BASE, Route

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger("mtllm_locally.pipeline")


@dataclass(frozen=True)
class CallRequest:
    """One chat call as plain data (the provider translates LiteLLM's shapes into it)."""
    model: str                              # "default", "default-q4_1" or a GGUF path
    messages: list[dict]
    sampling: dict = field(default_factory=dict)  # Engine.submit keywords: max_tokens, temperature, top_p, ...
    response_format: Any = None
    tools: list | None = None
    tool_choice: Any = "auto"
    n: int = 1
    metadata: dict = field(default_factory=dict)  # byllm's: jac_caller_name, jac_invocation_id


@dataclass(frozen=True)
class Choice:
    text: str | None                    # None when the answer is a tool call
    tool_calls: list[dict] | None       # OpenAI tool calls
    finish_reason: str                  # "stop" | "length" | "tool_calls" | "cancelled" (as the engine said)
    closed_by: str | None = None        # the engine closed the value: "budget" or "loop" (still complete)


@dataclass(frozen=True)
class Answer:
    choices: list[Choice]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    temperature: float
    source: str                         # "model" or "teacher:<model>"
    adapter: str | None
    invocation_id: str | None           # the captured call (None: capture off or suppressed)
    timings: dict = field(default_factory=dict)
    teacher_response: Any = None        # the teacher's own LiteLLM response, returned as it is
    served_by: str | None = None        # a vLLM server's model ("hosted_vllm/<name>"); None: this process


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass
class Call:
    """A request prepared for running."""
    request: CallRequest
    function: str | None                # the Jac function (byllm's jac_caller_name)
    task_key: str
    engine: Engine
    route: Route
    temperature: float
    tool_choice: Any
    sampling: dict                      # the request's, with the typed-call policy applied
    attempt: int = 1                    # > 1: byllm asks again for a call whose answer it rejected
    started: float = field(default_factory=time.perf_counter)

    @property
    def tools(self) -> list | None:
        return self.request.tools

    def served_messages(self) -> list:
        """The task's demonstrations (if its deployed version serves them) before the call,
        when they fit this engine's context with the call's output budget; else the call as
        it is (a deployed version never makes a call fail). The store keeps the program's
        own messages either way."""
        req = self.request
        shown = with_demonstrations(req.messages, self.route.demonstrations, req.tools)
        if shown is req.messages:
            return shown
        try:
            n = len(self.engine.encode_chat(shown))
        except Exception:
            return req.messages
        return shown if n + int(self.sampling.get("max_tokens") or 0) < self.engine.n_ctx else req.messages

    def submit_kwargs(self, i: int = 0) -> dict:
        """Engine.submit keywords for choice `i`."""
        req = self.request
        kw = {**self.sampling, "messages": self.served_messages(), "temperature": self.temperature,
              "response_format": req.response_format}
        if req.tools:
            kw["tools"], kw["tool_choice"] = req.tools, self.tool_choice
        if self.route.adapters:
            kw["adapters"] = list(self.route.adapters)
        if i > 0 and kw.get("seed") is not None:  # n > 1: distinct samples, still reproducible
            kw["seed"] = (kw["seed"] + i) % (2**32 - 1)
        return kw


# The steps the core asks its driver to perform (the core itself does no I/O, so one
# core serves the blocking and the asyncio entry points alike, with no event loop of
# its own: a sync caller never gets a thread hop or an extra socketpair).
@dataclass(frozen=True)
class Blocking:         # a short blocking function (model load, routing, a store write)
    fn: Any
    args: tuple


@dataclass(frozen=True)
class Generate:         # run the call's choices to completion -> list[Completion]
    call: Call


@dataclass(frozen=True)
class Stream:           # run choice 0, emitting its text unless `hold` -> [Completion]
    call: Call
    hold: bool


@dataclass(frozen=True)
class Teach:            # the teacher answers, the student left running in shadow -> (response, Request | None)
    call: Call
    policy: Any


@dataclass(frozen=True)
class Remote:           # the call's vLLM server answers choice 0, streamed unless not `stream` -> RemoteReply
    call: Call
    stream: bool


@dataclass(frozen=True)
class Emit:             # hand an event to the caller
    event: TextDelta | Answer


class CallPipeline:
    def __init__(self, runtime: "Runtime"):
        self.runtime = runtime

    # ------------------------------------------------------------------ the core
    def _core(self, request: CallRequest, stream: bool):
        if stream and request.n != 1:
            raise InvalidRequestError("n > 1 is not supported with stream=True")
        call = yield Blocking(self.prepare, (request,))
        policy = self.runtime.policy.for_task(call.function) if call.function else None
        if policy is not None and teacher.needed(policy, call.route):
            response, student = yield Teach(call, policy)
            answer = yield Blocking(self._taught, (call, policy, response, student))
            if stream and answer.choices[0].text and not call.tools:
                yield Emit(TextDelta(answer.choices[0].text))
        else:
            reply = None
            if call.route.remote is not None:
                try:
                    reply = yield Remote(call, stream)
                except RemoteStreamBroken:
                    raise
                except Exception as e:  # the server's failure is never the call's: answer in process
                    self.runtime.servers.failed(call.route.remote, e)
                if reply is not None and remote_calls.cut_short(call, reply):
                    if stream and reply.text:  # shown already: answering again would repeat it
                        raise RemoteStreamBroken("the vLLM server cut a streamed typed answer at its token budget")
                    reply = None  # the engine closes a value within the budget; the server cut it
            if reply is not None:
                answer = yield Blocking(self._remote_served, (call, reply))
            else:
                # a tool call is sent whole at the end, so its text is held back
                completions = yield (Stream(call, hold=bool(call.tools)) if stream else Generate(call))
                answer = yield Blocking(self._served, (call, completions))
        yield Emit(answer)

    def prepare(self, request: CallRequest) -> Call:
        rt = self.runtime
        tool_choice = request.tool_choice
        if request.tools:
            tool_choice = react_guard.tool_choice_for(request.messages, request.tools, tool_choice,
                                                      rt.settings.max_tool_turns)
        typed = bool(request.response_format) or bool(request.tools and tool_choice != "none")
        function = request.metadata.get("jac_caller_name")
        requested = request.sampling.get("temperature")
        temperature = float(requested) if requested is not None else 0.0
        if function in rt.settings.task_temperature:
            temperature = rt.settings.task_temperature[function]
        elif typed and rt.settings.typed_temperature is not None:
            temperature = rt.settings.typed_temperature
        sampling = dict(request.sampling)
        attempt = rt.attempt_of(request.metadata.get("jac_invocation_id")) if typed else 1
        if typed and rt.settings.typed_guard:
            if sampling.get("max_tokens") is None:
                sampling["max_tokens"] = typed_calls.budget(request.response_format, request.tools)
            sampling["loop_guard"] = True
            if attempt > 1:
                sampling, temperature = typed_calls.retry_sampling(sampling, temperature, attempt)
        elif typed:
            sampling["close_at_budget"] = False  # the old behaviour, for comparison (the bench's "before")
        engine = rt.engines.get(request.model)
        key = task_key(function, request.messages, request.response_format, request.tools)
        route = rt.route(engine, key) if function else BASE
        call = Call(request, function, key, engine, route, temperature, tool_choice, sampling, attempt)
        if function and not remote_calls.stays_local(call):
            call.route = rt.remote_route(engine, key, function, route)
        return call

    def _served(self, call: Call, completions: list[Completion]) -> Answer:
        choices = [_choice(c, call.tools) for c in completions]
        first = completions[0]
        inv = self._capture(call, choices[0], source="model", prompt_tokens=first.prompt_tokens,
                            completion_tokens=first.completion_tokens, cached_tokens=first.cached_tokens)
        return Answer(choices=choices, prompt_tokens=first.prompt_tokens,
                      completion_tokens=sum(c.completion_tokens for c in completions),
                      cached_tokens=first.cached_tokens, temperature=call.temperature, source="model",
                      adapter=call.route.adapter_id, invocation_id=inv, timings=first.timings)

    def _remote_served(self, call: Call, reply: RemoteReply) -> Answer:
        choice = Choice(reply.text, None, reply.finish_reason)
        inv = self._capture(call, choice, source="model", prompt_tokens=reply.prompt_tokens,
                            completion_tokens=reply.completion_tokens, cached_tokens=reply.cached_tokens,
                            model=call.route.remote.model)
        return Answer(choices=[choice], prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens,
                      cached_tokens=reply.cached_tokens, temperature=call.temperature, source="model",
                      adapter=call.route.adapter_id, invocation_id=inv, served_by=call.route.remote.model)

    def _taught(self, call: Call, policy, response, shadow: Request | None) -> Answer:
        try:
            text, tool_calls, finish, prompt_tokens, completion_tokens = teacher.reply_of(response)
        except BaseException:
            _cancel(shadow)
            raise
        choice = Choice(text, tool_calls, finish)
        source = f"teacher:{policy.teacher}"
        inv = self._capture(call, choice, source=source, prompt_tokens=prompt_tokens,
                            completion_tokens=completion_tokens, cached_tokens=0, model=policy.teacher,
                            shadow=shadow)
        return Answer(choices=[choice], prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                      cached_tokens=0, temperature=call.temperature, source=source, adapter=call.route.adapter_id,
                      invocation_id=inv, teacher_response=response)

    def _capture(self, call: Call, choice: Choice, *, source: str, prompt_tokens: int, completion_tokens: int,
                 cached_tokens: int, model: str | None = None, shadow: Request | None = None) -> str | None:
        req = call.request
        return self.runtime.record_turn(
            invocation_id=req.metadata.get("jac_invocation_id"), task_key=call.task_key, function=call.function,
            model=model or f"mtllm_locally/{req.model}", model_path=call.engine.info.path,
            messages=req.messages, response_format=req.response_format, tools=req.tools,
            output_text=choice.text, tool_calls=choice.tool_calls, finish_reason=choice.finish_reason,
            latency_ms=1000 * (time.perf_counter() - call.started), prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, cached_tokens=cached_tokens, temperature=call.temperature,
            adapter=call.route.adapter_id, source=source, shadow=shadow, closed_by=choice.closed_by,
            attempt=call.attempt)

    def _teacher_kwargs(self, call: Call) -> dict:
        req = call.request
        return teacher.request(req.messages, call.temperature, req.response_format, req.tools, call.tool_choice,
                               req.sampling)  # the program's own bounds, not our typed-call policy

    def _emitted(self, step: Emit) -> TextDelta | Answer:
        """An event for the caller; run in the caller's own context, so that after an
        answer feedback() refers to this call."""
        if isinstance(step.event, Answer) and step.event.invocation_id:
            self.runtime.last_invocation.set(step.event.invocation_id)
        return step.event

    # ------------------------------------------------------------------ entry points
    def complete(self, request: CallRequest) -> Answer:
        return _answer_of(self._drive(self._core(request, stream=False)))

    def stream(self, request: CallRequest) -> Iterator[TextDelta | Answer]:
        return self._drive(self._core(request, stream=True))

    async def acomplete(self, request: CallRequest) -> Answer:
        answer = None
        async for event in self._adrive(self._core(request, stream=False)):
            answer = event
        return answer

    def astream(self, request: CallRequest) -> AsyncIterator[TextDelta | Answer]:
        return self._adrive(self._core(request, stream=True))

    # ------------------------------------------------------------------ the blocking driver
    def _drive(self, core) -> Iterator[TextDelta | Answer]:
        """Runs the core in the caller's thread; a consumer that stops early cancels the request."""
        result, error = None, None
        while (step := _advance(core, result, error)) is not None:
            result, error = None, None
            if isinstance(step, Emit):
                yield self._emitted(step)
                continue
            try:
                if isinstance(step, Blocking):
                    result = step.fn(*step.args)
                elif isinstance(step, Generate):
                    reqs = [step.call.engine.submit(**step.call.submit_kwargs(i)) for i in range(step.call.request.n)]
                    try:
                        result = [r.result() for r in reqs]
                    finally:
                        _cancel_unfinished(reqs)
                elif isinstance(step, Stream):
                    req = step.call.engine.submit(**step.call.submit_kwargs(0))
                    try:
                        for chunk in req:
                            if not step.hold:
                                yield TextDelta(chunk.text)
                        result = [req.result()]
                    finally:
                        _cancel_unfinished([req])
                elif isinstance(step, Teach):
                    result = self._teach(step.call, step.policy)
                elif isinstance(step, Remote):
                    kw = remote_calls.request_kwargs(step.call, step.stream)
                    if not step.stream:
                        result = remote_calls.reply_of(litellm.completion(**kw))
                    else:
                        streamed = StreamedReply()
                        try:
                            chunks = litellm.completion(**kw)
                            try:
                                for chunk in chunks:
                                    if text := streamed.add(chunk):
                                        yield TextDelta(text)
                            finally:  # a consumer that stopped early: the server stops generating too
                                _close_stream(chunks)
                            result = streamed.reply(chunks)
                        except Exception as e:
                            raise _broken(e) if any(streamed.parts) else e
            except Exception as e:  # back into the core, at the step that failed
                error = e

    def _teach(self, call: Call, policy) -> tuple[Any, Request | None]:
        """The teacher's answer, and the student's request left running (not awaited)."""
        shadow = self._shadow(call, policy)
        token = self.runtime.suppressed.set(True)  # the teacher may be this very provider
        try:
            response = teacher.ask(policy, self._teacher_kwargs(call))
        except BaseException:
            _cancel(shadow)
            raise
        finally:
            self.runtime.suppressed.reset(token)
        return response, shadow

    def _shadow(self, call: Call, policy) -> Request | None:
        """The student submitted on the call's input (submitting returns at once), or None:
        no shadow wanted, or it could not be submitted (the shadow never fails the call)."""
        if not policy.shadow or not self.runtime.wants_shadow():
            return None
        try:
            return call.engine.submit(**call.submit_kwargs(0))
        except Exception as e:
            log.debug("shadow not run: %s: %s", type(e).__name__, e)
            return None

    # ------------------------------------------------------------------ the asyncio driver
    async def _adrive(self, core) -> AsyncIterator[TextDelta | Answer]:
        """Runs the core on the caller's event loop; blocking steps go to a worker thread."""
        result, error = None, None
        while (step := _advance(core, result, error)) is not None:
            result, error = None, None
            if isinstance(step, Emit):
                yield self._emitted(step)
                continue
            try:
                if isinstance(step, Blocking):
                    result = await asyncio.to_thread(step.fn, *step.args)
                elif isinstance(step, Generate):
                    result = list(await asyncio.gather(*[step.call.engine.agenerate(**step.call.submit_kwargs(i))
                                                         for i in range(step.call.request.n)]))
                elif isinstance(step, Stream):
                    async with step.call.engine.asubmit(**step.call.submit_kwargs(0)) as req:
                        async for chunk in req:
                            if not step.hold:
                                yield TextDelta(chunk.text)
                        result = [req.completion()]
                elif isinstance(step, Teach):
                    result = await self._ateach(step.call, step.policy)
                elif isinstance(step, Remote):
                    kw = remote_calls.request_kwargs(step.call, step.stream)
                    if not step.stream:
                        result = remote_calls.reply_of(await litellm.acompletion(**kw))
                    else:
                        streamed = StreamedReply()
                        try:
                            chunks = await litellm.acompletion(**kw)
                            try:
                                async for chunk in chunks:
                                    if text := streamed.add(chunk):
                                        yield TextDelta(text)
                            finally:
                                await _aclose_stream(chunks)
                            result = streamed.reply(chunks)
                        except Exception as e:
                            raise _broken(e) if any(streamed.parts) else e
            except Exception as e:
                error = e

    async def _ateach(self, call: Call, policy) -> tuple[Any, Request | None]:
        """`_teach` on the caller's loop: the student is a plain engine request, awaited by
        the runtime's shadows, not by this loop."""
        shadow = self._shadow(call, policy)
        token = self.runtime.suppressed.set(True)
        try:
            response = await teacher.aask(policy, self._teacher_kwargs(call))
        except BaseException:  # the teacher failed, or the caller's task was cancelled
            _cancel(shadow)
            raise
        finally:
            self.runtime.suppressed.reset(token)
        return response, shadow


def _advance(core, result: Any, error: Exception | None):
    """The core's next step, given the outcome of the last one (None once it is done)."""
    try:
        return core.throw(error) if error is not None else core.send(result)
    except StopIteration:
        return None


def _stream_parts(chunks) -> list:
    """LiteLLM's stream wrapper and what it wraps, outermost first (the provider's stream, then
    the HTTP response's generator): where a close is found."""
    inner = getattr(chunks, "completion_stream", None)
    return [chunks, inner, getattr(inner, "streaming_response", None), getattr(inner, "response_iterator", None)]


def _close_stream(chunks) -> None:
    """Close LiteLLM's stream (its HTTP response) so an abandoned answer is not generated on."""
    for obj in _stream_parts(chunks):
        close = getattr(obj, "close", None)
        if callable(close):
            try:
                close()
            except Exception:
                pass
            return


async def _aclose_stream(chunks) -> None:
    for obj in _stream_parts(chunks):
        close = getattr(obj, "aclose", None) or getattr(obj, "close", None)
        if callable(close):
            try:
                r = close()
                if asyncio.iscoroutine(r):
                    await r
            except Exception:
                pass
            return


def _broken(e: Exception) -> RemoteStreamBroken:
    return RemoteStreamBroken(f"the vLLM server failed in the middle of a streamed answer: {type(e).__name__}: {e}")


def _answer_of(events: Iterator[TextDelta | Answer]) -> Answer:
    answer = None
    for event in events:
        answer = event
    return answer


def _cancel(request: Request | None) -> None:
    if request is not None:
        request.cancel()


def _cancel_unfinished(requests) -> None:
    for r in requests:
        if not r._done:
            r.cancel()


def _choice(c: Completion, tools: list | None) -> Choice:
    calls = tool_calls_in(c.text, tools)
    if calls:
        return Choice(None, calls, "tool_calls", c.closed_by)
    return Choice(c.text, None, c.finish_reason, c.closed_by)


def tool_calls_in(text: str, tools: list | None) -> list[dict] | None:
    """The engine's constrained tool-call JSON as OpenAI tool calls (None: plain text)."""
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
