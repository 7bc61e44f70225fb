"""byllm's ReAct protocol held for a small model (serve/react_guard.py)."""

import pytest

from mtllm_locally.serve.react_guard import FINISH, tool_choice_for

TOOLS = [{"type": "function", "function": {"name": "get_temperature"}},
         {"type": "function", "function": {"name": FINISH}}]
FORCED = {"type": "function", "function": {"name": FINISH}}


def turn(name, args):
    return [{"role": "assistant", "content": None,
             "tool_calls": [{"id": "x", "type": "function", "function": {"name": name, "arguments": args}}]},
            {"role": "tool", "tool_call_id": "x", "content": "21C"}]


USER = [{"role": "user", "content": "Weather in Paris?"}]


def test_without_finish_tool_the_request_decides():
    plain = TOOLS[:1]
    assert tool_choice_for(USER + turn("get_temperature", '{"city":"Paris"}') * 3, plain, "auto", 8) == "auto"
    assert tool_choice_for(USER, plain, None, 8) is None


@pytest.mark.parametrize("choice", ["auto", None])
def test_react_turns_must_call_a_tool(choice):
    assert tool_choice_for(USER, TOOLS, choice, 8) == "required"


def test_explicit_choices_are_kept_until_the_guard_fires():
    named = {"type": "function", "function": {"name": "get_temperature"}}
    assert tool_choice_for(USER, TOOLS, named, 8) == named
    assert tool_choice_for(USER, TOOLS, "required", 8) == "required"
    assert tool_choice_for(USER + turn("get_temperature", '{"city":"Paris"}') * 2, TOOLS, "none", 8) == "none"


def test_a_repeated_call_forces_finish():
    once = USER + turn("get_temperature", '{"city": "Paris"}')
    assert tool_choice_for(once, TOOLS, "auto", 8) == "required"
    # the same arguments, spelled differently (key order, spacing, a dict): still a repeat
    again = once + turn("get_temperature", '{"city":"Paris"}')
    assert tool_choice_for(again, TOOLS, "auto", 8) == FORCED
    assert tool_choice_for(once + turn("get_temperature", {"city": "Paris"}), TOOLS, "auto", 8) == FORCED


def test_different_calls_are_not_repeats_until_the_turn_limit():
    msgs = list(USER)
    for i in range(3):
        msgs += turn("get_temperature", f'{{"city": "c{i}"}}')
        assert tool_choice_for(msgs, TOOLS, "auto", 4) == "required"
    msgs += turn("get_temperature", '{"city": "c3"}')
    assert tool_choice_for(msgs, TOOLS, "auto", 4) == FORCED  # 4 calls made: the 5th turn finishes


def test_only_the_latest_call_counts_as_a_repeat():
    """A repeat earlier in the history, followed by new calls, does not force finish:
    the model moved on (and byllm already saw that turn)."""
    msgs = USER + turn("get_temperature", '{"city": "a"}') + turn("get_temperature", '{"city": "a"}')
    msgs += turn("get_temperature", '{"city": "b"}')
    assert tool_choice_for(msgs, TOOLS, "auto", 8) == "required"


def test_malformed_history_does_not_crash_the_guard():
    msgs = USER + [{"role": "assistant", "tool_calls": [{"function": {"name": "get_temperature", "arguments": "{oops"}},
                                                        {"function": {"name": "get_temperature", "arguments": ["x"]}},
                                                        "not a call"]}]
    assert tool_choice_for(msgs, TOOLS, "auto", 8) == "required"
