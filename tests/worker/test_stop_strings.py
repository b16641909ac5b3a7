"""StopStringMatcher: stop strings found across deltas, with none of their text let out."""

from worker.stop_strings import StopStringMatcher


def _run(stops: list[str], deltas: list[str]) -> tuple[list[str], str | None]:
    matcher = StopStringMatcher(stops)
    out = [matcher.push(d) for d in deltas]
    out.append(matcher.flush())
    return out, matcher.matched


def test_stop_split_across_deltas_is_cut_without_leaking():
    out, matched = _run(["STOP"], ["abc S", "T", "OP more"])
    assert matched == "STOP"
    assert "".join(out) == "abc "
    assert out[0] == "abc "  # text that cannot start the stop is not held back


def test_partial_match_is_released_when_it_turns_out_not_to_be_a_stop():
    out, matched = _run(["STOP"], ["abc ST", "Oxyz"])
    assert matched is None
    assert out[0] == "abc "
    assert "".join(out) == "abc STOxyz"


def test_held_text_is_flushed_at_the_end():
    out, matched = _run(["STOP"], ["abc STO"])
    assert matched is None and out == ["abc ", "STO"]


def test_earliest_stop_wins_and_longest_at_the_same_position():
    assert _run(["cd", "b"], ["abcd"])[1] == "b"
    out, matched = _run(["ab", "abc"], ["xabcx"])
    assert matched == "abc" and "".join(out) == "x"


def test_stop_at_the_very_start_gives_empty_text():
    out, matched = _run(["\n"], ["\nhello"])
    assert matched == "\n" and "".join(out) == ""


def test_nothing_after_a_match():
    matcher = StopStringMatcher(["x"])
    assert matcher.push("axb") == "a"
    assert matcher.push("more") == "" and matcher.flush() == ""


def test_no_stops_passes_everything_through():
    out, matched = _run([], ["a", "b"])
    assert out == ["a", "b", ""] and matched is None


def test_overlapping_prefixes_are_held_as_long_as_needed():
    out, matched = _run(["aab"], ["a", "a", "a", "b"])
    assert matched == "aab" and "".join(out) == "a"
