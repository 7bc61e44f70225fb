"""Render chat messages with the model's own chat template, safely, and encode them.

The template comes from the GGUF file, so it is untrusted code: it runs in jinja2's
ImmutableSandboxedEnvironment (no attribute escapes, no mutation of our objects), with
every render bounded in time and in size (`RenderLimits`), and any failure inside it
becomes `TemplateError`. The messages are untrusted text: `PromptEncoder` tokenizes them
so that only the template's own markup can produce special tokens. Serving and training
both call `PromptEncoder.encode`, so the model sees byte-identical prompts in both.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import reprlib
import string
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from itertools import chain
from typing import Any, Callable, Iterable, Mapping, Sequence

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, _PassArg

from .errors import ContextOverflowError, InvalidRequestError, TemplateError

# Used when a GGUF carries no template: ChatML, the format most small instruct models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}


@dataclass(frozen=True)
class RenderLimits:
    """What one render of an untrusted chat template may cost. Exceeding any is a `TemplateError`."""
    seconds: float = 2.0               # real templates render in about a millisecond; a caller waits at most this
    max_chars: int = 4 << 20           # the prompt, and any value built on the way (~1M tokens: past any local context)
    max_source_chars: int = 256 << 10  # the template text (the largest published chat templates are ~20 KB)

    def __post_init__(self):
        if not (isinstance(self.seconds, (int, float)) and math.isfinite(self.seconds) and self.seconds > 0):
            raise InvalidRequestError(f"RenderLimits.seconds={self.seconds!r}: must be a positive number")
        for name in ("max_chars", "max_source_chars"):
            v = getattr(self, name)
            if not (isinstance(v, int) and not isinstance(v, bool) and v > 0):
                raise InvalidRequestError(f"RenderLimits.{name}={v!r}: must be a positive int")


DEFAULT_LIMITS = RenderLimits()

_MAX_INT_BITS = 1 << 14  # ints a template may build by * and ** (str() refuses ints over 4300 digits anyway)
_MAX_SLICES = 100_000     # |slice(n) makes n lists; as many as jinja's own range() limit
_MAX_DEPTH = 200          # nesting of messages and tools (JSON schemas nest a few levels; Python recursion ~1000)


def _raise_exception(message: str):
    raise TemplateError(f"chat template raised: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt)[:256])


def read_template_source(model) -> str | None:
    """The chat template of a native `_engine.Model` as text, or None when it has none.
    GGUF strings are bytes that should be UTF-8; a template that is not fails here as
    `TemplateError`, not as a UnicodeDecodeError from the binding."""
    try:
        raw = model.chat_template_bytes if hasattr(model, "chat_template_bytes") else model.chat_template
        if isinstance(raw, (bytes, bytearray)):
            raw = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(f"the model's chat template is not valid UTF-8 (byte {e.start}): the GGUF's "
                            "tokenizer.chat_template metadata is corrupt") from None
    return raw or None


# ---------------------------------------------------------------------------- bounds
#
# Why a watchdog that raises into the rendering thread. Bounding output per chunk
# (`Template.generate`) catches templates that print too much, and hooks in the sandbox
# (calls, filters, operators) see values being built, but an empty-bodied nested loop
# (`{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}`)
# runs ten billion iterations of compiled Python with no output and no hook. A render
# in another thread could be abandoned but not stopped (it would burn a core forever);
# a child process per render costs milliseconds and a second interpreter. CPython's
# PyThreadState_SetAsyncExc makes the rendering thread itself raise at its next
# bytecode boundary, which every loop reaches, so the render stops where it is and
# unwinds normally. One daemon thread serves every render; each render is armed with
# its deadline and fired at most once, only while armed, and a shot that lands after
# the render finished is cleared before returning (see `_bounded`). What an async
# exception cannot interrupt is one long C call, so nothing in the sandbox may start
# one: every operation that can allocate more than its inputs (`*`, `**`, `+`, `%`,
# `~`, str methods, filters, output of containers, block bodies) is sized before it
# runs, against `max_chars`.


class _RenderTimeout(BaseException):
    """Raised inside the rendering thread at its deadline (BaseException: nothing in jinja catches it)."""


class _TooLarge(Exception):
    pass


def _async_exc_api():
    try:
        proto = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)
        clear = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
        name = ("PyThreadState_SetAsyncExc", ctypes.pythonapi)
        return proto(name), clear(name)
    except (AttributeError, OSError):  # not CPython: the per-chunk and per-hook deadline checks remain
        return None, None


_SET_ASYNC_EXC, _CLEAR_ASYNC_EXC = _async_exc_api()


class _Armed:
    __slots__ = ("thread_id", "deadline", "fired")

    def __init__(self, thread_id: int, deadline: float):
        self.thread_id, self.deadline, self.fired = thread_id, deadline, False


class _Watchdog:
    def __init__(self):
        self._reset()
        if hasattr(os, "register_at_fork"):
            os.register_at_fork(after_in_child=self._reset)  # the thread does not survive fork; its lock may be held

    def _reset(self):
        self._cond = threading.Condition(threading.Lock())
        self._armed: set[_Armed] = set()
        self._thread: threading.Thread | None = None
        self._wake_at: float | None = None  # when the thread will next look (None: only when notified)

    def arm(self, entry: _Armed) -> None:
        if _SET_ASYNC_EXC is None:
            return
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="mtllm-template-watchdog", daemon=True)
                self._thread.start()
            self._armed.add(entry)
            if self._wake_at is None or entry.deadline < self._wake_at:
                self._cond.notify()  # else the thread looks before this deadline anyway: no wake-up per render

    def disarm(self, entry: _Armed) -> bool:
        """Never fires for `entry` after this; True if it already did."""
        with self._cond:
            self._armed.discard(entry)
            return entry.fired

    def _run(self) -> None:
        cond = self._cond
        with cond:
            while True:
                now = time.monotonic()
                for e in [e for e in self._armed if e.deadline <= now]:
                    self._armed.discard(e)
                    e.fired = True
                    _SET_ASYNC_EXC(e.thread_id, _RenderTimeout)
                self._wake_at = min((e.deadline for e in self._armed), default=None)
                cond.wait(None if self._wake_at is None else max(self._wake_at - now, 0.001))


_WATCHDOG = _Watchdog()
_RENDER = threading.local()  # this thread's render: .deadline, .marking


def _tick() -> None:
    deadline = getattr(_RENDER, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _RenderTimeout


def _bounded(fn: Callable[[], Any], limits: RenderLimits, what: str, *, marking: bool = False) -> Any:
    """fn() in this thread, stopped at `limits.seconds`; every failure becomes TemplateError."""
    prev = (getattr(_RENDER, "deadline", None), getattr(_RENDER, "marking", False))
    entry = _Armed(threading.get_ident(), time.monotonic() + limits.seconds)
    try:
        try:
            _RENDER.deadline, _RENDER.marking = entry.deadline, marking
            _WATCHDOG.arm(entry)
            return fn()
        finally:
            _RENDER.deadline, _RENDER.marking = prev
            # After disarm() nothing fires; a shot fired before it but not yet raised is cleared
            # here (if it lands first, it is caught below like any timeout).
            if _WATCHDOG.disarm(entry):
                _CLEAR_ASYNC_EXC(entry.thread_id, None)
    except _RenderTimeout:
        raise TemplateError(f"the chat template took longer than {limits.seconds:g} s to {what} "
                            "(RenderLimits.seconds)") from None
    except _TooLarge as e:
        raise TemplateError(f"the chat template's {what} exceeded {limits.max_chars} characters "
                            f"(RenderLimits.max_chars): {e}") from None
    except TemplateError:
        raise
    except SecurityError as e:
        raise TemplateError(f"the chat template tried an unsafe operation: {e}") from e
    except Exception as e:  # a template is code: any failure (RecursionError, MemoryError, ...) is the template's
        raise TemplateError(f"the chat template failed to {what}: {type(e).__name__}: {e}") from e


_END = object()


def _text_size(value: Any, budget: int, per_depth: int = 0) -> int:
    """At least about len(str(value)), found by walking no more than ~budget units: returns
    a number > budget as soon as the value is known to exceed it. Shared sub-objects count
    each time they are reached, as str() would print them. `per_depth` adds indentation."""
    if isinstance(value, str):
        return len(value)
    total = 0
    stack = [(iter((value,)), 0, 0)]
    path: set[int] = set()  # containers being walked: one met again is a cycle, which repr() prints as '...'
    while stack:
        it, depth, key = stack[-1]
        v = next(it, _END)
        if v is _END:
            stack.pop()
            path.discard(key)
            continue
        total += 2 + per_depth * depth
        t = type(v)
        if t is str:
            total += len(v)
            children = None
        elif t is dict:
            children = chain.from_iterable(v.items())
        elif t is list or t is tuple:
            children = iter(v)
        elif isinstance(v, str):
            total += len(v)
            children = None
        elif isinstance(v, Mapping):
            children = chain.from_iterable(v.items())
        elif isinstance(v, (list, tuple, set, frozenset)):
            children = iter(v)
        elif isinstance(v, Namespace):
            children = chain.from_iterable(v._Namespace__attrs.items())
        else:
            children = None
            if isinstance(v, (bytes, bytearray)):
                total += 4 * len(v)
            elif isinstance(v, bool) or v is None:
                total += 4
            elif isinstance(v, int):
                total += v.bit_length() // 3
            elif isinstance(v, float):
                total += 24
            elif not isinstance(v, jinja2.Undefined):
                total += 64  # ranges, loops, macros, generators: short reprs
        if children is not None and id(v) not in path:
            path.add(id(v))
            stack.append((children, depth + 1, id(v)))
        if total > budget:
            return total
    return total


def _arg(args: Sequence, kwargs: Mapping, i: int, name: str, default: Any = None) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _len(v: Any) -> int:
    return len(v) if isinstance(v, (str, bytes, list, tuple)) else 0


def _format_fields(fmt: str, depth: int = 0) -> tuple[int, int]:
    """(replacement fields, widest width or precision) of a str.format string."""
    fields = widest = 0
    for _, field, spec, _ in string.Formatter().parse(fmt):
        if field is None:
            continue
        fields += 1
        for digits in re.findall(r"\d+", spec or ""):
            widest = max(widest, int(digits) if len(digits) < 12 else 1 << 62)
        if spec and "{" in spec and depth < 2:
            f, w = _format_fields(spec, depth + 1)
            fields, widest = fields + f, max(widest, w)
    return fields, widest


_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _percent_size(fmt: str | bytes, args: Any, budget: int) -> int:
    """An upper bound on the length of `fmt % args`."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    count = widest = 0
    for m in _PERCENT.finditer(text):
        count += 1
        for g in m.groups():
            if g and g != "*":
                widest = max(widest, int(g) if len(g) < 12 else 1 << 62)
    values = args.values() if isinstance(args, Mapping) else args if isinstance(args, tuple) else (args,)
    biggest = max((_text_size(v, budget) for v in values), default=0)
    return len(text) + count * (biggest + widest)


