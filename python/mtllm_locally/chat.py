"""Render chat messages with the model's own chat template, safely.

The template comes from the GGUF file, so it is untrusted input: it runs in
jinja2's ImmutableSandboxedEnvironment (no attribute escapes, no mutation of our
objects). Serving and training both call `ChatTemplate.render`, so the model sees
byte-identical prompts in both.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Iterable, Mapping

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InvalidRequestError, TemplateError

# Used when a GGUF carries no template: ChatML, the format most small instruct models use.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}


def _raise_exception(message: str):
    raise TemplateError(f"chat template raised: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    # HF templates expect tojson without HTML escaping (jinja2's default escapes <>&').
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


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
                parts.append(str(part.get("text", "")))
            elif isinstance(part, Mapping) and part.get("type") in ("image_url", "input_image", "input_audio"):
                raise InvalidRequestError(f"content part of type {part.get('type')!r} is not supported by a text model")
            else:
                raise InvalidRequestError(f"unsupported content part: {part!r}")
        return "".join(parts)
    raise InvalidRequestError(f"message content must be a string or a list of parts, not {type(content).__name__}")


def normalize_messages(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise InvalidRequestError(f"message {i} must be a mapping with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise InvalidRequestError(f"message {i} has unsupported role {role!r}")
        msg = dict(m)
        msg["content"] = _content_text(m.get("content"))
        out.append(msg)
    if not out:
        raise InvalidRequestError("messages is empty")
    return out


class ChatTemplate:
    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = ""):
        self.source = source or CHATML_TEMPLATE
        self.is_fallback = not source
        self.bos_token = bos_token
        self.eos_token = eos_token
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined)
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise_exception
        env.globals["strftime_now"] = _strftime_now
        try:
            self._template = env.from_string(self.source)
        except jinja2.TemplateSyntaxError as e:
            raise TemplateError(f"the model's chat template does not parse: {e}") from e

    def render(self, messages: Iterable[Mapping[str, Any]], *, add_generation_prompt: bool = True,
               tools: list[dict] | None = None, **extra: Any) -> str:
        msgs = normalize_messages(messages)
        try:
            return self._template.render(
                messages=msgs, add_generation_prompt=add_generation_prompt, tools=tools,
                bos_token=self.bos_token, eos_token=self.eos_token, **extra)
        except TemplateError:
            raise
        except jinja2.exceptions.SecurityError as e:
            raise TemplateError(f"the chat template tried an unsafe operation: {e}") from e
        except Exception as e:  # a template is code: any failure is the template's
            raise TemplateError(f"the chat template failed to render: {type(e).__name__}: {e}") from e


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
