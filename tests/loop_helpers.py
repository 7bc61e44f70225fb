"""Shared by the learning-loop tests: a typed task on the tiny model, an oracle
teacher (a LiteLLM custom provider that knows the answers), and store builders."""

from __future__ import annotations

import json
import time

LABELS = {"apple": 1, "sky": 2, "grass": 3}
SCHEMA = {"type": "object", "title": "schema_object_wrapper", "properties": {"schema_object_wrapper": {
    "type": "integer", "description": "Color.\nThe value *should* be one in this list: [1, 2, 3]"}},
    "required": ["schema_object_wrapper"], "additionalProperties": False}
RF = {"type": "json_schema", "json_schema": {"name": "Color", "schema": SCHEMA, "strict": True}}
SYSTEM = "This is a task you must complete by returning only the output."


def messages(i: int, word: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": f"classify\n\nitem {i}: {word}"}]


def word_of(i: int) -> str:
    return list(LABELS)[i % len(LABELS)]


def answer_for(msgs) -> str:
    text = msgs[-1]["content"] if isinstance(msgs[-1], dict) else msgs[-1].content
    label = next(v for k, v in LABELS.items() if k in text)
    return json.dumps({"schema_object_wrapper": label}, separators=(",", ":"))


def register_oracle() -> None:
    import litellm
    from litellm import CustomLLM
    from litellm.types.utils import Choices, Message, ModelResponse, Usage

    class Oracle(CustomLLM):
        calls = 0

        def completion(self, model, messages, *a, **kw) -> ModelResponse:
            Oracle.calls += 1
            return ModelResponse(choices=[Choices(index=0, finish_reason="stop", message=Message(
                role="assistant", content=answer_for(messages)))], model=f"oracle/{model}",
                usage=Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))

        async def acompletion(self, model, messages, *a, **kw) -> ModelResponse:
            return self.completion(model, messages)

    if not any(p.get("provider") == "oracle" for p in litellm.custom_provider_map):
        litellm.custom_provider_map.append({"provider": "oracle", "custom_handler": Oracle()})
        from litellm.utils import custom_llm_setup

        custom_llm_setup()


def fill_store(store, n: int, task_key: str = "classify:t", start: int = 0) -> None:
    """n teacher-labelled calls, as the provider would record them."""
    for i in range(start, start + n):
        msgs = messages(i, word_of(i))
        store.record_turn(invocation_id=f"inv-{task_key}-{i}", task_key=task_key, function="classify",
                          model="oracle/x", messages=msgs, response_format=RF, output_text=answer_for(msgs),
                          finish_reason="stop", latency_ms=1.0, prompt_tokens=10, completion_tokens=5,
                          source="teacher:oracle/x")
        store.finish_call(f"inv-{task_key}-{i}", accepted=True)


def wait_for(predicate, timeout: float, what: str):
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = predicate()
        if v:
            return v
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")
