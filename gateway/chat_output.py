"""One chat choice's output as OpenAI shapes it: reasoning, content and tool calls, whole or streamed.

The worker returns plain text. What it means depends on the request and the model:
- a reasoning model (Qwen3) opens its answer with `<think>…</think>`: that part is reasoning_content;
- tool_choice "auto": `<tool_call>` blocks in the rest are tool calls (finish reason "tool_calls");
- tool_choice "required": the output was constrained to a JSON array of calls;
- a named function: the output was constrained to that function's arguments.
Streamed and whole results agree: the stream's deltas add up to the whole message.
"""

from typing import Any, Literal

from gateway.reasoning import ReasoningStream, split_reasoning
from gateway.tool_calls import (
    ParsedToolCall,
    ToolCallDelta,
    ToolCallStream,
    new_call_id,
    parse_named_tool_call,
    parse_required_tool_calls,
    parse_tool_calls,
)

ToolMode = Literal["none", "auto", "required", "named"]
REASONING_MODEL_TYPES = frozenset({"qwen3"})  # model types whose output may open with a think block


class ChatMessageParts:
    """A whole choice's message: content, reasoning and tool calls."""

    def __init__(self, content: str | None, reasoning: str | None, tool_calls: list[ParsedToolCall]) -> None:
        self.content = content
        self.reasoning = reasoning
        self.tool_calls = tool_calls


class ChatOutput:
    """Turns one choice's text into OpenAI's message fields; `feed` for streams, `whole` for a complete text."""

    def __init__(self, mode: ToolMode, reasoning: bool, tool_name: str | None = None) -> None:
        self.mode = mode
        self.tool_name = tool_name
        self._reasoning = ReasoningStream() if reasoning else None
        self._calls = ToolCallStream() if mode == "auto" else None
        self._held: list[str] = []  # "required": the constrained array, parsed at the end
        self._named_id: str | None = None
        self.made_calls = False

    # -- whole -----------------------------------------------------------------------------------

    def whole(self, text: str) -> ChatMessageParts:
        reasoning, content = split_reasoning(text) if self._reasoning is not None else (None, text)
        content = content or ""
        calls: list[ParsedToolCall] = []
        if self.mode == "auto":
            content, calls = parse_tool_calls(content)  # type: ignore[assignment]
        elif self.mode == "required":
            content, calls = parse_required_tool_calls(content)  # type: ignore[assignment]
        elif self.mode == "named":
            assert self.tool_name is not None
            arguments = content
            content, calls = parse_named_tool_call(arguments, self.tool_name)  # type: ignore[assignment]
            # The arguments as generated (the grammar made them valid JSON), as the stream sends them.
            calls = [ParsedToolCall(c.id, c.name, arguments) for c in calls]
        self.made_calls = bool(calls)
        return ChatMessageParts(content or None, reasoning, calls)

    def finish_reason(self, reason: str) -> str:
        """OpenAI's finish reason: "tool_calls" when the model stopped to call tools (not for a named one)."""
        if reason == "stop" and self.made_calls and self.mode in ("auto", "required"):
            return "tool_calls"
        return reason

    # -- streamed --------------------------------------------------------------------------------

    def feed(self, text: str) -> dict[str, Any]:
        """The delta fields (reasoning_content, content, tool_calls) to send for this new text; {} if none yet."""
        reasoning, content = self._split(text, final=False)
        return self._delta(reasoning, self._route(content, final=False))

    def finish(self) -> dict[str, Any]:
        """What was held back, as a last delta ({} if nothing)."""
        reasoning, content = self._split("", final=True)
        return self._delta(reasoning, self._route(content, final=True))

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self._reasoning is None:
            return "", text
        piece = self._reasoning.finish() if final else self._reasoning.feed(text)
        if final and text:
            raise AssertionError("finish takes no text")
        return piece.reasoning, piece.content

    def _route(self, content: str, final: bool) -> list[str | ToolCallDelta]:
        if self.mode == "none":
            return [content] if content else []
        if self.mode == "auto":
            assert self._calls is not None
            out = self._calls.feed(content) if content else []
            out += self._calls.finish() if final else []
            self.made_calls = self.made_calls or any(isinstance(p, ToolCallDelta) for p in out)
            return out
        if self.mode == "named":
            if not content:
                return []
            if self._named_id is None:
                self._named_id = new_call_id()
                self.made_calls = True
                return [ToolCallDelta(0, content, self._named_id, self.tool_name)]
            return [ToolCallDelta(0, content)]
        self._held.append(content)  # required: an array is parsed whole
        if not final:
            return []
        text = "".join(self._held)
        leftover, calls = parse_required_tool_calls(text)
        if not calls:
            return [leftover] if leftover else []
        self.made_calls = True
        return [ToolCallDelta(i, c.arguments, c.id, c.name) for i, c in enumerate(calls)]

    @staticmethod
    def _delta(reasoning: str, pieces: list[str | ToolCallDelta]) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        text = "".join(p for p in pieces if isinstance(p, str))
        if text:
            delta["content"] = text
        calls = [p.to_openai() for p in pieces if isinstance(p, ToolCallDelta)]
        if calls:
            delta["tool_calls"] = calls
        return delta
