"""Calls served by a vLLM server (scale-out), with the process's engine as the fallback.

A task's calls go to the server when its policy names one (`vllm.base_url`, jac.toml) and
the version deployed for the task is loaded there (state/remote.py): an adapter version
under its versioned name, the base model or a demonstrations-only version as
`vllm.served_base`. They go through LiteLLM's `hosted_vllm/<name>` with the same messages
(demonstrations included), schema, temperature and token budget the engine would get, and
are captured as the engine's answers are (source "model", the deployed version's adapter
id), so feedback, the teacher, training and the gate see no difference.

Any failure of the server (unreachable, timeout, a name it forgot, an error status) is
never the program's: the call is answered in process, and the server is left alone for
`COOL_OFF_S` before calls go there again. Calls with tools, retries of a rejected typed
answer and n > 1 stay in process: they rely on the engine's constrained tool-call format
and retry sampling.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import MtllmError
from ..state.policy import VLLMSettings
from ..state.vllm_target import server_root

if TYPE_CHECKING:
    from .pipeline import Call

log = logging.getLogger("mtllm_locally.remote")

COOL_OFF_S = 30.0
# Sampling keys vLLM takes in the OpenAI body, and the ones it takes beside it (extra_body)
OPENAI_KEYS = ("max_tokens", "stop", "seed", "top_p", "presence_penalty", "frequency_penalty")
EXTRA_KEYS = ("top_k", "min_p", "repetition_penalty")


@dataclass(frozen=True)
class Remote:
    target: str             # the server's root URL (the store's key for it)
    name: str               # the model name on the server
    api_key: str | None = field(repr=False)
    timeout_s: float = 60.0

    @property
    def model(self) -> str:
        return f"hosted_vllm/{self.name}"

    @property
    def api_base(self) -> str:
        return self.target + "/v1"


@dataclass(frozen=True)
class RemoteReply:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class RemoteStreamBroken(MtllmError):
    """The server failed after part of a streamed answer was already emitted: no fallback."""


class ServerHealth:
    """Which servers (or names on them) failed a call recently: calls skip them for COOL_OFF_S.
    A request the server refused as such (HTTP 400: too long for its context, a schema its
    grammar engine rejects) says nothing about the server and marks nothing; a name it does
    not know (a restart lost it) marks that name; anything else marks the server."""

    def __init__(self):
        self._lock = threading.Lock()
        self._down_until: dict[tuple[str, str | None], float] = {}

    def failed(self, remote: Remote, error: BaseException) -> None:
        import litellm

        if isinstance(error, litellm.BadRequestError):
            log.info("vLLM at %s refused a call to %s (served in process): %s", remote.target, remote.name,
                     str(error)[:300])
            return
        key = (remote.target, remote.name if isinstance(error, litellm.NotFoundError) else None)
        with self._lock:
            first = self._down_until.get(key, 0.0) < time.monotonic()
            self._down_until[key] = time.monotonic() + COOL_OFF_S
        if first:  # one warning per outage, not one per call
            log.warning("vLLM at %s failed a call to %s (%s: %s); serving %s in process for %.0f s", remote.target,
                        remote.name, type(error).__name__, str(error)[:300],
                        remote.name if key[1] else "every task it serves", COOL_OFF_S)

    def up(self, target: str, name: str | None = None) -> bool:
        now = time.monotonic()
        with self._lock:
            return self._down_until.get((target, None), 0.0) < now and \
                (name is None or self._down_until.get((target, name), 0.0) < now)


def remote_for(settings: VLLMSettings, adapter_id: str | None, serves_adapter: bool,
               loaded: dict[tuple[str, str], str], health: ServerHealth) -> Remote | None:
    """Where a call of a task whose deployed version is `adapter_id` goes, or None: in process."""
    if not settings.active or not settings.route:
        return None
    target = server_root(settings.base_url)
    name = loaded.get((target, adapter_id)) if serves_adapter else settings.served_base
    if not name or not health.up(target, name):
        return None
    return Remote(target, name, settings.api_key(), settings.timeout_s)


def cut_short(call: "Call", reply: RemoteReply) -> bool:
    """A typed answer the server stopped at the token budget: vLLM has no close-at-budget, so it
    is cut JSON, which the engine (closing values within the same budget) would not return."""
    return reply.finish_reason == "length" and bool(call.request.response_format)


def stays_local(call: "Call") -> bool:
    req = call.request
    return bool(req.tools) or call.attempt > 1 or req.n != 1


def request_kwargs(call: "Call", stream: bool) -> dict:
    """LiteLLM keywords: the call as the engine would run it (our typed budget included)."""
    remote = call.route.remote
    kw: dict[str, Any] = {"model": remote.model, "api_base": remote.api_base, "api_key": remote.api_key,
                          "timeout": remote.timeout_s, "messages": call.served_messages(),
                          "temperature": call.temperature}
    if call.request.response_format:
        kw["response_format"] = call.request.response_format
    for k in OPENAI_KEYS:
        if call.sampling.get(k) is not None:
            kw[k] = list(call.sampling[k]) if k == "stop" else call.sampling[k]
    extra = {k: call.sampling[k] for k in EXTRA_KEYS if call.sampling.get(k) is not None}
    if extra:
        kw["extra_body"] = extra
    if stream:
        kw["stream"] = True
        kw["stream_options"] = {"include_usage": True}
    return kw


def reply_of(response) -> RemoteReply:
    choice = response.choices[0]
    usage = getattr(response, "usage", None)
    return RemoteReply(choice.message.content or "", choice.finish_reason or "stop",
                       getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0,
                       _cached(usage))


class StreamedReply:
    """Assembles a streamed answer from LiteLLM's chunks."""

    def __init__(self):
        self.parts: list[str] = []
        self.finish_reason: str | None = None  # None until the server says the answer ended
        self.usage = None

    def add(self, chunk) -> str:
        """The chunk's text ('' if none)."""
        if getattr(chunk, "usage", None):
            self.usage = chunk.usage
        if not chunk.choices:
            return ""
        choice = chunk.choices[0]
        if choice.finish_reason:
            self.finish_reason = choice.finish_reason
        text = getattr(choice.delta, "content", None) or ""
        self.parts.append(text)
        return text

    def reply(self, stream) -> RemoteReply:
        """The answer, once `stream` (LiteLLM's wrapper) is exhausted. LiteLLM ends a stream the
        server broke off with a made-up finish chunk; only its wrapper knows whether the
        server itself said the answer ended."""
        if getattr(stream, "received_finish_reason", self.finish_reason) is None:
            raise ConnectionError("the server's stream ended before the answer did")
        u = self.usage
        return RemoteReply("".join(self.parts), self.finish_reason or "stop", getattr(u, "prompt_tokens", 0) or 0,
                           getattr(u, "completion_tokens", 0) or 0, _cached(u))


def _cached(usage) -> int:
    details = getattr(usage, "prompt_tokens_details", None)
    return (getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
