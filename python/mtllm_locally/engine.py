"""The Python API of the serving loop.

`Engine` validates arguments, turns dataclasses into the native structs and hands
work to the native scheduler (mtllm_locally._engine), which batches every request
in flight — from any thread or asyncio task — into shared llama_decode calls.

    with Engine() as eng:                       # the embedded default model
        print(eng.generate(messages=[{"role": "user", "content": "Hi"}]).text)
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import math
import os
import reprlib
import threading
import weakref
from dataclasses import dataclass, field, fields, replace
from typing import Any, AsyncIterator, Iterator, Mapping, Sequence

from . import _engine, constraints, cpu_backend, models, vetting  # cpu_backend: AMX off before any load
from .chat import ChatTemplate, PromptEncoder, read_template_source
from .errors import (
    AdapterLoadError,
    ModelLoadError,
    ContextOverflowError,
    EngineClosedError,
    EngineError,
    InvalidRequestError,
)

log = logging.getLogger("mtllm_locally")
_ERRORS = {c.__name__: c for c in (ContextOverflowError, EngineClosedError, EngineError, InvalidRequestError)}

Message = Mapping[str, Any]
LIMITS = dict(_engine.limits)  # the native engine's own limits, checked here first
# ggml's workers spin: more threads than cores only slows it down, and thousands fail to start.
MAX_THREADS = 2 * (os.cpu_count() or 1)


def _text(value: Any, what: str) -> str:
    """A str that can cross into C++ (UTF-8): lone surrogates cannot."""
    if not isinstance(value, str):
        raise InvalidRequestError(f"{what} must be a str, not {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequestError(f"{what} is not valid text (it contains a lone surrogate)") from None
    return value


def _replace(obj, kw: dict, what: str):
    try:
        return replace(obj, **kw)
    except TypeError as e:  # an unknown keyword
        raise InvalidRequestError(f"unknown {what} parameter: {e}") from None


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0       # greedy by default: typed `by llm()` calls want determinism
    top_p: float = 1.0
    top_k: int = 0                 # 0 = off
    min_p: float = 0.0
    repeat_penalty: float = 1.0    # 1 = off
    repeat_last_n: int = 64
    seed: int | None = None        # None = random (only matters when temperature > 0)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # Constrained output only: a value whose last tokens repeat one item (3+ copies, or
    # 4+ whose numbers differ: "item1", "item2", ...) is closed early (closed_by="loop").
    # Off by default: some outputs repeat legitimately.
    loop_guard: bool = False
    # Constrained output only: close the value within max_tokens and the context (on by
    # default; off gives the old behaviour: a valid prefix, cut at the limit).
    close_at_budget: bool = True

    def __post_init__(self):
        def bad(name, why):
            raise InvalidRequestError(f"{name}={reprlib.repr(getattr(self, name))}: {why}")

        for name in ("max_tokens", "top_k", "repeat_last_n"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                bad(name, "must be an int")
        for name in ("temperature", "top_p", "min_p", "repeat_penalty"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                bad(name, "must be a finite number")
        if self.max_tokens < 0:
            bad("max_tokens", "must be >= 0")
        if self.temperature < 0:
            bad("temperature", "must be >= 0")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            bad("top_k", "must be >= 0")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must be in [0, 1]")
        if self.repeat_penalty <= 0:
            bad("repeat_penalty", "must be > 0")
        if self.repeat_last_n < -1:
            bad("repeat_last_n", "must be >= -1")
        for name in ("ignore_eos", "loop_guard", "close_at_budget"):
            if not isinstance(getattr(self, name), bool):
                bad(name, "must be True or False")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed < 2**32 - 1):
            bad("seed", "must be an int in [0, 2**32 - 1)")
        stop = self.stop
        if isinstance(stop, str):
            stop = (stop,)
        if stop is None:
            stop = ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            bad("stop", "must be a string or a sequence of strings")
        for s in stop:
            _text(s, "a stop string")
        if len(stop) > LIMITS["max_stops"] or any(len(s.encode("utf-8", "surrogatepass")) > LIMITS["max_stop_bytes"] for s in stop):
            bad("stop", f"at most {LIMITS['max_stops']} strings of at most {LIMITS['max_stop_bytes']} bytes")
        for name in ("max_tokens", "top_k", "repeat_last_n"):
            if getattr(self, name) > 2**31 - 1:
                bad(name, "must fit in 32 bits")
        object.__setattr__(self, "stop", tuple(s for s in stop if s))

    def to_native(self, logits_all: bool = False) -> "_engine.SamplingParams":
        p = _engine.SamplingParams()
        for f in fields(self):
            if f.name not in ("seed", "stop"):
                setattr(p, f.name, getattr(self, f.name))
        p.seed = 0xFFFFFFFF if self.seed is None else self.seed
        p.stop = list(self.stop)
        p.logits_all = logits_all
        return p


@dataclass(frozen=True)
class EngineConfig:
    n_ctx: int = 0               # longest request (prompt + output); 0 = min(model's, 8192)
    n_batch: int = 512           # tokens per decode step; bounds one step's latency
    max_running: int = 16        # requests decoded together; beyond it they queue
    cache_sequences: int = 16    # idle sequences kept to hold reusable prompt prefixes
    max_queued: int = 1024       # queued requests beyond this raise OverloadedError
    n_threads: int = 0           # 0 = every core; set lower to leave room for training
    prefix_reuse: bool = True
    # On: llama.cpp's CPU flash-attention kernel skips masked KV cells, so idle prefix
    # caches in the shared KV buffer cost little (decode with 12 cached prompts: 80
    # tok/s with it, 22 without). Off gives batch-invariant logits on f32 models.
    flash_attn: bool | None = True  # None = llama.cpp decides
    kv_f32: bool = False         # float32 KV: 2x KV memory; batched == alone to float32 rounding
    n_gpu_layers: int = 0        # needs a GPU build of llama.cpp (see README)
    use_mmap: bool = True
    # llama.cpp's repacked CPU weight layouts: faster. Off, with flash_attn off, prompt chunks
    # of a few dozen tokens or more compute the same KV however they are split (measured on
    # Gemma 3 270M Q4_K_M; with both on, a reused prefix moved the next logits by up to ~1).
    use_repack: bool = True
    fast_default: bool = True    # serve the embedded model as Q8_0 (see models.py)
    # Requests under different adapters share each decode: the engine adds every row's
    # LoRA term itself (cpp/row_lora.h). Off: one adapter set per decode, set on the
    # llama.cpp context (each switch re-reserves its graph). None = on when the model
    # runs on the CPU (n_gpu_layers == 0); a GPU would copy every adapted product out.
    mixed_adapters: bool | None = None

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in ("int",) and (not isinstance(v, int) or isinstance(v, bool) or not -2**31 <= v < 2**31):
                raise InvalidRequestError(f"{f.name}={reprlib.repr(v)}: must be an int that fits in 32 bits")
            if f.type == "bool" and not isinstance(v, bool):
                raise InvalidRequestError(f"{f.name}={reprlib.repr(v)}: must be True or False")
        for name in ("flash_attn", "mixed_adapters"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), bool):
                raise InvalidRequestError(f"{name}={reprlib.repr(getattr(self, name))}: must be True, False or None")
        if self.n_threads > MAX_THREADS:
            raise InvalidRequestError(f"n_threads={self.n_threads}: at most {MAX_THREADS} (twice this machine's cores)")
        if self.max_running + self.cache_sequences > _engine.max_parallel_sequences():
            raise InvalidRequestError(f"max_running + cache_sequences = {self.max_running + self.cache_sequences}: "
                                      f"llama.cpp runs at most {_engine.max_parallel_sequences()} sequences")
        if self.n_ctx < 0 or (0 < self.n_ctx < 16):
            raise InvalidRequestError(f"n_ctx={self.n_ctx}: must be 0 (model default) or >= 16")
        for name in ("n_batch", "max_running"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name}={getattr(self, name)}: must be >= 1")
        for name in ("cache_sequences", "max_queued", "n_threads", "n_gpu_layers"):
            if getattr(self, name) < 0:
                raise InvalidRequestError(f"{name}={getattr(self, name)}: must be >= 0")


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    name: str
    description: str
    n_ctx_train: int
    n_vocab: int
    n_embd: int
    n_layer: int
    n_params: int
    size_bytes: int
    chat_template: str
    bos_token: str
    eos_token: str


@dataclass
class Completion:
    text: str
    finish_reason: str           # "stop" | "length" | "cancelled"
    token_ids: list[int]
    prompt_tokens: int
    cached_tokens: int           # prompt tokens served from the prefix cache
    completion_tokens: int
    timings: dict[str, float] = field(default_factory=dict)  # queue_ms, ttft_ms, total_ms
    # Constrained output the engine closed itself (still a complete, valid value):
    # "budget" (max_tokens or the context was running out; finish_reason "length") or
    # "loop" (SamplingParams.loop_guard; finish_reason "stop"). None: the model closed it.
    closed_by: str | None = None


@dataclass
class StreamChunk:
    text: str
    token_ids: list[int]


class Request:
    """A submitted request. Iterate it for streamed chunks, or call result()."""

    def __init__(self, native: "_engine.Request", engine: "Engine"):
        self._native = native
        self._engine = engine
        self._text: list[str] = []
        self._tokens: list[int] = []
        self._done = False

    @property
    def id(self) -> int:
        return self._native.id

    def cancel(self) -> None:
        self._native.cancel()

    def _absorb(self, raw: bytes, toks: list[int], done: bool) -> StreamChunk | None:
        self._done = done
        if not raw and not toks:
            return None
        text = raw.decode("utf-8", errors="replace")
        self._text.append(text)
        self._tokens.extend(toks)
        return StreamChunk(text, list(toks))

    def __iter__(self) -> Iterator[StreamChunk]:
        while not self._done:
            chunk = self._absorb(*self._native.take(-1))
            if chunk is not None:
                yield chunk
        self._raise_if_failed()

    def _raise_if_failed(self) -> dict:
        out = self._native.outcome()
        if out["error_kind"]:
            raise _ERRORS.get(out["error_kind"], EngineError)(out["error_message"])
        return out

    def result(self, timeout: float | None = None) -> Completion:
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done:
            wait_ms = -1 if deadline is None else max(0, int((deadline - time.monotonic()) * 1000))
            self._absorb(*self._native.take(wait_ms))
            if not self._done and deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self._completion()

    def _completion(self) -> Completion:
        out = self._raise_if_failed()
        s = out["stats"]
        return Completion(
            text="".join(self._text), finish_reason=out["finish_reason"], token_ids=list(self._tokens),
            prompt_tokens=s["prompt_tokens"], cached_tokens=s["cached_tokens"],
            completion_tokens=s["completion_tokens"],
            timings={k: s[k] for k in ("queue_ms", "ttft_ms", "total_ms")},
            closed_by=out.get("closed_by") or None)

    def logits(self):
        """(prompt_tokens, n_vocab) float32 array; only for submit(..., logits_all=True)."""
        return self._native.logits()


class _AsyncPump:
    """One thread per engine turns native 'request has output' signals into asyncio
    wake-ups, so any number of tasks wait without a thread each."""

    def __init__(self, native_engine):
        self._native = native_engine
        self._waiters: dict[int, tuple[asyncio.AbstractEventLoop, asyncio.Event]] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="mtllm-async-pump", daemon=True)
        self._thread.start()

    def register(self, rid: int, loop, event) -> None:
        with self._lock:
            self._waiters[rid] = (loop, event)

    def unregister(self, rid: int) -> None:
        with self._lock:
            self._waiters.pop(rid, None)

    def join(self, timeout: float) -> None:
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self):
        while not self._native.closed:
            ids = self._native.wait_ready(100)
            with self._lock:
                targets = [self._waiters.get(i) for i in ids]
            for t in targets:
                if t is not None:
                    loop, event = t
                    try:
                        loop.call_soon_threadsafe(event.set)
                    except RuntimeError:  # loop closed
                        pass
        with self._lock:
            targets = list(self._waiters.values())
        for loop, event in targets:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:
                pass


class AsyncRequest:
    """A submitted request awaited from asyncio: iterate it for chunks, then
    `completion()`. Leaving it (`async with`, or `aclose`) unfinished cancels it."""

    def __init__(self, request: Request, pump: _AsyncPump, loop: asyncio.AbstractEventLoop):
        self.request = request
        self._pump = pump
        self._event = asyncio.Event()
        pump.register(request.id, loop, self._event)

    async def __aenter__(self) -> "AsyncRequest":
        return self

    async def __aexit__(self, *exc) -> None:
        self.aclose()

    def aclose(self) -> None:
        self._pump.unregister(self.request.id)
        if not self.request._done:  # a cancelled task or a consumer that stopped early
            self.request.cancel()

    def __aiter__(self) -> AsyncIterator[StreamChunk]:
        return self._chunks()

    async def _chunks(self) -> AsyncIterator[StreamChunk]:
        req = self.request
        while not req._done:
            self._event.clear()  # before take(0): a wake-up after it is never lost
            chunk = req._absorb(*req._native.take(0))
            if chunk is not None:
                yield chunk
            elif not req._done:
                await self._event.wait()
        req._raise_if_failed()

    def completion(self) -> Completion:
        """The finished request's record (raises what the engine raised for it)."""
        if not self.request._done:
            raise RuntimeError("completion() before the request finished; iterate it first")
        return self.request._completion()


