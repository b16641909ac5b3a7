"""StopStringMatcher: cuts streamed text at the first stop string without ever emitting part of one."""

from collections.abc import Sequence


class StopStringMatcher:
    """Feed text deltas in order; get back what is safe to emit and, once found, the matched stop.

    Text that could be the beginning of a stop string is held until later text rules it in or out,
    so a stop string split across deltas is still found and none of it leaks into the output.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None

    def push(self, text: str) -> str:
        """Add a delta; return the text to emit. After a match, `matched` is set and later pushes return ''."""
        if self.matched is not None:
            return ""
        held = self._held + text
        # The earliest occurrence wins; at one position the longest stop does, so its text is all cut.
        best_at, best = -1, None
        for stop in self.stops:
            at = held.find(stop)
            if at >= 0 and (best is None or at < best_at or (at == best_at and len(stop) > len(best))):
                best_at, best = at, stop
        if best is not None:
            self.matched = best
            self._held = ""
            return held[:best_at]
        keep = self._partial_match_length(held)
        self._held = held[len(held) - keep :]
        return held[: len(held) - keep]

    def flush(self) -> str:
        """The held text, once no more text is coming."""
        held, self._held = self._held, ""
        return held if self.matched is None else ""

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of some stop string."""
        longest = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:k]):
                    longest = k
                    break
        return longest
