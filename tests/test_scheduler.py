"""The native Scheduler on its own: admission, slicing, adapter groups, preemption.

Driven through `_engine._internals` with no model: a request is its token ids, the
KV cache manager runs on a fake memory, and a test plays the engine (it reports a
plan as computed and appends a "sampled" token)."""

import pytest

from mtllm_locally._engine import _internals as native


def make(n_seq=8, budget=16, max_running=4, prefix_reuse=True):
    memory = native.FakeKvMemory()
    kv = native.KvCacheManager(memory, n_seq, prefix_reuse)
    return native.Scheduler(budget, max_running, kv), kv, memory


def request(rid, prompt, adapters=(), logits_all=False, per_row=False):
    return native.make_request(rid, list(prompt), list(adapters), logits_all, per_row)


def step(sched):
    """schedule -> (the engine decodes) -> computed; returns the plan."""
    plan = sched.schedule()
    sched.computed()
    return plan


# ------------------------------------------------------------------ slicing


def test_prompts_are_sliced_to_the_budget_and_continue_next_step():
    sched, _, _ = make(budget=8)
    a, b = request(1, range(10, 16)), request(2, range(20, 30))
    sched.add(a)
    sched.add(b)
    assert sched.admit() == [1, 2]

    plan = step(sched)
    # a's whole prompt (it ends there: sample), then what is left of the budget for b
    assert plan["slices"] == [(1, 0, 6, True), (2, 0, 2, False)]
    assert plan["n_tokens"] == 8

    native.append_token(a, 99)  # a sampled a token
    plan = step(sched)
    # a decodes one token, b's prompt continues where it stopped
    assert plan["slices"] == [(1, 6, 1, True), (2, 2, 7, False)]
    assert plan["n_tokens"] == 8

    native.append_token(a, 98)
    plan = step(sched)
    # b's last prompt token is one token: decoding and prefill are one rule
    assert plan["slices"] == [(1, 7, 1, True), (2, 9, 1, True)]
    assert plan["n_tokens"] == 2
    assert native.progress(b)["n_computed"] == 10


def test_decode_tokens_go_before_prompt_chunks_of_earlier_requests():
    sched, _, _ = make(budget=4)
    long_prompt, generating = request(1, range(100, 112)), request(2, [7])
    sched.add(long_prompt)
    sched.add(generating)
    sched.admit()
    plan = step(sched)
    assert plan["slices"] == [(2, 0, 1, True), (1, 0, 3, False)]


def test_decoders_beyond_the_budget_wait_for_the_next_step():
    sched, _, _ = make(budget=2)
    reqs = [request(i, [i]) for i in (1, 2, 3)]
    for r in reqs:
        sched.add(r)
    sched.admit()
    plan = step(sched)
    assert [s[0] for s in plan["slices"]] == [1, 2]
    assert plan["n_tokens"] == 2
    assert native.progress(reqs[2])["n_computed"] == 0


def test_nothing_to_compute_is_an_empty_plan():
    sched, _, _ = make()
    assert sched.schedule()["slices"] == []
    r = request(1, [1, 2, 3])
    sched.add(r)
    sched.admit()
    step(sched)
    # computed up to its last token and nothing sampled yet: no work
    assert sched.schedule()["slices"] == []


# ------------------------------------------------------------------ adapter groups


def test_a_step_serves_one_adapter_group_and_groups_take_turns():
    sched, _, _ = make(budget=16)
    base = request(1, [1, 2])
    tuned = [request(2, [3, 4], [(5, 1.0)]), request(3, [5, 6], [(5, 1.0)])]
    for r in (base, *tuned):
        sched.add(r)
    sched.admit()
    key = native.adapter_key([(5, 1.0)])

    first = step(sched)
    assert first["adapter_key"] == "" and [s[0] for s in first["slices"]] == [1]
    second = step(sched)
    assert second["adapter_key"] == key and second["adapters"] == [(5, 1.0)]
    assert [s[0] for s in second["slices"]] == [2, 3]

    for r in (base, *tuned):
        native.append_token(r, 0)
    assert [s[0] for s in step(sched)["slices"]] == [1]
    assert [s[0] for s in step(sched)["slices"]] == [2, 3]


