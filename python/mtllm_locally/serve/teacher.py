"""Teacher mode (distillation): while a task's student is not good enough, a teacher
-- any LiteLLM model: a cloud model, or a bigger local GGUF through this provider --
answers the call, and its answer is captured as the training target. The student
(the served model, with the task's deployed adapter if any) runs in shadow on the
same input, so the store also shows how far the student is from the teacher.

"Good enough": a deployed adapter whose held-out score reached `teacher_until`.
"""

from __future__ import annotations

import time
from typing import Any

import litellm

from ..learn.policy import TaskPolicy, policy_for
from . import recorder

PASSED_THROUGH = ("max_tokens", "max_completion_tokens", "stop", "seed", "top_p")


def teacher_for(call) -> TaskPolicy | None:
    if not call.function:
        return None
    p = policy_for(call.function)
    if not p.teacher:
        return None
    if call.route.adapter_id is not None and (call.route.score or 0.0) >= p.teacher_until:
        return None
    return p


def _kwargs(call, optional_params: dict) -> dict:
    kw: dict[str, Any] = {"messages": call.messages, "temperature": call.temperature}
    if call.kw.get("response_format"):
        kw["response_format"] = call.kw["response_format"]
    if call.tools:
        kw["tools"] = call.tools
        kw["tool_choice"] = call.kw.get("tool_choice", "auto")
    for k in PASSED_THROUGH:
        if optional_params.get(k) is not None:
            kw[k] = optional_params[k]
    return kw


def answer(call, policy: TaskPolicy, optional_params: dict, shadow_requests: list):
    token = recorder.suppressed.set(True)
    try:
        response = litellm.completion(model=policy.teacher, **_kwargs(call, optional_params))
    finally:
        recorder.suppressed.reset(token)
    shadow = []
    for r in shadow_requests:
        try:
            shadow.append(r.result())
        except Exception:  # the shadow never fails the call
            pass
    record(call, policy, response, shadow)
    return response


async def aanswer(call, policy: TaskPolicy, optional_params: dict):
    token = recorder.suppressed.set(True)
    try:
        return await litellm.acompletion(model=policy.teacher, **_kwargs(call, optional_params))
    finally:
        recorder.suppressed.reset(token)


def record(call, policy: TaskPolicy, response, shadow: list) -> None:
    msg = response.choices[0].message
    tool_calls = None
    if getattr(msg, "tool_calls", None):
        tool_calls = [tc.model_dump() if hasattr(tc, "model_dump") else dict(tc) for tc in msg.tool_calls]
        for tc in tool_calls:
            tc.pop("index", None)
    usage = getattr(response, "usage", None)
    recorder.record_turn(
        metadata=call.metadata, task=call.task, model=policy.teacher, messages=call.messages,
        response_format=call.kw.get("response_format"), tools=call.tools,
        output_text=None if tool_calls else msg.content, tool_calls=tool_calls,
        finish_reason="tool_calls" if tool_calls else (response.choices[0].finish_reason or "stop"),
        latency_ms=1000 * (time.perf_counter() - call.started),
        prompt_tokens=getattr(usage, "prompt_tokens", 0) or 0,
        completion_tokens=getattr(usage, "completion_tokens", 0) or 0, cached_tokens=0,
        temperature=call.temperature, adapter=call.route.adapter_id, source=f"teacher:{policy.teacher}",
        shadow_output=shadow[0].text if shadow else None, model_path=call.engine.info.path)


def shadow_agreement(rows: list[dict]) -> float | None:
    """Fraction of teacher-answered turns where the student's shadow answer matched."""
    from ..learn.gate import field_score

    pairs = [(r["shadow_output"], r["output_text"] or r["tool_calls_json"]) for r in rows
             if r.get("shadow_output") is not None]
    if not pairs:
        return None
    return sum(field_score(s, t)[0] for s, t in pairs if t is not None) / len(pairs)