# Filters whose output can be much larger than their inputs: an upper bound of the output
# from (args, kwargs) without the pass-through first argument. Others are linear in their
# inputs, which are bounded; `join` also hands back its materialized items.
def _est_indent(env, a, k):
    s, width = str(a[0]), _arg(a, k, 1, "width", 4)
    return len(s) + (s.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))


def _est_wordwrap(env, a, k):
    wrap = _arg(a, k, 3, "wrapstring", None)
    return _text_size(a[0], env.limits.max_chars) * (1 + len(str(wrap) if wrap is not None else "\n"))


def _est_replace(env, a, k):
    s, old, new, count = str(a[0]), str(_arg(a, k, 1, "old", "")), str(_arg(a, k, 2, "new", "")), _arg(a, k, 3, "count")
    occ = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        occ = min(occ, count)
    return len(s) + occ * len(new)


def _est_format(env, a, k):
    return _percent_size(str(a[0]), k or tuple(a[1:]), env.limits.max_chars)


def _est_pprint(env, a, k):
    return 2 * _text_size(a[0], env.limits.max_chars, per_depth=1)


def _est_tojson(env, a, k):
    indent = _arg(a, k, 1, "indent", None)
    return _text_size(a[0], env.limits.max_chars, per_depth=(indent if isinstance(indent, int) and indent > 0 else 0) + 1)


