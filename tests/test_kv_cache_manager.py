"""The native KvCacheManager on a fake llama.cpp memory that records each call:
which sequence a request gets, how much of its prompt it may skip, and the
seq_rm / seq_cp calls that prepare the KV for it."""

from mtllm_locally._engine import _internals as native


def make(n_seq=4, prefix_reuse=True, n_swa=0):
    memory = native.FakeKvMemory()
    return native.KvCacheManager(memory, n_seq, prefix_reuse, n_swa), memory


def cache(kv, tokens, key=""):
    """A finished request that leaves `tokens` behind as an idle cache; its sequence."""
    seq, n_reuse = kv.acquire(tokens, key)
    kv.on_computed(seq, tokens[n_reuse:])
    kv.release(seq)
    return seq


def test_a_fresh_sequence_is_cleared_and_reuses_nothing():
    kv, memory = make()
    assert kv.acquire([1, 2, 3]) == (0, 0)
    assert memory.calls == [("rm", 0, -1, -1)]
    assert kv.reused_tokens == 0


def test_the_longest_common_prefix_wins():
    kv, memory = make()
    short = cache(kv, [1, 2, 9])
    long = cache(kv, [1, 2, 3, 4, 9])
    other = cache(kv, [5, 6, 7])
    assert len({short, long, other}) == 3
    reused = kv.reused_tokens
    memory.clear_calls()
    seq, n_reuse = kv.acquire([1, 2, 3, 4, 5, 6])
    assert n_reuse == 4
    # `long` holds [1 2 3 4 9]: taking it in place would lose its tail, so its prefix
    # is shared into the empty sequence (seq_cp shares cells) and `long` stays a cache
    assert seq not in (short, long, other)
    assert memory.calls == [("rm", seq, -1, -1), ("cp", long, seq, 0, 4)]
    assert kv.cached_sequences == 3
    assert kv.reused_tokens == reused + 4


def test_an_idle_cache_that_is_a_prefix_of_the_prompt_is_taken_in_place():
    kv, memory = make()
    src = cache(kv, [1, 2, 3])
    memory.clear_calls()
    assert kv.acquire([1, 2, 3, 4, 5]) == (src, 3)
    assert memory.calls == [("rm", src, 3, -1)]  # nothing copied, nothing lost
    assert kv.cached_sequences == 0


def test_the_last_prompt_token_is_always_decoded():
    kv, memory = make()
    src = cache(kv, [1, 2, 3, 4])
    memory.clear_calls()
    # the same prompt again: all but its last token come from the cache, shared into
    # another sequence so that the cache keeps its last token
    seq, n_reuse = kv.acquire([1, 2, 3, 4])
    assert seq != src and n_reuse == 3
    assert memory.calls == [("rm", seq, -1, -1), ("cp", src, seq, 0, 3)]


def test_with_no_other_sequence_free_an_idle_cache_loses_its_tail():
    kv, memory = make(n_seq=1)
    src = cache(kv, [1, 2, 3, 4])
    memory.clear_calls()
    assert kv.acquire([1, 2, 9]) == (src, 2)
    assert memory.calls == [("rm", src, 2, -1)]


def test_a_running_sequence_shares_its_prefix_by_seq_cp():
    kv, memory = make()
    running, _ = kv.acquire([1, 2, 3, 4])
    kv.on_computed(running, [1, 2, 3, 4])
    memory.clear_calls()
    seq, n_reuse = kv.acquire([1, 2, 3, 7, 8])
    assert seq != running and n_reuse == 3
    assert memory.calls == [("rm", seq, -1, -1), ("cp", running, seq, 0, 3)]


def test_an_idle_source_is_preferred_over_a_busy_one_on_ties():
    kv, memory = make()
    busy, _ = kv.acquire([1, 2, 3, 4])
    kv.on_computed(busy, [1, 2, 3, 4])
    idle = cache(kv, [1, 2, 3])  # found after `busy`, with as long a match
    assert busy != idle
    memory.clear_calls()
    assert kv.acquire([1, 2, 3, 5]) == (idle, 3)
    assert memory.calls == [("rm", idle, 3, -1)]


def test_the_adapter_key_is_part_of_the_prefix():
    kv, _ = make()
    cache(kv, [1, 2, 3, 4], key="7:1;")
    assert kv.acquire([1, 2, 3, 4, 5], key="")[1] == 0
    assert kv.acquire([1, 2, 3, 4, 5], key="7:0.5;")[1] == 0
    assert kv.acquire([1, 2, 3, 4, 5], key="7:1;")[1] == 4


