"""The LiteLLM provider `mtllm_locally/<model>`, called the way byllm calls it."""

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import threading

import jsonschema
import pytest

litellm = pytest.importorskip("litellm")

from runtime_helpers import own_runtime  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
RF = {"type": "json_schema", "json_schema": {"name": "Person", "schema": SCHEMA, "strict": True}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}},
                                                          "required": ["city"], "additionalProperties": False}}}]


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    with own_runtime(tmp_path_factory.mktemp("store") / "calls.sqlite3") as rt:
        yield rt


@pytest.fixture(scope="module")
def model(tiny_model_path, runtime):
    return f"mtllm_locally/{tiny_model_path}"


def msgs(text="Hello"):
    return [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]


def test_completion(model):
    r = litellm.completion(model=model, messages=msgs(), max_tokens=8)
    assert isinstance(r.choices[0].message.content, str)
    assert r.usage.prompt_tokens > 5 and 0 < r.usage.completion_tokens <= 8
    # the finish reason tells the truth: "length" exactly when the budget was used up
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 8 else "stop")


def test_json_schema_response(model):
    r = litellm.completion(model=model, messages=msgs("Who?"), response_format=RF, max_tokens=100)
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_tool_calls_come_back_as_openai_tool_calls(model):
    r = litellm.completion(model=model, messages=msgs("Weather in Paris?"), tools=TOOLS, tool_choice="required",
                           max_tokens=100)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), TOOLS[0]["function"]["parameters"])