def _est_slice(env, a, k):
    slices = _arg(a, k, 1, "slices", 0)
    if isinstance(slices, int) and slices > _MAX_SLICES:
        raise _TooLarge(f"slice({slices}) makes more than {_MAX_SLICES} lists")
    return 0


_FILTER_ESTIMATES: dict[str, Callable] = {
    "indent": _est_indent, "wordwrap": _est_wordwrap, "replace": _est_replace, "format": _est_format,
    "pprint": _est_pprint, "tojson": _est_tojson, "slice": _est_slice,
}


def _bounded_filter(env: "_BoundedSandbox", name: str, f: Callable) -> Callable:
    skip = 1 if _PassArg.from_obj(f) is not None else 0
    estimate = _FILTER_ESTIMATES.get(name)

    @wraps(f)  # keeps jinja_pass_arg
    def bounded(*args, **kwargs):
        _tick()
        own = args[skip:]
        env.check_args(own, kwargs)
        if name == "join":  # items may be a generator: count them once, then hand them on
            items = list(own[0]) if own else []
            d = _arg(own, kwargs, 1, "d", "")
            env.limit(sum(_text_size(x, env.limits.max_chars) for x in items) + len(items) * len(str(d)))
            args = (*args[:skip], items, *own[1:])
        elif estimate is not None and own:
            env.limit(estimate(env, own, kwargs))
        result = f(*args, **kwargs)
        env.check_value(result)
        return result

    return bounded