def test_reuse_can_be_refused_per_request_or_switched_off():
    kv, _ = make()
    cache(kv, [1, 2, 3, 4])
    assert kv.acquire([1, 2, 3, 4, 5], allow_reuse=False)[1] == 0

    kv, memory = make(prefix_reuse=False)
    seq = cache(kv, [1, 2, 3, 4])
    assert memory.calls[-1] == ("rm", seq, -1, -1)  # released = dropped
    assert kv.cached_sequences == 0
    assert kv.acquire([1, 2, 3, 4, 5])[1] == 0


def test_every_sequence_busy_is_a_value_not_an_error():
    kv, _ = make(n_seq=2)
    assert kv.acquire([1]) is not None
    assert kv.acquire([2]) is not None
    assert kv.acquire([3]) is None
    kv.release(0)
    assert kv.acquire([3]) is not None


def test_a_new_request_takes_an_empty_sequence_before_a_cache():
    kv, _ = make(n_seq=3)
    cached = cache(kv, [1, 2])
    seq, _ = kv.acquire([5, 6])
    assert seq != cached
    assert kv.cached_sequences == 1


def test_without_an_empty_sequence_the_least_recently_used_cache_is_overwritten():
    kv, memory = make(n_seq=3)
    seqs = {}
    for name, tokens in (("a", [1, 1]), ("b", [2, 2]), ("c", [3, 3])):
        seqs[name] = cache(kv, tokens)
    # use "a" again, so "b" is now the least recently used
    again, _ = kv.acquire([1, 1, 4])
    assert again == seqs["a"]
    kv.on_computed(again, [4])
    kv.release(again)
    memory.clear_calls()
    seq, n_reuse = kv.acquire([8, 8])
    assert (seq, n_reuse) == (seqs["b"], 0)
    assert memory.calls == [("rm", seqs["b"], -1, -1)]


def test_eviction_is_least_recently_used_and_skips_busy_sequences():
    kv, memory = make(n_seq=4)
    order = [cache(kv, [t, t]) for t in (1, 2, 3)]
    busy, _ = kv.acquire([9])
    kv.on_computed(busy, [9])
    memory.clear_calls()
    evicted = []
    while kv.evict_one():
        evicted.append(memory.calls[-1][1])
    assert evicted == order
    assert busy not in evicted
    assert kv.cached_sequences == 0


def test_a_memory_that_cannot_cut_a_sequence_gets_a_copy_instead():
    kv, memory = make()
    memory.fail_partial_rm = True  # as llama.cpp answers for recurrent models
    src = cache(kv, [1, 2, 3])
    memory.clear_calls()
    seq, n_reuse = kv.acquire([1, 2, 3, 4])
    assert seq != src and n_reuse == 3
    assert memory.calls == [("rm", src, 3, -1), ("rm", seq, -1, -1), ("cp", src, seq, 0, 3)]


def test_dropped_sequences_forget_their_tokens():
    kv, _ = make()
    seq, _ = kv.acquire([1, 2, 3])
    kv.on_computed(seq, [1, 2, 3])
    kv.drop(seq)
    assert kv.cached_sequences == 0
    assert kv.acquire([1, 2, 3, 4])[1] == 0


def test_a_sliding_window_prefix_is_reused_only_while_its_window_is_held():
    """Sliding-window layers (window 4 here) lose a sequence's cells that left the window
    when others need room; llama.cpp reports the first position left as seq_pos_min. The
    token after a reused prefix of n tokens reads positions n-3 .. n-1 there."""
    kv, memory = make(n_swa=4)
    long = cache(kv, list(range(1, 21)))      # 20 tokens, positions 0..19
    short = cache(kv, [1, 2, 3, 4, 5, 99])    # shares 5 tokens with `long`
    memory.pos_min = {long: 10}               # positions 0..9 of `long` were overwritten
    # 15 tokens of `long` need positions 12..14: still there
    seq, n_reuse = kv.acquire(list(range(1, 16)) + [77])
    assert n_reuse == 15 and ("cp", long, seq, 0, 15) in memory.calls
    kv.release(seq)
    # 8 tokens would need positions 5..7, which `long` lost: the next best source serves
    memory.pos_min = {long: 10, seq: 10}
    seq, n_reuse = kv.acquire(list(range(1, 9)) + [77])
    assert n_reuse == 5 and ("cp", short, seq, 0, 5) in memory.calls
    kv.release(seq)
    # within the first window every position must be there; without any other source, nothing is reused
    memory.pos_min = {s: 1 for s in range(4)}
    assert kv.acquire([1, 2, 3, 88])[1] == 0


def test_without_a_sliding_window_the_first_position_does_not_matter():
    kv, memory = make()
    src = cache(kv, [1, 2, 3, 4, 5, 6])
    memory.pos_min = {src: 5}
    assert kv.acquire([1, 2, 3, 4, 5, 6, 7]) == (src, 6)