def test_per_row_adapters_share_the_base_group_and_context_adapters_keep_their_own():
    sched, kv, _ = make(budget=16)
    base = request(1, [1, 2])
    rows = [request(2, [3, 4], [(5, 1.0)], per_row=True), request(3, [5, 6], [(6, 0.5)], per_row=True)]
    ctx = request(4, [7, 8], [(7, 1.0)])  # an adapter the engine cannot apply per row
    for r in (base, *rows, ctx):
        sched.add(r)
    sched.admit()
    first = step(sched)
    # one decode for the base and both per-row adapters; nothing set on the context
    assert first["adapter_key"] == "" and first["adapters"] == [] and [s[0] for s in first["slices"]] == [1, 2, 3]
    second = step(sched)
    assert second["adapter_key"] == native.adapter_key([(7, 1.0)]) and second["adapters"] == [(7, 1.0)]
    assert [s[0] for s in second["slices"]] == [4]
    # the KV prefix key stays the adapter set: per-row requests never share KV with the base
    assert [native.progress(r)["key"] for r in (base, *rows)] == ["", native.adapter_key([(5, 1.0)]),
                                                               native.adapter_key([(6, 0.5)])]


def test_a_group_without_work_is_skipped():
    sched, _, _ = make()
    base, tuned = request(1, [1, 2]), request(2, [3, 4], [(5, 0.5)])
    sched.add(base)
    sched.add(tuned)
    sched.admit()
    step(sched)
    step(sched)  # both prompts computed
    native.append_token(base, 0)
    for _ in range(3):  # only the base group has work, every step
        plan = step(sched)
        assert plan["adapter_key"] == "" and plan["slices"][0][0] == 1
        native.append_token(base, 0)


def test_scale_is_part_of_the_adapter_key():
    assert native.adapter_key([(5, 1.0)]) != native.adapter_key([(5, 0.5)])
    assert native.adapter_key([(1, 1.0), (2, 1.0)]) != native.adapter_key([(1, 1.0)])


# ------------------------------------------------------------------ admission


def test_admission_is_fifo_and_capped_by_max_running():
    sched, _, _ = make(max_running=2)
    for i in (1, 2, 3):
        sched.add(request(i, [i, i]))
    assert sched.admit() == [1, 2]
    assert sched.running == [1, 2] and sched.waiting == [3]
    assert sched.admit() == []
    sched.finish(1)
    assert sched.admit() == [3]
    assert sched.running == [2, 3]


def test_admission_stops_when_no_kv_sequence_is_free():
    sched, _, _ = make(n_seq=2, max_running=4)
    for i in (1, 2, 3):
        sched.add(request(i, [i, i]))
    assert sched.admit() == [1, 2]
    assert sched.waiting == [3]
    sched.finish(2)  # its sequence is free again
    assert sched.admit() == [3]


def test_admission_starts_after_a_cached_prefix():
    sched, _, _ = make()
    first = request(1, [1, 2, 3, 4, 5])
    sched.add(first)
    sched.admit()
    step(sched)
    native.append_token(first, 6)
    step(sched)
    sched.finish(1, keep_cache=True)

    second = request(2, [1, 2, 3, 4, 5, 6, 7, 8])
    sched.add(second)
    sched.admit()
    assert native.progress(second)["n_computed"] == 6
    assert step(sched)["slices"] == [(2, 6, 2, True)]


def test_logits_all_requests_never_start_from_a_cached_prefix():
    sched, _, _ = make()
    first = request(1, [1, 2, 3, 4])
    sched.add(first)
    sched.admit()
    step(sched)
    sched.finish(1)
    scored = request(2, [1, 2, 3, 4, 5], logits_all=True)
    sched.add(scored)
    sched.admit()
    assert native.progress(scored)["n_computed"] == 0