def _str_method_size(name: str, s: str | bytes, args: tuple, kwargs: dict) -> tuple[int, tuple]:
    """(an upper bound on the result's length, the args to call with) for a str/bytes method."""
    n = len(s)
    if name in ("center", "ljust", "rjust", "zfill"):
        width = _arg(args, kwargs, 0, "width", 0)
        return max(n, width if isinstance(width, int) else 0), args
    if name == "expandtabs":
        tab = _arg(args, kwargs, 0, "tabsize", 8)
        return n + s.count("\t" if isinstance(s, str) else b"\t") * max(tab if isinstance(tab, int) else 0, 0), args
    if name == "replace":
        old, new, count = _arg(args, kwargs, 0, "old", ""), _arg(args, kwargs, 1, "new", ""), _arg(args, kwargs, 2, "count", -1)
        if isinstance(old, (str, bytes)) and isinstance(new, (str, bytes)) and type(old) is type(new) is type(s):
            occ = n + 1 if not old else s.count(old)
            if isinstance(count, int) and count >= 0:
                occ = min(occ, count)
            return n + occ * len(new), args
        return n, args
    if name == "join" and args:
        items = list(args[0])
        return sum(map(_len, items)) + n * max(len(items) - 1, 0), (items, *args[1:])
    if name == "translate" and args:
        table = args[0]
        longest = max((_len(v) for v in table.values()), default=1) if isinstance(table, Mapping) else 1
        return n * max(longest, 1), args
    return n, args  # every other str method: about its input (upper/encode up to 4x, checked after the call)


_ESCAPED_MARK = re.compile(r"(?<!\\)((?:\\\\)*)\\u(fdd[01])", re.IGNORECASE)


def _keep_marks(text: str) -> str:
    """repr() and json escape our marks (noncharacters); put them back so spans stay marked."""
    return _ESCAPED_MARK.sub(lambda m: m.group(1) + chr(int(m.group(2), 16)), text) if "\\" in text else text


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # HF templates expect tojson without HTML escaping (jinja2's default escapes <>&').
    out = json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)
    return _keep_marks(out) if ensure_ascii and getattr(_RENDER, "marking", False) else out


