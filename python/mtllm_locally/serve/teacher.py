"""Teacher mode (distillation): while a task's student is not good enough, a teacher
-- any LiteLLM model: a cloud model, or a bigger local GGUF through this provider --
answers the call, and its answer is captured as the training target. The student
(the served model, with the task's deployed adapter if any) runs in shadow on the
same input (`TaskPolicy.shadow`), so the store also shows how far the student is
from the teacher. The call returns as soon as the teacher answers: the student goes
on in the background and its answer is stored into the turn when it finishes
(shadows.py; the turn's `shadow_output` is empty until then, and stays empty when
the shadow failed, was skipped -- `Settings.max_shadows` -- or the runtime closed first).

"Good enough": a deployed adapter whose held-out score reached `teacher_until`.
"""

from __future__ import annotations

from typing import Any

import litellm

from ..state.policy import TaskPolicy
from .router import Route

PASSED_THROUGH = ("max_tokens", "stop", "seed", "top_p")


def needed(policy: TaskPolicy, route: Route) -> bool:
    if not policy.teacher:
        return False
    # Only a trained adapter judged on held-out inputs retires the teacher: demonstrations alone
    # are judged on few examples, and without the teacher's labels no training would ever come.
    return not route.adapters or (route.score or 0.0) < policy.teacher_until


def request(messages: list, temperature: float, response_format: Any, tools: list | None, tool_choice: Any,
            sampling: dict) -> dict:
    """The teacher's LiteLLM keywords: the call as the program made it (OpenAI shapes)."""
    kw: dict[str, Any] = {"messages": messages, "temperature": temperature}
    if response_format:
        kw["response_format"] = response_format
    if tools:
        kw["tools"] = tools
        kw["tool_choice"] = tool_choice
    for k in PASSED_THROUGH:
        if sampling.get(k) is not None:
            kw[k] = list(sampling[k]) if k == "stop" else sampling[k]
    return kw


def ask(policy: TaskPolicy, kw: dict):
    return litellm.completion(model=policy.teacher, **kw)


async def aask(policy: TaskPolicy, kw: dict):
    return await litellm.acompletion(model=policy.teacher, **kw)


def reply_of(response) -> tuple[str | None, list[dict] | None, str, int, int]:
    """(text, tool calls, finish reason, prompt tokens, completion tokens) of a LiteLLM response."""
    choice = response.choices[0]
    msg = choice.message
    tool_calls = None
    if getattr(msg, "tool_calls", None):
        tool_calls = [tc.model_dump() if hasattr(tc, "model_dump") else dict(tc) for tc in msg.tool_calls]
        for tc in tool_calls:
            tc.pop("index", None)
    usage = getattr(response, "usage", None)
    finish = "tool_calls" if tool_calls else (choice.finish_reason or "stop")
    return (None if tool_calls else msg.content, tool_calls, finish,
            getattr(usage, "prompt_tokens", 0) or 0, getattr(usage, "completion_tokens", 0) or 0)