def test_the_adapter_set_is_part_of_the_prefix_key():
    sched, _, _ = make()
    tuned = request(1, [1, 2, 3, 4], [(7, 1.0)])
    sched.add(tuned)
    sched.admit()
    step(sched)
    sched.finish(1)

    base = request(2, [1, 2, 3, 4, 5])
    other_scale = request(3, [1, 2, 3, 4, 5], [(7, 0.5)])
    same = request(4, [1, 2, 3, 4, 5], [(7, 1.0)])
    for r in (base, other_scale, same):
        sched.add(r)
    sched.admit()
    assert native.progress(base)["n_computed"] == 0
    assert native.progress(other_scale)["n_computed"] == 0
    assert native.progress(same)["n_computed"] == 4


# ------------------------------------------------------------------ preemption


def running_three(n_seq=8):
    sched, kv, memory = make(n_seq=n_seq, max_running=4)
    reqs = [request(i, [10 * i, 10 * i + 1]) for i in (1, 2, 3)]
    for r in reqs:
        sched.add(r)
    sched.admit()
    step(sched)
    for r in reqs:
        native.append_token(r, 0)
    step(sched)
    return sched, kv, memory, reqs


def test_no_kv_slot_preempts_the_most_recently_admitted_request():
    sched, _, memory, reqs = running_three()
    waiting = request(4, [4, 4])
    sched.add(waiting)  # arrived after the running ones: not admitted yet
    seq = native.progress(reqs[2])["seq"]
    memory.clear_calls()

    assert sched.relieve_kv_pressure() == "preempted"
    assert sched.running == [1, 2]
    assert sched.waiting == [3, 4]  # the victim goes first: it was admitted before
    victim = native.progress(reqs[2])
    assert victim["seq"] == -1 and victim["n_computed"] == 0
    assert victim["tokens"] == [30, 31, 0]  # it keeps what it generated
    assert victim["preemptions"] == 1
    assert memory.calls == [("rm", seq, -1, -1)]


def test_after_a_preemption_nothing_is_admitted_until_a_request_ends():
    sched, _, _, reqs = running_three()
    sched.relieve_kv_pressure()
    assert sched.kv_pressure
    # room by max_running and by sequences, but the cache just overflowed
    assert sched.admit() == []
    sched.finish(1)
    assert not sched.kv_pressure
    assert sched.admit() == [3]
    # recomputed from the start, generated token included
    assert native.progress(reqs[2])["n_computed"] == 0
    plan = sched.schedule()
    assert (3, 0, 3, True) in plan["slices"]


def test_an_idle_prefix_cache_is_evicted_before_anyone_is_preempted():
    sched, kv, _, _ = running_three()
    extra = request(9, [9, 9])
    sched.add(extra)
    sched.admit()
    step(sched)
    sched.finish(9, keep_cache=True)
    assert kv.cached_sequences == 1

    assert sched.relieve_kv_pressure() == "evicted"
    assert kv.cached_sequences == 0
    assert sched.running == [1, 2, 3] and not sched.kv_pressure
    assert sched.relieve_kv_pressure() == "preempted"


def test_a_lone_request_that_does_not_fit_cannot_be_relieved():
    sched, _, _ = make()
    sched.add(request(1, [1, 2, 3]))
    sched.admit()
    assert sched.relieve_kv_pressure() == "none"
    assert sched.running == [1]


# ------------------------------------------------------------------ cancellation, shutdown


def test_cancelled_waiting_requests_leave_the_queue_in_order():
    sched, _, _ = make(max_running=1)
    reqs = [request(i, [i, i]) for i in (1, 2, 3, 4)]
    for r in reqs:
        sched.add(r)
    sched.admit()
    reqs[1].cancel()
    reqs[3].cancel()
    assert sched.take_cancelled_waiting() == [2, 4]
    assert sched.waiting == [3]
    assert sched.running == [1]  # a running request is the engine's to finish


def test_take_all_returns_running_then_waiting_and_empties_both():
    sched, _, _ = make(max_running=2)
    for i in (1, 2, 3, 4):
        sched.add(request(i, [i, i]))
    sched.admit()
    assert sched.take_all() == [1, 2, 3, 4]
    assert sched.running == [] and sched.waiting == []


def test_harness_refuses_unknown_requests():
    sched, _, _ = make()
    with pytest.raises(Exception, match="not running"):
        sched.finish(42)