class Engine:
    """A model plus its serving loop. Thread-safe; share one per process."""

    def __init__(self, model: str | os.PathLike | None = None, config: EngineConfig | None = None, **overrides):
        if config is not None and not isinstance(config, EngineConfig):
            raise InvalidRequestError(f"config must be an EngineConfig, not {type(config).__name__}")
        config = _replace(config or EngineConfig(), overrides, "engine") if overrides else (config or EngineConfig())
        self.config = config
        path = models.resolve(model, fast_default=config.fast_default)
        flash = -1 if config.flash_attn is None else int(config.flash_attn)
        self._vet_settings = dict(n_gpu_layers=config.n_gpu_layers, flash_attn=flash, kv_f32=config.kv_f32,
                                  use_mmap=config.use_mmap, use_repack=config.use_repack)
        vetting.vet_model(str(path), **self._vet_settings)
        if config.n_gpu_layers > 0 and not _engine.supports_gpu_offload():
            log.warning("n_gpu_layers=%d, but this llama.cpp has no GPU backend: every layer runs on the CPU "
                        "(README: the CUDA build)", config.n_gpu_layers)
        mp = _engine.ModelParams()
        mp.n_gpu_layers = config.n_gpu_layers
        mp.use_mmap = config.use_mmap
        mp.use_repack = config.use_repack
        self._model = _engine.Model(str(path), mp)
        template_source = read_template_source(self._model)  # before the native engine: a bad template leaks nothing
        self.chat_template = ChatTemplate(template_source, bos_token=self._piece(self._model.bos),
                                          eos_token=self._piece(self._model.eos))
        self._prompt_encoder = PromptEncoder.for_model(self._model, self.chat_template)
        self._max_piece_bytes = self._model.max_piece_bytes
        ep = _engine.EngineParams()
        for name in ("n_ctx", "n_batch", "max_running", "cache_sequences", "max_queued", "n_threads", "prefix_reuse", "kv_f32"):
            setattr(ep, name, getattr(config, name))
        ep.flash_attn = flash
        ep.mixed_adapters = config.n_gpu_layers == 0 if config.mixed_adapters is None else config.mixed_adapters
        self._native = _engine.Engine(self._model, ep)
        self._max_prompt_chars = self._native.n_ctx * self._max_piece_bytes
        self._pump: _AsyncPump | None = None
        self._guidance_set = False
        self._pump_lock = threading.Lock()
        m = self._model
        self.info = ModelInfo(
            path=str(path), architecture=m.meta("general.architecture"), name=m.meta("general.name"),
            description=m.description, n_ctx_train=m.n_ctx_train, n_vocab=m.n_vocab, n_embd=m.n_embd,
            n_layer=m.n_layer, n_params=m.n_params, size_bytes=m.size_bytes, chat_template=template_source or "",
            bos_token=self.chat_template.bos_token, eos_token=self.chat_template.eos_token)
        weakref.finalize(self, _native_close, self._native)
        _LIVE_ENGINES.add(self)

    # ---------------------------------------------------------------- model
    def _piece(self, tok: int) -> str:
        return self._model.token_piece(tok, True).decode("utf-8", "replace") if tok >= 0 else ""

    @property
    def n_ctx(self) -> int:
        return self._native.n_ctx

    def tokenize(self, text: str, *, add_special: bool = True, parse_special: bool = False) -> list[int]:
        return self._model.tokenize(_text(text, "text"), bool(add_special), bool(parse_special))

    def detokenize(self, tokens: Sequence[int], *, special: bool = False) -> str:
        return self._model.detokenize(self._token_ids(tokens, "tokens"), bool(special))

    def _token_ids(self, tokens: Any, what: str) -> list[int]:
        if isinstance(tokens, (str, bytes)) or not isinstance(tokens, Sequence):
            raise InvalidRequestError(f"{what} must be a list of token ids")
        n = self.info.n_vocab if hasattr(self, "info") else self._model.n_vocab
        for t in tokens:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < n:
                raise InvalidRequestError(f"{what}: token id {reprlib.repr(t)} out of range [0, {n})")
        return list(tokens)

    def render(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **extra) -> str:
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra)

    def encode_chat(self, messages: Sequence[Message], *, add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, **extra) -> list[int]:
        """Messages -> prompt token ids, exactly as served (and as trained on): the template's
        markup becomes special tokens, special-token text inside messages stays text (chat.PromptEncoder)."""
        self._check_prompt_bytes("".join(_content_strings(messages)))
        return self._prompt_encoder.encode(messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra)

    # ---------------------------------------------------------------- requests
    def _prompt_ids(self, prompt, messages, tools) -> list[int]:
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("pass exactly one of prompt= or messages=")
        if messages is not None:
            return self.encode_chat(messages, tools=tools)
        if isinstance(prompt, str):
            self._check_prompt_bytes(prompt)
            return self.tokenize(prompt, add_special=True, parse_special=True)
        if isinstance(prompt, (list, tuple)):
            return self._token_ids(prompt, "prompt")
        raise InvalidRequestError("prompt must be a str or a list of token ids")

    def _check_prompt_bytes(self, text: str) -> None:
        """Refuse text that cannot fit before tokenizing it: no token is longer than
        the vocabulary's longest piece, so more bytes than n_ctx of those overflow
        (tokenizing megabytes of special-token text took seconds)."""
        if len(text) > self._max_prompt_chars:
            raise ContextOverflowError(f"the prompt is {len(text)} characters; the context ({self.n_ctx} tokens "
                                       f"of at most {self._max_piece_bytes} bytes) cannot hold it")

    def submit(self, prompt: str | Sequence[int] | None = None, *, messages: Sequence[Message] | None = None,
               sampling: SamplingParams | None = None, tools: list[dict] | None = None,
               adapters: Sequence[tuple[int, float]] = (), logits_all: bool = False,
               response_format: Mapping[str, Any] | None = None, tool_choice: Any = "auto",
               grammar: constraints.Grammar | None = None, _notify: bool = False, **sampling_kw) -> Request:
        """Queue a request and return at once; the engine batches it with the others.

        Output constraints (at most one): `response_format` (OpenAI: json_schema or
        json_object), `tools` with `tool_choice` (a well-formed call of one of them),
        or an explicit `grammar` (json_schema, regex or lark)."""
        if sampling is not None and not isinstance(sampling, SamplingParams):
            raise InvalidRequestError(f"sampling must be a SamplingParams, not {type(sampling).__name__}")
        if grammar is not None and not isinstance(grammar, constraints.Grammar):
            raise InvalidRequestError(f"grammar must be a constraints.Grammar, not {type(grammar).__name__}")
        if grammar is not None:
            _text(grammar.data, "grammar text")
        if sampling_kw:
            sampling = _replace(sampling or SamplingParams(), sampling_kw, "sampling")
        sampling = sampling or SamplingParams()
        ids = self._prompt_ids(prompt, messages, tools)
        chosen = [g for g in (grammar, constraints.from_response_format(response_format),
                              constraints.from_tools(tools, tool_choice)) if g is not None]
        if len(chosen) > 1:
            raise InvalidRequestError("pass only one of grammar=, response_format= and tools=")
        kind, data = (chosen[0].kind, chosen[0].data) if chosen else ("", "")
        if kind and not self._guidance_set:
            self._native.set_guidance_library(constraints.guidance_library())
            self._guidance_set = True
        native = self._native.submit(ids, sampling.to_native(logits_all), _adapter_set(adapters), _notify, kind, data)
        return Request(native, self)

    def generate(self, prompt=None, **kw) -> Completion:
        return self.submit(prompt, **kw).result()

    def stream(self, prompt=None, **kw) -> Iterator[StreamChunk]:
        req = self.submit(prompt, **kw)
        try:
            yield from req
        finally:
            if not req._done:  # consumer stopped early: free the slot
                req.cancel()

    def _async_pump(self) -> _AsyncPump:
        with self._pump_lock:
            if self._pump is None:
                self._pump = _AsyncPump(self._native)
            return self._pump

    def asubmit(self, prompt=None, **kw) -> "AsyncRequest":
        """`submit` for asyncio: `async for chunk in req`, then `req.completion()`.
        Call it from the event loop that will await it."""
        loop = asyncio.get_running_loop()  # first: outside a loop nothing is queued
        req = self.submit(prompt, _notify=True, **kw)
        return AsyncRequest(req, self._async_pump(), loop)

    async def astream(self, prompt=None, **kw) -> AsyncIterator[StreamChunk]:
        async with self.asubmit(prompt, **kw) as req:
            async for chunk in req:
                yield chunk

    async def agenerate(self, prompt=None, **kw) -> Completion:
        async with self.asubmit(prompt, **kw) as req:
            async for _ in req:
                pass
            return req.completion()

    # ---------------------------------------------------------------- adapters
    def load_adapter(self, path: str | os.PathLike) -> int:
        """Load a GGUF LoRA adapter into the running engine; returns its id. Ids are
        never reused, so a reloaded file is a new version with its own prefix cache."""
        if not isinstance(path, (str, os.PathLike)):
            raise InvalidRequestError(f"adapter path must be a str or path, not {type(path).__name__}")
        try:
            p = models.check_gguf(path)
        except ModelLoadError as e:
            raise AdapterLoadError(str(e).replace("model file", "adapter file")) from None
        if self.closed:
            raise EngineClosedError("engine is closed")
        vetting.check_adapter_file(str(p), self.info.architecture)
        vetting.vet_adapter(self.info.path, str(p), **self._vet_settings)
        return self._native.load_adapter(str(p))

    def unload_adapter(self, adapter_id: int) -> None:
        if not isinstance(adapter_id, int) or isinstance(adapter_id, bool) or not 0 <= adapter_id < 2**63:
            raise InvalidRequestError(f"adapter {reprlib.repr(adapter_id)} is not an id from load_adapter()")
        self._native.unload_adapter(adapter_id)

    def adapters(self) -> list[tuple[int, str]]:
        return self._native.adapters()

    # ---------------------------------------------------------------- lifecycle
    def set_threads(self, n: int) -> None:
        """Decode with n threads from the next step on (0 = as configured; never more).
        For sharing the cores with a training process: ggml's workers spin-wait, so an
        engine that keeps all its threads while another process holds a core slows down
        many times over instead of by the core it lost."""
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_THREADS:
            raise InvalidRequestError(f"threads must be an int in [0, {MAX_THREADS}], not {reprlib.repr(n)}")
        self._native.set_threads(n)

    @property
    def threads(self) -> int:
        """Threads the last decode step used."""
        return self._native.threads

    def stats(self) -> dict:
        return self._native.stats()

    def close(self) -> None:
        self._native.close()
        # The pump must leave native code before the interpreter finalizes, or its
        # return into Python from a daemon thread would abort the process.
        if self._pump is not None:
            self._pump.join(timeout=5)

    @property
    def closed(self) -> bool:
        return self._native.closed

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _content_strings(messages) -> Iterator[str]:
    """The message texts a prompt contains at least (a lower bound on its size)."""
    if isinstance(messages, Sequence) and not isinstance(messages, (str, bytes)):
        for m in messages:
            content = m.get("content") if isinstance(m, Mapping) else None
            if isinstance(content, str):
                yield content
            elif isinstance(content, list):
                yield from (p["text"] for p in content if isinstance(p, Mapping) and isinstance(p.get("text"), str))


