"""Qwen3's reasoning: the `<think>…</think>` part of the output is `reasoning_content`, the rest `content`.

As vLLM's qwen3 parser does, a think block is either opened by the output (`<think>` as its first
text) or already by the prompt (templates of thinking-only models end the prompt with `<think>`;
the caller says so with in_reasoning). Output that opens no block is all content, even if it holds
a `</think>`. A block that never closes was cut short: everything after the opening is reasoning,
so that a stream can send reasoning as it comes and still agree with the whole-text split.

The whitespace that templates put around the tags is dropped: reasoning is stripped, content after
`</think>` loses its leading whitespace (Qwen3's own template strips both when it renders history).
An empty part is None.
"""

from typing import NamedTuple

THINK_START = "<think>"
THINK_END = "</think>"


def split_reasoning(text: str, *, in_reasoning: bool = False) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output; in_reasoning: the prompt ended inside a think block."""
    if text.startswith(THINK_START):
        text, in_reasoning = text[len(THINK_START) :], True
    if not in_reasoning:
        return None, text or None
    reasoning, _, content = text.partition(THINK_END)
    return reasoning.strip() or None, content.lstrip() or None


class ReasoningDelta(NamedTuple):
    """New reasoning and new content of one streamed piece ("" where there is none)."""

    reasoning: str
    content: str


def _partial_tag_length(text: str, tag: str) -> int:
    """How many of text's last characters could be the start of tag (tag itself not included)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningStream:
    """Splits streamed output into reasoning and content deltas that add up to `split_reasoning`'s.

    Held back until it is decided: the output's first characters while they may be `<think>`, a
    possible `</think>` start, and whitespace that may turn out to be stripped.
    """

    def __init__(self, *, in_reasoning: bool = False) -> None:
        self._in_reasoning = in_reasoning
        self._state = "start"  # "start" (before the output's first characters are known), "reasoning", "content"
        self._held = ""
        self._reasoning_started = False  # some reasoning sent: its leading whitespace is behind us
        self._content_started = False

    def feed(self, text: str) -> ReasoningDelta:
        """The reasoning and content to send for this piece of output."""
        self._held += text
        reasoning = ""
        if self._state == "start":
            if len(self._held) < len(THINK_START) and THINK_START.startswith(self._held):
                return ReasoningDelta("", "")  # may still become <think>
            self._leave_start()
        if self._state == "reasoning":
            end = self._held.find(THINK_END)
            if end == -1:
                keep = len(self._held) - _partial_tag_length(self._held, THINK_END)
                body = self._held[:keep].rstrip()
                # Trailing whitespace waits: it is reasoning only if more reasoning follows it.
                self._held = self._held[len(body) :]
                return ReasoningDelta(self._reasoning(body), "")
            reasoning = self._reasoning(self._held[:end].rstrip())
            self._held, self._state = self._held[end + len(THINK_END) :], "content"
        content = self._content(self._held)
        self._held = ""
        return ReasoningDelta(reasoning, content)

    def finish(self) -> ReasoningDelta:
        """What is left to send once the output has ended."""
        if self._state == "start":
            self._leave_start()
        held, self._held = self._held, ""
        if self._state == "reasoning":
            return ReasoningDelta(self._reasoning(held.rstrip()), "")
        return ReasoningDelta("", self._content(held))

    def _leave_start(self) -> None:
        if self._held.startswith(THINK_START):
            self._held, self._in_reasoning = self._held[len(THINK_START) :], True
        self._state = "reasoning" if self._in_reasoning else "content"

    def _reasoning(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        return text

    def _content(self, text: str) -> str:
        # Content after a think block loses its leading whitespace; content of output without one is verbatim.
        if not self._content_started and self._in_reasoning:
            text = text.lstrip()
        self._content_started = self._content_started or bool(text)
        return text
