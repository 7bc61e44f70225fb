"""Render chat messages with the model's own chat template, safely, and encode them.

The template comes from the GGUF file, so it is untrusted code: it runs in jinja2's
ImmutableSandboxedEnvironment (no attribute escapes, no mutation of our objects), with
every render bounded in time and in size (template_sandbox.py), and any failure inside it
becomes `TemplateError`. The messages are untrusted text: `PromptEncoder` tokenizes them
so that only the template's own markup can produce special tokens. Serving and training
both call `PromptEncoder.encode`, so the model sees byte-identical prompts in both.
"""

from __future__ import annotations

import json
import re
import reprlib
from typing import Any, Callable, Iterable, Mapping

import jinja2

from .errors import ContextOverflowError, InvalidRequestError, TemplateError
from .template_sandbox import DEFAULT_LIMITS, MAX_DEPTH, BoundedSandbox, RenderLimits, TooLarge, bounded, text_size, tick

__all__ = ["ChatTemplate", "PromptEncoder", "RenderLimits", "DEFAULT_LIMITS", "for_template", "tool_call_text",
           "normalize_messages", "read_template_source", "builtin_template", "control_texts"]

# Built-in templates, for GGUFs that carry none: the turn format of the model's family,
# known by its vocabulary (`builtin_template`). For alternating user/assistant turns each
# renders what its family's published template renders (tests/test_family_templates.py);
# unlike those they never raise on another order: a model that shipped no template still
# gets a prompt. They contain no "tool": tool traffic reaches them as text (`for_template`).
# ChatML: the format most small instruct models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma: "user" and "model" turns only; the system text opens the first turn.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set prefix = messages[0]['content'] + '\n\n' %}"
    "{% set turns = messages[1:] %}{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n'"
    " + (prefix if loop.first else '') + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
# Llama 3: a header per message, each ended by <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = (CHATML_TEMPLATE, GEMMA_TEMPLATE, LLAMA3_TEMPLATE)

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}


def builtin_template(special_texts: Iterable[str | bytes]) -> str:
    """The built-in template for a vocabulary whose control tokens are `special_texts`:
    Gemma turns where <start_of_turn> and <end_of_turn> are tokens, Llama 3 headers where
    <|start_header_id|> is, ChatML otherwise."""
    texts = {bytes(t).decode("utf-8", "replace") if isinstance(t, (bytes, bytearray)) else t for t in special_texts}
    if {"<start_of_turn>", "<end_of_turn>"} <= texts:
        return GEMMA_TEMPLATE
    if "<|start_header_id|>" in texts:
        return LLAMA3_TEMPLATE
    return CHATML_TEMPLATE


def read_template_source(model) -> str:
    """The chat template a native `_engine.Model` is served with: the GGUF's own, or the
    built-in one for its vocabulary when it has none (`builtin_template`). GGUF strings
    are bytes that should be UTF-8; a template that is not fails here as `TemplateError`,
    not as a UnicodeDecodeError from the binding."""
    try:
        raw = model.chat_template_bytes if hasattr(model, "chat_template_bytes") else model.chat_template
        if isinstance(raw, (bytes, bytearray)):
            raw = bytes(raw).decode("utf-8")
    except UnicodeDecodeError as e:
        raise TemplateError(f"the model's chat template is not valid UTF-8 (byte {e.start}): the GGUF's "
                            "tokenizer.chat_template metadata is corrupt") from None
    return raw or builtin_template(control_texts(model))


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
        self.is_fallback = not source or source in BUILTIN_TEMPLATES  # the model carried no template
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.limits = limits or DEFAULT_LIMITS
        if not isinstance(self.source, str):
            raise TemplateError(f"a chat template must be text, not {type(self.source).__name__}")
        if len(self.source) > self.limits.max_source_chars:
            raise TemplateError(f"the model's chat template is {len(self.source)} characters, over "
                                f"RenderLimits.max_source_chars={self.limits.max_source_chars}")
        env = BoundedSandbox(self.limits)

        def compile_():
            try:
                return env.from_string(self.source)
            except jinja2.TemplateSyntaxError as e:
                raise TemplateError(f"the model's chat template does not parse: {e}") from e

        self._template = bounded(compile_, self.limits, "compile")

    def variables(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True,
                  tools: list[dict] | None = None, **extra: Any) -> dict[str, Any]:
        """What the template sees: messages validated and normalized, OpenAI tool traffic
        adapted to what this template can render (`for_template`), plus the standard names.
        Serving, the gate and training all encode through here, so they see the same prompt."""
        msgs = for_template(normalize_messages(messages), tools, self.source)
        return dict(messages=msgs, add_generation_prompt=add_generation_prompt, tools=tools,
                    bos_token=self.bos_token, eos_token=self.eos_token, **extra)

    def render(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **extra: Any) -> str:
        return self.render_variables(self.variables(messages, add_generation_prompt=add_generation_prompt,
                                                    tools=tools, **extra))

    def render_variables(self, variables: Mapping[str, Any], *, marking: bool = False) -> str:
        limits = self.limits
        if text_size(variables, limits.max_chars) > limits.max_chars:
            raise ContextOverflowError(f"the messages and tools are over {limits.max_chars} characters "
                                       "(RenderLimits.max_chars), more than any context holds")

        def run() -> str:
            out, n = [], 0
            for chunk in self._template.generate(variables):
                n += len(chunk)
                if n > limits.max_chars:
                    raise TooLarge("the rendered prompt")
                tick()
                out.append(chunk)
            return "".join(out)

        return bounded(run, limits, "render", marking=marking)


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
    if depth > MAX_DEPTH:
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
        if depth > MAX_DEPTH:
            raise InvalidRequestError(f"messages or tools nested deeper than {MAX_DEPTH} levels")
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
    if not isinstance(fn, Mapping):
        raise InvalidRequestError(f"a tool call's 'function' must be an object, not {type(fn).__name__}")
    args = fn.get("arguments", "{}")
    try:
        args = json.loads(args) if isinstance(args, str) else args
    except (ValueError, RecursionError):  # not JSON (or nested past Python's stack): kept as text
        pass
    return json.dumps({"name": fn.get("name"), "arguments": args}, separators=(",", ":") if compact else None,
                      default=str)