def _adapter_set(adapters) -> list[tuple[int, float]]:
    out = []
    try:
        pairs = [(a, s) for a, s in adapters]
    except (TypeError, ValueError):
        raise InvalidRequestError("adapters must be a sequence of (adapter id, scale) pairs") from None
    for a, s in pairs:
        if not isinstance(a, int) or isinstance(a, bool) or not 0 <= a < 2**63:
            raise InvalidRequestError(f"adapter id {reprlib.repr(a)} is not an id from load_adapter()")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not math.isfinite(s) or abs(s) > LIMITS["max_adapter_scale"]:
            raise InvalidRequestError(f"adapter scale {reprlib.repr(s)} must be a finite number within ±{LIMITS['max_adapter_scale']:g}")
        out.append((a, float(s)))
    return out


def _native_close(native) -> None:
    native.close()


_LIVE_ENGINES: "weakref.WeakSet[Engine]" = weakref.WeakSet()


@atexit.register
def _close_live_engines() -> None:
    for eng in list(_LIVE_ENGINES):
        eng.close()


def route_llama_logs_to_logging(level: int = logging.WARNING) -> None:
    """llama.cpp is silent by default; this forwards its lines to `logging`."""
    ggml_to_logging = {1: logging.DEBUG, 2: logging.INFO, 3: logging.WARNING, 4: logging.ERROR, 5: logging.DEBUG}
    native_min = {logging.DEBUG: 1, logging.INFO: 2, logging.WARNING: 3, logging.ERROR: 4}.get(level, 3)
    llama_log = logging.getLogger("mtllm_locally.llama_cpp")

    def sink(lvl: int, text: str) -> None:
        text = text.rstrip()
        if text:
            llama_log.log(ggml_to_logging.get(lvl, logging.INFO), text)

    _engine.set_log_sink(sink, native_min)


def silence_llama_logs() -> None:
    _engine.set_log_sink(None)