def test_prior_tool_calls_and_results_are_accepted(model, runtime):
    history = msgs("Weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    r = litellm.completion(model=model, messages=history, tools=TOOLS, max_tokens=20)
    choice = r.choices[0]
    if choice.finish_reason == "tool_calls":  # tool_choice "auto": a well-formed call, or text
        jsonschema.validate(json.loads(choice.message.tool_calls[0].function.arguments),
                            TOOLS[0]["function"]["parameters"])
    else:
        assert isinstance(choice.message.content, str) and not choice.message.tool_calls
        assert choice.finish_reason == ("length" if r.usage.completion_tokens == 20 else "stop")
    eng = runtime.engines.get(model.split("/", 1)[1])
    rendered = eng.render(history, tools=TOOLS)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in rendered
    assert "sunny, 21C" in rendered and "get_weather" in rendered.split("<|im_end|>")[0]  # tools described up front


def test_streaming_equals_non_streaming(model):
    full = litellm.completion(model=model, messages=msgs("Tell me"), max_tokens=24, seed=1)
    parts = [c.choices[0].delta.content or "" for c in
             litellm.completion(model=model, messages=msgs("Tell me"), max_tokens=24, seed=1, stream=True)]
    assert "".join(parts) == full.choices[0].message.content
    assert len(parts) > 3


async def test_acompletion_and_astreaming(model):
    r = await litellm.acompletion(model=model, messages=msgs("Hi"), max_tokens=10)
    parts = []
    async for c in await litellm.acompletion(model=model, messages=msgs("Hi"), max_tokens=10, stream=True):
        parts.append(c.choices[0].delta.content or "")
    assert "".join(parts) == r.choices[0].message.content


def test_n_choices(model):
    r = litellm.completion(model=model, messages=msgs(), max_tokens=8, n=3, temperature=1.0, seed=5)
    assert len(r.choices) == 3
    assert len({c.message.content for c in r.choices}) > 1


def test_typed_calls_are_greedy_by_default_and_record_it(model, runtime):
    r = litellm.completion(model=model, messages=msgs("Who?"), response_format=RF, temperature=0.7, max_tokens=80)
    assert r._hidden_params["mtllm_locally"]["temperature"] == 0.0
    runtime.settings.typed_temperature = None
    try:
        r = litellm.completion(model=model, messages=msgs("Who?"), response_format=RF, temperature=0.7, max_tokens=80)
        assert r._hidden_params["mtllm_locally"]["temperature"] == 0.7
        runtime.settings.task_temperature["classify"] = 0.2
        r = litellm.completion(model=model, messages=msgs("Who?"), response_format=RF, temperature=0.7, max_tokens=80,
                               metadata={"jac_caller_name": "classify", "jac_invocation_id": "inv-temp"})
        assert r._hidden_params["mtllm_locally"]["temperature"] == 0.2
    finally:
        runtime.settings.typed_temperature = 0.0
        runtime.settings.task_temperature.clear()
    rows = runtime.store().turns("inv-temp")
    assert rows[0]["temperature"] == 0.2


@pytest.mark.parametrize("bad,message", [
    (dict(logprobs=True), "InvalidRequestError: parameter 'logprobs' is not supported"),
    (dict(presence_penalty=0.5), "InvalidRequestError: presence_penalty is not supported"),
    (dict(top_p=2.0), "InvalidRequestError: top_p=2.0: must be in (0, 1]"),
    (dict(n=0), "InvalidRequestError: n must be >= 1"),
    (dict(response_format={"type": "xml"}), "InvalidRequestError: unsupported response_format type 'xml'"),
    (dict(frobnicate=1), "InvalidRequestError: unsupported parameters for mtllm_locally: ['frobnicate']")])
def test_unsupported_or_bad_parameters_raise(model, bad, message):
    with pytest.raises(litellm.BadRequestError) as e:  # HTTP 400: the caller's mistake
        litellm.completion(model=model, messages=msgs(), max_tokens=4, **bad)
    assert message in str(e.value)


def test_missing_model_is_a_clear_error(runtime):
    with pytest.raises(litellm.NotFoundError, match="ModelLoadError: model file not found: /nope/missing.gguf"):
        litellm.completion(model="mtllm_locally//nope/missing.gguf", messages=msgs(), max_tokens=4)


def test_concurrent_calls_share_decode_batches(model, runtime):
    eng = runtime.engines.get(model.split("/", 1)[1])
    before = eng.stats()
    out = []

    def call(i):
        r = litellm.completion(model=model, messages=msgs(f"Question {i}"), max_tokens=16)
        out.append(r.usage.completion_tokens)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    after = eng.stats()
    generated = after["tokens_generated"] - before["tokens_generated"]
    steps = after["steps"] - before["steps"]
    assert len(out) == 16
    assert steps < generated / 2  # tokens of different calls were decoded together


def test_calls_are_captured(model, runtime):
    litellm.completion(model=model, messages=msgs("Who?"), response_format=RF, max_tokens=80,
                       metadata={"jac_caller_name": "who", "jac_invocation_id": "inv-capture"})
    (turn,) = runtime.store().turns("inv-capture")
    assert json.loads(turn["messages_json"])[1]["content"] == "Who?"
    assert json.loads(turn["response_format_json"]) == RF
    jsonschema.validate(json.loads(turn["output_text"]), SCHEMA)
    (call,) = [c for c in runtime.store().calls() if c["invocation_id"] == "inv-capture"]
    assert call["task_key"].startswith("who:") and call["n_turns"] == 1 and call["prompt_tokens"] > 0


def test_no_network_through_litellm(tiny_model_path, tmp_path):
    code = textwrap.dedent(f"""
        import socket
        def refuse(*a, **k):
            raise AssertionError("network use")
        socket.socket.connect = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import mtllm_locally
        mtllm_locally.register_provider()
        import litellm
        r = litellm.completion(model="mtllm_locally/{tiny_model_path}", messages=[{{"role": "user", "content": "hi"}}],
                               max_tokens=3)
        print("ok", r.usage.completion_tokens)
    """)
    env = dict(os.environ, MTLLM_LOCALLY_STORE=str(tmp_path / "s.sqlite3"))
    env.pop("LITELLM_LOCAL_MODEL_COST_MAP", None)  # the provider must set it itself
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().startswith("ok")


def _turn(runtime, inv):
    (turn,) = runtime.store().turns(inv)
    return turn


async def test_all_four_entry_points_capture_the_same_call(model, runtime):
    """One pipeline: completion, acompletion, streaming and astreaming of the same greedy
    call give the same text and store the same record (the engine's own token counts,
    finish reason and prefix-cache hits, not a reconstruction)."""
    kw = dict(model=model, messages=msgs("Same question"), max_tokens=12)

    def meta(name):
        return {"metadata": {"jac_caller_name": "same", "jac_invocation_id": f"inv-{name}"}}

    texts = {"completion": litellm.completion(**kw, **meta("completion")).choices[0].message.content,
             "acompletion": (await litellm.acompletion(**kw, **meta("acompletion"))).choices[0].message.content,
             "streaming": "".join(c.choices[0].delta.content or "" for c in
                                  litellm.completion(**kw, **meta("streaming"), stream=True))}
    parts = []
    async for c in await litellm.acompletion(**kw, **meta("astreaming"), stream=True):
        parts.append(c.choices[0].delta.content or "")
    texts["astreaming"] = "".join(parts)
    assert len(set(texts.values())) == 1, texts
    turns = {name: _turn(runtime, f"inv-{name}") for name in texts}
    first = turns["completion"]
    for name, t in turns.items():
        assert t["output_text"] == texts[name]
        assert (t["prompt_tokens"], t["completion_tokens"], t["finish_reason"]) == \
            (first["prompt_tokens"], first["completion_tokens"], first["finish_reason"]), name
    # the same prompt again: served from the prefix cache, and the record says so
    assert all(turns[n]["cached_tokens"] > 0 for n in ("acompletion", "streaming", "astreaming"))
    assert first["finish_reason"] == ("length" if first["completion_tokens"] == 12 else "stop")


def test_streamed_tool_call_is_captured_as_a_tool_call(model, runtime):
    chunks = list(litellm.completion(model=model, messages=msgs("Weather in Paris?"), tools=TOOLS,
                                     tool_choice="required", max_tokens=60, stream=True,
                                     metadata={"jac_caller_name": "w", "jac_invocation_id": "inv-stream-tool"}))
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls and calls[0].function.name == "get_weather"
    turn = _turn(runtime, "inv-stream-tool")
    assert turn["finish_reason"] == "tool_calls" and turn["output_text"] is None
    assert json.loads(turn["tool_calls_json"])[0]["function"]["name"] == "get_weather"


def test_stopping_a_stream_early_cancels_the_request(model, runtime):
    eng = runtime.engines.get(model.split("/", 1)[1])
    before = eng.stats()
    stream = litellm.completion(model=model, messages=msgs("A long story"), max_tokens=400, stream=True)
    next(iter(stream))
    stream.completion_stream.close()  # the consumer walks away
    eng.generate("x", max_tokens=1)  # cancellations are finished at the start of the next step
    after = eng.stats()
    assert after["requests_finished"] == before["requests_finished"] + 2
    assert after["tokens_generated"] - before["tokens_generated"] < 400  # it stopped, far short of its budget
