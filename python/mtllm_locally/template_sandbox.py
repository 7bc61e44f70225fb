"""Bounds for rendering an untrusted chat template: time, size, and what it may call.

A GGUF's chat template is code from a file. It runs in jinja2's immutable sandbox (no
attribute escapes, no mutation of our objects); this module adds what the sandbox does
not: a deadline enforced inside the rendering thread, a size limit on every value a
template can build, and `TemplateError` for anything that goes wrong. `chat.ChatTemplate`
renders through `BoundedSandbox` and `bounded`.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import re
import string
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from functools import wraps
from itertools import chain
from typing import Any, Callable, Mapping, Sequence

import jinja2
from jinja2.compiler import CodeGenerator
from jinja2.runtime import markup_join, str_join
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError
from jinja2.utils import Namespace, _PassArg

from .errors import InvalidRequestError, TemplateError

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
MAX_DEPTH = 200          # nesting of messages and tools (JSON schemas nest a few levels; Python recursion ~1000)


def _raise_exception(message: str):
    raise TemplateError(f"chat template raised: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(str(fmt)[:256])


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
# the render finished is cleared before returning (see `bounded`). What an async
# exception cannot interrupt is one long C call, so nothing in the sandbox may start
# one: every operation that can allocate more than its inputs (`*`, `**`, `+`, `%`,
# `~`, str methods, filters, output of containers, block bodies) is sized before it
# runs, against `max_chars`.


class _RenderTimeout(BaseException):
    """Raised inside the rendering thread at its deadline (BaseException: nothing in jinja catches it)."""


class TooLarge(Exception):
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


def tick() -> None:
    deadline = getattr(_RENDER, "deadline", None)
    if deadline is not None and time.monotonic() > deadline:
        raise _RenderTimeout


def bounded(fn: Callable[[], Any], limits: RenderLimits, what: str, *, marking: bool = False) -> Any:
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
    except TooLarge as e:
        raise TemplateError(f"the chat template's {what} exceeded {limits.max_chars} characters "
                            f"(RenderLimits.max_chars): {e}") from None
    except TemplateError:
        raise
    except SecurityError as e:
        raise TemplateError(f"the chat template tried an unsafe operation: {e}") from e
    except Exception as e:  # a template is code: any failure (RecursionError, MemoryError, ...) is the template's
        raise TemplateError(f"the chat template failed to {what}: {type(e).__name__}: {e}") from e


_END = object()


def text_size(value: Any, budget: int, per_depth: int = 0) -> int:
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
    biggest = max((text_size(v, budget) for v in values), default=0)
    return len(text) + count * (biggest + widest)


# Filters whose output can be much larger than their inputs: an upper bound of the output
# from (args, kwargs) without the pass-through first argument. Others are linear in their
# inputs, which are bounded; `join` also hands back its materialized items.
def _est_indent(env, a, k):
    s, width = str(a[0]), _arg(a, k, 1, "width", 4)
    return len(s) + (s.count("\n") + 1) * (width if isinstance(width, int) else len(str(width)))


def _est_wordwrap(env, a, k):
    wrap = _arg(a, k, 3, "wrapstring", None)
    return text_size(a[0], env.limits.max_chars) * (1 + len(str(wrap) if wrap is not None else "\n"))


def _est_replace(env, a, k):
    s, old, new, count = str(a[0]), str(_arg(a, k, 1, "old", "")), str(_arg(a, k, 2, "new", "")), _arg(a, k, 3, "count")
    occ = len(s) + 1 if not old else s.count(old)
    if isinstance(count, int) and count >= 0:
        occ = min(occ, count)
    return len(s) + occ * len(new)


def _est_format(env, a, k):
    return _percent_size(str(a[0]), k or tuple(a[1:]), env.limits.max_chars)


def _est_pprint(env, a, k):
    return 2 * text_size(a[0], env.limits.max_chars, per_depth=1)


def _est_tojson(env, a, k):
    indent = _arg(a, k, 1, "indent", None)
    return text_size(a[0], env.limits.max_chars, per_depth=(indent if isinstance(indent, int) and indent > 0 else 0) + 1)


def _est_slice(env, a, k):
    slices = _arg(a, k, 1, "slices", 0)
    if isinstance(slices, int) and slices > _MAX_SLICES:
        raise TooLarge(f"slice({slices}) makes more than {_MAX_SLICES} lists")
    return 0


_FILTER_ESTIMATES: dict[str, Callable] = {
    "indent": _est_indent, "wordwrap": _est_wordwrap, "replace": _est_replace, "format": _est_format,
    "pprint": _est_pprint, "tojson": _est_tojson, "slice": _est_slice,
}


def _bounded_filter(env: "BoundedSandbox", name: str, f: Callable) -> Callable:
    skip = 1 if _PassArg.from_obj(f) is not None else 0
    estimate = _FILTER_ESTIMATES.get(name)

    @wraps(f)  # keeps jinja_pass_arg
    def bounded(*args, **kwargs):
        tick()
        own = args[skip:]
        env.check_args(own, kwargs)
        if name == "join":  # items may be a generator: count them once, then hand them on
            items = list(own[0]) if own else []
            d = _arg(own, kwargs, 1, "d", "")
            env.limit(sum(text_size(x, env.limits.max_chars) for x in items) + len(items) * len(str(d)))
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


class BoundedSandbox(ImmutableSandboxedEnvironment):
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
            raise TooLarge(f"{what} of {size}+ characters")

    def check_value(self, value: Any) -> None:
        self.limit(text_size(value, self.limits.max_chars))

    def check_args(self, args: Sequence, kwargs: Mapping) -> None:
        budget, total = self.limits.max_chars, 0
        for v in chain(args, kwargs.values()):
            if isinstance(v, int) and not isinstance(v, bool) and abs(v) > budget:
                raise TooLarge(f"an argument of {v}")
            total += text_size(v, budget - total)
            self.limit(total, "arguments")

    # -- hooks jinja calls
    def call_binop(self, context, operator, left, right):
        if operator == "+" and type(left) is str and type(right) is str:  # most of what templates do
            self.limit(len(left) + len(right), "a sum")
            return left + right
        if operator == "*":
            if isinstance(left, int) and isinstance(right, int):
                if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                    raise TooLarge(f"a product of more than {_MAX_INT_BITS} bits")
            else:
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, bytes, list, tuple)) and isinstance(n, int):
                        self.limit(len(seq) * max(n, 0), "a repetition")
        elif operator == "**":
            if isinstance(left, int) and isinstance(right, int) and right > 0 and left.bit_length() * right > _MAX_INT_BITS:
                raise TooLarge(f"a power of more than {_MAX_INT_BITS} bits")
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
                self.limit(len(left) + len(right), "a sum")
        elif operator == "%" and isinstance(left, (str, bytes)):
            self.limit(_percent_size(left, right, self.limits.max_chars), "a %-format")
        return super().call_binop(context, operator, left, right)

    def call(self, context, obj, /, *args, **kwargs):
        tick()
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
            tick()
            fields, widest = _format_fields(fmt)
            values = list(args[0].values()) if is_map and args and isinstance(args[0], Mapping) else [*args, *kwargs.values()]
            biggest = max((text_size(v, self.limits.max_chars) for v in values), default=0)
            self.limit(len(fmt) + fields * (biggest + widest), "a str.format result")
            result = wrapper(*args, **kwargs)
            self.check_value(result)
            return result

        return bounded

    def bounded_concat(self, context, args):
        tick()
        total = 0
        for a in args:
            total += text_size(a, self.limits.max_chars - total)
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