class _BoundedCodeGenerator(CodeGenerator):
    def visit_Concat(self, node, frame):  # `a ~ b ~ c`: sized before it is built
        self.write("environment.bounded_concat(context, (")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, with every operation that could build a value larger than its
    inputs sized first (see the note above `_RenderTimeout`), and `lipsum` removed (no chat
    template prints random text; its cost is proportional to its argument)."""

    intercepted_binops = frozenset({"+", "*", "**", "%"})
    code_generator_class = _BoundedCodeGenerator

    def __init__(self, limits: RenderLimits):
        self.limits = limits
        super().__init__(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined, finalize=self._finalize)
        self.globals.pop("lipsum", None)
        self.globals["raise_exception"] = _raise_exception
        self.globals["strftime_now"] = _strftime_now
        self.filters["tojson"] = _tojson
        self.filters = {name: _bounded_filter(self, name, f) for name, f in self.filters.items()}

    # -- sizes
    def limit(self, size: int, what: str = "a value") -> None:
        if size > self.limits.max_chars:
            raise _TooLarge(f"{what} of {size}+ characters")

    def check_value(self, value: Any) -> None:
        self.limit(_text_size(value, self.limits.max_chars))

    def check_args(self, args: Sequence, kwargs: Mapping) -> None:
        budget, total = self.limits.max_chars, 0
        for v in chain(args, kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > budget:
                raise _TooLarge(f"an argument of {v}")
            total += _text_size(v, budget - total)
            self.limit(total, "arguments")

    # -- hooks jinja calls
    def call_binop(self, context, operator, left, right):
        if operator == "+" and type(left) is str and type(right) is str:  # most of what templates do
            self.limit(len(left) + len(right), "a sum")
            return left + right
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                    raise _TooLarge(f"a product of more than {_MAX_INT_BITS} bits")
            else:
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                        self.limit(len(seq) * max(n, 0), "a repetition")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and left.bit_length() * right > _MAX_INT_BITS:
                raise _TooLarge(f"a power of more than {_MAX_INT_BITS} bits")
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
                self.limit(len(left) + len(right), "a sum")
        elif operator == "%" and isinstance(left, (str, bytes)):
            self.limit(_percent_size(left, right, self.limits.max_chars), "a %-format")
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        _tick()
        self.check_args(args, kwargs)
        recv = getattr(obj, "__self__", None)
        if isinstance(recv, (str, bytes)) and not isinstance(recv, type):
            size, args = _str_method_size(getattr(obj, "__name__", ""), recv, args, kwargs)
            self.limit(size, f"the result of {getattr(obj, '__name__', 'a method')}()")
        result = super().call(context, obj, *args, **kwargs)
        self.check_value(result)
        return result

    def wrap_str_format(self, value):
        wrapper = super().wrap_str_format(value)
        if wrapper is None:
            return None
        fmt, is_map = value.__self__, value.__name__ == "format_map"

        @wraps(wrapper)
        def bounded(*args, **kwargs):
            _tick()
            fields, widest = _format_fields(fmt)
            values = list(args[0].values()) if is_map and args and isinstance(args[0], Mapping) else [*args, *kwargs.values()]
            biggest = max((_text_size(v, self.limits.max_chars) for v in values), default=0)
            self.limit(len(fmt) + fields * (biggest + widest), "a str.format result")
            result = wrapper(*args, **kwargs)
            self.check_value(result)
            return result

        return bounded

    def bounded_concat(self, context, args):
        _tick()
        total = 0
        for a in args:
            total += _text_size(a, self.limits.max_chars - total)
            self.limit(total, "a ~ concatenation")
        if context.eval_ctx.autoescape:
            return markup_join(args)
        if getattr(_RENDER, "marking", False):
            args = [a if isinstance(a, str) else _keep_marks(str(a)) for a in args]
        return str_join(args)

    def concat(self, parts):  # a block's output: macros, {% set %} and {% filter %} blocks
        if not isinstance(parts, list):
            parts = list(parts)
        self.limit(sum(map(len, parts)), "a block's output")
        return "".join(parts)

    def _finalize(self, value):  # every {{ expression }} before it is printed
        if isinstance(value, str):
            return value
        self.check_value(value)
        if getattr(_RENDER, "marking", False) and not isinstance(value, jinja2.Undefined):
            return _keep_marks(str(value))
        return value


# ---------------------------------------------------------------------------- messages
def _content_text(content: Any) -> str:
    """OpenAI content may be a string or a list of parts; templates want text."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") in ("text", "input_text"):
                text = part.get("text", "")
                if not isinstance(text, str):
                    raise InvalidRequestError(f"a text content part's 'text' must be a str, not {type(text).__name__}")
                parts.append(text)
            elif isinstance(part, Mapping) and part.get("type") in ("image_url", "input_image", "input_audio"):
                raise InvalidRequestError(f"content part of type {part.get('type')!r} is not supported by a text model")
            else:
                raise InvalidRequestError(f"unsupported content part: {reprlib.repr(part)}")  # bounded, any depth
        return "".join(parts)
    raise InvalidRequestError(f"message content must be a string or a list of parts, not {type(content).__name__}")


def normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Iterable):
        raise InvalidRequestError(f"messages must be a list of mappings, not {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"message {i} must be a mapping with 'role' and 'content'")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise InvalidRequestError(f"message {i} has unsupported role {reprlib.repr(role)}")
        msg = dict(m)
        msg["content"] = _content_text(m.get("content"))
        out.append(msg)
    if not out:
        raise InvalidRequestError("messages is empty")
    return out


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "",
                 limits: RenderLimits | None = None):
        self.source = source or CHATML_TEMPLATE
        self.is_fallback = not source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.limits = limits or DEFAULT_LIMITS
        if not isinstance(self.source, str):
            raise TemplateError(f"a chat template must be text, not {type(self.source).__name__}")
        if len(self.source) > self.limits.max_source_chars:
            raise TemplateError(f"the model's chat template is {len(self.source)} characters, over "
                                f"RenderLimits.max_source_chars={self.limits.max_source_chars}")
        env = _BoundedSandbox(self.limits)

        def compile_():
            try:
                return env.from_string(self.source)
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(f"the model's chat template does not parse: {e}") from e

        self._template = _bounded(compile_, self.limits, "compile")

    def variables(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                  tools: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
        """What the template sees: messages validated and normalized, plus the standard names."""
        return dict(messages=normalize_messages(messages), add_generation_prompt=add_generation_prompt, tools=tools,
                    bos_token=self.bos_token, eos_token=self.eos_token, **extra)

    def render(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **extra: Any) -> str:
        return self.render_variables(self.variables(messages, add_generation_prompt=add_generation_prompt,
                                                    tools=tools, **extra))

    def render_variables(self, variables: Mapping[str, Any], *, marking: bool = False) -> str:
        limits = self.limits
        if _text_size(variables, limits.max_chars) > limits.max_chars:
            raise ContextOverflowError(f"the messages and tools are over {limits.max_chars} characters "
                                       "(RenderLimits.max_chars), more than any context holds")

        def run() -> str:
            out, n = [], 0
            for chunk in self._template.generate(variables):
                n += len(chunk)
                if n > limits.max_chars:
                    raise _TooLarge("the rendered prompt")
                _tick()
                out.append(chunk)
            return "".join(out)

        return _bounded(run, limits, "render", marking=marking)


# ---------------------------------------------------------------------------- encoding
# Content is marked, not escaped: each special token's text inside a message is wrapped in
# two Unicode noncharacters (never in interchanged text, so no tokenizer or template has
# them; any a user sends are removed). After rendering, a marked span is tokenized as plain
# text and the rest, the template's own markup, with special-token parsing on.
MARK_OPEN, MARK_CLOSE = "\ufdd0", "\ufdd1"
_MARKS = re.compile("[\ufdd0\ufdd1]")
# A mark the template moved away from its text (slicing, split, repr): the character or an escape of it.
_STRAY_MARK = re.compile(r"[\ufdd0\ufdd1]|\\+[uU](?:0000)?[fF][dD][dD][01]")


def control_texts(model) -> list[bytes]:
    """The texts of the tokens a native model's tokenizer matches only when parse_special is on."""
    if hasattr(model, "special_texts"):
        return list(model.special_texts())
    out = []  # older bindings: CONTROL and UNKNOWN tokens print only with special=True
    for t in range(model.n_vocab):
        piece = model.token_piece(t, True)
        if piece and not model.token_piece(t, False):
            out.append(piece)
    return out


def _has_surrogate(v: Any, depth: int = 0) -> bool:
    if isinstance(v, str):
        return not v.isascii() and any("\ud800" <= c <= "\udfff" for c in v)
    if depth > _MAX_DEPTH:
        return False
    if isinstance(v, Mapping):
        return any(_has_surrogate(k, depth + 1) or _has_surrogate(x, depth + 1) for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return any(_has_surrogate(x, depth + 1) for x in v)
    return False


class PromptEncoder:
    """Messages -> prompt token ids: the one encoder, used by serving and by training.

    `tokenize(text, add_special, parse_special) -> list[int]` is the model's tokenizer.
    `special_texts` are the texts its tokenizer turns into special tokens when parsing
    them; only those for which that changes the tokens are kept. When no message contains
    one, the ids are exactly `tokenize(render(messages), add_bos, True)`."""

    def __init__(self, template: ChatTemplate, tokenize: Callable[[str, bool, bool], list[int]],
                 special_texts: Iterable[str | bytes], *, add_bos: bool, bos_id: int = -1):
        self.template = template
        self._tokenize = tokenize
        texts = set()
        for t in special_texts:
            if isinstance(t, (bytes, bytearray)):
                try:
                    t = bytes(t).decode("utf-8")
                except UnicodeDecodeError:
                    continue  # the tokenizer cannot match it in UTF-8 text either
            if t and not _MARKS.search(t) and tokenize(t, False, True) != tokenize(t, False, False):
                texts.add(t)
        self.special_texts = tuple(sorted(texts, key=lambda t: (-len(t), t)))  # longest first, as llama.cpp matches
        alternatives = "|".join(map(re.escape, self.special_texts))
        self._special = re.compile(alternatives) if texts else None
        self._marked = re.compile(f"{MARK_OPEN}(?:{alternatives}){MARK_CLOSE}") if texts else None
        self.add_bos = bool(add_bos)
        # What tokenize(add_special=True) puts around a text: BOS first, EOS (for models that want it) last.
        edges = list(tokenize("", True, False)) if self.add_bos else []
        self._head = edges[:1] if edges[:1] == [bos_id] else []
        self._tail = edges[len(self._head):]

    @classmethod
    def for_model(cls, model, template: ChatTemplate) -> "PromptEncoder":
        """For a native `_engine.Model` (full or vocab-only)."""
        return cls(template, model.tokenize, control_texts(model), add_bos=model.add_bos, bos_id=model.bos)

    def encode(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **extra: Any) -> list[int]:
        variables = self.template.variables(messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra)
        marked = {k: (v if k in ("bos_token", "eos_token", "add_generation_prompt") else self._mark(v))
                  for k, v in variables.items()}
        changed = any(marked[k] is not variables[k] for k in variables)
        text = self.template.render_variables(marked, marking=changed)
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:  # a lone surrogate: no tokenizer takes it
                if _has_surrogate(variables):
                    raise InvalidRequestError("message text is not valid Unicode (it has a lone surrogate)") from None
                raise TemplateError(f"the chat template wrote text that is not valid Unicode: {e}") from None
        segments = self.segments(text) if changed else [(text, True)]
        bos = self.template.bos_token
        first = segments[0][0] if segments else ""
        add_bos = self.add_bos and not (bos and first.startswith(bos) and segments[0][1])
        if len(segments) <= 1:
            return list(self._tokenize(first, add_bos, segments[0][1] if segments else True))
        ids = list(self._head) if add_bos else []
        for part, special in segments:
            ids += self._tokenize(part, False, special)
        return ids + (self._tail if add_bos else [])

    def _mark(self, v: Any, depth: int = 0) -> Any:
        """`v` with each special text in its strings (keys too) wrapped in marks; `v` itself if none changed."""
        if depth > _MAX_DEPTH:
            raise InvalidRequestError(f"messages or tools nested deeper than {_MAX_DEPTH} levels")
        if isinstance(v, str):
            stripped = "\ufdd0" in v or "\ufdd1" in v
            s = _MARKS.sub("", v) if stripped else v
            if self._special is not None and self._special.search(s):
                return self._special.sub(lambda m: MARK_OPEN + m.group(0) + MARK_CLOSE, s)
            return s
        if isinstance(v, Mapping):
            items = [(self._mark(k, depth + 1), self._mark(x, depth + 1)) for k, x in v.items()]
            return v if all(a is k and b is x for (a, b), (k, x) in zip(items, v.items())) else dict(items)
        if isinstance(v, (list, tuple)):
            items = [self._mark(x, depth + 1) for x in v]
            return v if all(a is b for a, b in zip(items, v)) else (tuple(items) if isinstance(v, tuple) else items)
        return v

    def segments(self, text: str) -> list[tuple[str, bool]]:
        """A rendered prompt as (text, parse_special) parts: marked spans plain, the rest special."""
        out: list[tuple[str, bool]] = []
        pos = 0
        for m in self._marked.finditer(text) if self._marked is not None else ():
            out += self._template_part(text[pos:m.start()])
            out.append((m.group(0)[1:-1], False))
            pos = m.end()
        out += self._template_part(text[pos:])
        merged: list[tuple[str, bool]] = []
        for part, special in out:
            if part and merged and merged[-1][1] == special:
                merged[-1] = (merged[-1][0] + part, special)
            elif part:
                merged.append((part, special))
        return merged

    def _template_part(self, raw: str) -> list[tuple[str, bool]]:
        """Text outside valid marks. A stray mark means the template cut or escaped a marked
        span: a special text touching one came from a message, so it stays plain text."""
        strays = list(_STRAY_MARK.finditer(raw))
        if not strays:
            return [(raw, True)]
        starts, ends = {s.start() for s in strays}, {s.end() for s in strays}
        out, pos = [], 0
        for m in self._special.finditer(raw) if self._special is not None else ():
            if m.start() in ends or m.end() in starts:
                out += [(_MARKS.sub("", raw[pos:m.start()]), True), (m.group(0), False)]
                pos = m.end()
        out.append((_MARKS.sub("", raw[pos:]), True))
        return out


def tool_call_text(call: dict, compact: bool = False) -> str:
    """An OpenAI tool call as the JSON object the model emits for it."""
    fn = call.get("function", {})
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except json.JSONDecodeError:
        pass
    return json.dumps({"name": fn.get("name"), "arguments": args}, separators=(",", ":") if compact else None)


def for_template(messages: list[dict], tools: list | None, template_source: str) -> list[dict]:
    """Make OpenAI tool traffic readable by templates that know only role + content:
    prior tool calls become the JSON the model emits, and the tools are described in
    the system message when the template cannot render them."""
    out = []
    for m in messages:
        m = dict(m)
        if m.get("role") == "assistant" and m.get("tool_calls") and "tool_calls" not in template_source:
            text = "\n".join(tool_call_text(c) for c in m["tool_calls"])
            m["content"] = ((m.get("content") or "") + ("\n" if m.get("content") else "") + text)
            m.pop("tool_calls")
        if m.get("role") == "tool" and "tool" not in template_source:
            m = {"role": "user", "content": f"Tool result ({m.get('name') or m.get('tool_call_id', '')}): "
                                            f"{m.get('content') if isinstance(m.get('content'), str) else json.dumps(m.get('content'))}"}
        out.append(m)
    if tools and "tools" not in template_source:
        desc = "\n".join(json.dumps({"name": t["function"]["name"], "description": t["function"].get("description", ""),
                                     "parameters": t["function"].get("parameters", {})}) for t in tools)
        note = ("You can call one of these tools by answering with a JSON object "
                '{"name": <tool name>, "arguments": {...}}:\n' + desc)
        if out and out[0].get("role") == "system":
            out[0] = dict(out[0], content=f"{out[0].get('content') or ''}\n\n{note}")
        else:
            out.insert(0, {"role": "system", "content": note})
    return out
