"""The native TextStream: token pieces in, text a caller may see now out. It holds
back half a UTF-8 character and any tail that could still become a stop string."""

import pytest

from mtllm_locally._engine import _internals as native


def feed(stream, pieces):
    """Pushes pieces; returns (what each push showed, whether the last one stopped)."""
    shown, stopped = [], False
    for p in pieces:
        out, stopped = stream.push(p)
        shown.append(out)
    return shown, stopped


def test_a_character_split_across_tokens_is_shown_whole():
    s = native.TextStream([])
    assert feed(s, [b"caf\xc3", b"\xa9!"]) == ([b"caf", b"\xc3\xa9!"], False)


def test_a_four_byte_character_in_four_pieces():
    s = native.TextStream([])
    emoji = "\N{GRINNING FACE}".encode()
    shown, _ = feed(s, [emoji[i:i + 1] for i in range(4)])
    assert shown == [b"", b"", b"", emoji]


@pytest.mark.parametrize("text, n", [
    (b"", 0), (b"abc", 3), (b"a\xc3", 1), (b"a\xc3\xa9", 3), (b"\xe2\x82", 0),
    (b"\xe2\x82\xac", 3), (b"\xf0\x9f\x98", 0), (b"\xf0\x9f\x98\x80", 4),
    (b"\x80\x80\x80\x80\x80", 5),  # stray continuation bytes are not held forever
])
def test_utf8_complete_prefix(text, n):
    assert native.utf8_complete_prefix(text) == n


def test_a_stop_string_spanning_pieces_is_never_shown():
    s = native.TextStream(["</end>"])
    shown, stopped = feed(s, [b"Hello <", b"/en", b"d> and more"])
    assert shown == [b"Hello ", b"", b""]
    assert stopped
    assert s.flush() == b""


def test_text_after_a_stop_in_the_same_piece_is_dropped():
    s = native.TextStream(["STOP"])
    assert s.push(b"abcSTOPdef") == (b"abc", True)


def test_a_tail_that_stops_matching_is_released():
    s = native.TextStream(["</end>"])
    assert feed(s, [b"a</e", b"x"]) == ([b"a", b"</ex"], False)


def test_flush_releases_a_partial_stop_as_text():
    s = native.TextStream(["</end>"])
    assert s.push(b"x</en") == (b"x", False)
    assert s.flush() == b"</en"
    assert s.flush() == b""


def test_the_longest_possible_stop_prefix_is_held():
    # "xaa": "aa" may still become "aab"; "aaa": only the last "aa" may
    s = native.TextStream(["aab"])
    shown, stopped = feed(s, [b"xaa", b"a", b"b"])
    assert shown == [b"x", b"a", b""]
    assert stopped


def test_the_earliest_of_several_stops_wins():
    s = native.TextStream(["BB", "AAAA"])
    assert s.push(b"xAAAABB") == (b"x", True)


def test_empty_stop_strings_are_ignored():
    s = native.TextStream(["", "zz"])
    assert s.push(b"abc") == (b"abc", False)


def test_a_stop_held_back_with_a_split_character():
    s = native.TextStream(["\u00e9!"])  # stop "é!", whose first byte arrives alone
    shown, stopped = feed(s, [b"ok \xc3", b"\xa9", b"!"])
    assert shown == [b"ok ", b"", b""]
    assert stopped
