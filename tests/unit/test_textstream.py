from collections.abc import Sequence

from vllm_obtain.core.textstream import TextStream, stop_prefix_overlap


def run(pieces: list[bytes], stops: Sequence[str] = ()) -> tuple[list[str], TextStream]:
    stream = TextStream(stops)
    out = [stream.feed(p) for p in pieces]
    out.append(stream.finish())
    return out, stream


def test_multibyte_character_split_across_tokens_is_held_back_until_whole():
    out, _ = run([b"caf", "é".encode()[:1], "é".encode()[1:], b"!"])
    assert out == ["caf", "", "é", "!", ""]


def test_four_byte_emoji_split_in_three_is_emitted_once_whole():
    emoji = "🦙".encode()
    out, _ = run([emoji[:1], emoji[1:3], emoji[3:]])
    assert out == ["", "", "🦙", ""]


def test_a_character_cut_off_at_the_end_is_dropped_not_replaced():
    """max_tokens can end the text inside a character: its first bytes are not text."""
    out, _ = run([b"ok", b"\xe2\x82"])
    assert "".join(out) == "ok"


def test_bytes_that_are_no_utf8_mid_text_become_the_replacement_character():
    out, _ = run([b"ok", b"\xff", b"!"])
    assert "".join(out) == "ok\ufffd!"


def test_stop_string_split_across_tokens_never_leaks():
    out, stream = run([b"Hel", b"lo ST", b"OP and more"], ["STOP"])
    assert "".join(out) == "Hello "
    assert stream.stopped
    assert all("S" not in chunk for chunk in out)


def test_stop_string_split_at_every_possible_point_is_cut_exactly():
    text = "The answer is 42. END of story"
    data = text.encode()
    for i in range(1, len(data)):
        for j in range(i + 1, len(data)):
            out, stream = run([data[:i], data[i:j], data[j:]], ["END"])
            assert "".join(out) == "The answer is 42. ", (i, j)
            assert stream.stopped


def test_text_that_only_looks_like_a_stop_prefix_is_released():
    out, stream = run([b"ST", b"ART"], ["STOP"])
    assert "".join(out) == "START"
    assert not stream.stopped
    assert out[0] == ""  # held back while it could still have become "STOP"


def test_earliest_of_several_stop_strings_wins():
    out, _ = run([b"one two three"], ["three", "two"])
    assert "".join(out) == "one "


def test_held_back_prefix_is_flushed_when_the_sequence_ends():
    out, stream = run([b"almost ST"], ["STOP"])
    assert "".join(out) == "almost ST"
    assert not stream.stopped


def test_nothing_is_emitted_after_a_stop():
    stream = TextStream(["x"])
    assert stream.feed(b"ax") == "a"
    assert stream.feed(b"more") == ""
    assert stream.finish() == ""


def test_stop_prefix_overlap():
    assert stop_prefix_overlap("hello wor", ["world"]) == 3
    assert stop_prefix_overlap("hello", ["xyz"]) == 0
    assert stop_prefix_overlap("ab", ["abc", "bcd"]) == 2
