"""The stop-sequence matcher: the stream is cut at the first stop sequence, which is never
emitted, and text that may still become one is held back only while it may."""

from __future__ import annotations

from runners.detokenize import StopMatcher


def feed_all(matcher: StopMatcher, pieces: list[str]) -> tuple[str, bool]:
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_without_stops_everything_passes_at_once() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("hello") == ("hello", False)


def test_a_stop_split_across_pieces_is_found_and_not_emitted() -> None:
    assert feed_all(StopMatcher(["END"]), ["one E", "N", "D two"]) == ("one ", True)


def test_a_possible_stop_is_held_back_then_released_when_it_is_not_one() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("abc EN") == ("abc ", False)  # "EN" may still become "END"
    assert matcher.feed("x") == ("ENx", False)


def test_the_earliest_of_several_stops_wins() -> None:
    assert feed_all(StopMatcher(["world", "lo"]), ["hello world"]) == ("hel", True)


def test_flush_returns_held_text_at_the_end_and_empty_stops_are_ignored() -> None:
    matcher = StopMatcher(["", "###"])
    assert matcher.feed("answer #") == ("answer ", False)
    assert matcher.flush() == "#"