def for_template(messages: list[dict], tools: list | None, template_source: str) -> list[dict]:
    """Make OpenAI tool traffic readable by the template. Templates that render tool calls
    get their arguments as objects, as Hugging Face chat templates expect (OpenAI sends a
    JSON string, which Qwen2.5's template would print as a quoted string). For templates
    that know only role + content, prior tool calls become the JSON the model emits, and
    the tools are described in the system message. (`ChatTemplate.variables` applies it:
    callers pass OpenAI-shaped messages.)"""
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        calls = m.get("tool_calls")
        if calls is not None and (not isinstance(calls, list) or not all(isinstance(c, Mapping) for c in calls)):
            raise InvalidRequestError(f"message {i}: tool_calls must be a list of objects")
        if m.get("role") == "assistant" and calls and "tool_calls" in template_source:
            m["tool_calls"] = [_with_object_arguments(c) for c in calls]
        elif m.get("role") == "assistant" and calls:
            text = "\n".join(tool_call_text(c) for c in calls)
            m["content"] = ((m.get("content") or "") + ("\n" if m.get("content") else "") + text)
            m.pop("tool_calls")
        if m.get("role") == "tool" and "tool" not in template_source:
            m = {"role": "user", "content": f"Tool result ({m.get('name') or m.get('tool_call_id', '')}): "
                                            f"{m.get('content') if isinstance(m.get('content'), str) else json.dumps(m.get('content'))}"}
        out.append(m)
    if tools and "tools" not in template_source:
        desc = "\n".join(json.dumps({"name": fn["name"], "description": fn.get("description", ""),
                                     "parameters": fn.get("parameters", {})}) for fn in _functions(tools))
        note = ("You can call one of these tools by answering with a JSON object "
                '{"name": <tool name>, "arguments": {...}}:\n' + desc)
        if out and out[0].get("role") == "system":
            out[0] = dict(out[0], content=f"{out[0].get('content') or ''}\n\n{note}")
        else:
            out.insert(0, {"role": "system", "content": note})
    return out


def _with_object_arguments(call: Mapping[str, Any]) -> Mapping[str, Any]:
    """`call` with function.arguments decoded when it is a JSON object in a string (a copy;
    anything else is passed on as it is)."""
    fn = call.get("function")
    args = fn.get("arguments") if isinstance(fn, Mapping) else None
    if not isinstance(args, str):
        return call
    try:
        decoded = json.loads(args)
    except (ValueError, RecursionError):  # a malformed call is shown as the model wrote it
        return call
    return dict(call, function=dict(fn, arguments=decoded)) if isinstance(decoded, dict) else call


def _functions(tools: Any) -> list[Mapping[str, Any]]:
    if not isinstance(tools, list):
        raise InvalidRequestError(f"tools must be a list, not {type(tools).__name__}")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise InvalidRequestError(f"tool {i} must be {{'type': 'function', 'function': {{'name': ..., ...}}}}")
        out.append(fn)
    return out
