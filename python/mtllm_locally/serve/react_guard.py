"""byllm's ReAct protocol, held for a small model.

byllm's tools come with a `finish_tool` and the instruction to always answer with a
tool call. Under `tool_choice="auto"` a small model drifts into prose, so every turn
must be a call. And a small model can call the same tool with the same arguments
forever (we measured 190+ turns of get_temperature("Paris"), the prompt growing past
7k tokens): once it repeats a call it already has the result of, or after
`max_tool_turns` calls, the next turn must be finish_tool.
"""

from __future__ import annotations

import json
from typing import Any

FINISH = "finish_tool"


def has_finish_tool(tools: list | None) -> bool:
    return any((t.get("function") or {}).get("name") == FINISH for t in tools or () if isinstance(t, dict))


def tool_choice_for(messages: list[dict], tools: list | None, tool_choice: Any, max_tool_turns: int) -> Any:
    """The tool_choice to decode this turn with: the request's own, unless it is a
    ReAct turn (a finish_tool among the tools)."""
    if not has_finish_tool(tools) or tool_choice == "none":
        return tool_choice
    if tool_choice in (None, "auto"):
        tool_choice = "required"
    seen, repeated, turns = set(), False, 0
    for m in messages:
        for call in (m.get("tool_calls") or []) if m.get("role") == "assistant" else []:
            fn = (call.get("function") if isinstance(call, dict) else None) or {}
            args = fn.get("arguments")
            try:
                args = json.dumps(json.loads(args) if isinstance(args, str) else args, sort_keys=True)
            except (json.JSONDecodeError, TypeError):
                pass
            key = (fn.get("name"), str(args))
            repeated = key in seen
            seen.add(key)
            turns += 1
    if repeated or turns >= max_tool_turns:
        return {"type": "function", "function": {"name": FINISH}}
    return tool_choice
