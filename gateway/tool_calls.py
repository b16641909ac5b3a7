"""Tool calls out of generated text: Qwen3's (Hermes-style) `<tool_call>` blocks, whole or streamed.

A call is a block `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` anywhere in the output;
the text outside the blocks is the message's content. A block that does not hold such an object
(bad JSON, no name, arguments not an object) is left in the content as the model wrote it, so nothing
the model said is lost. A last block the output never closes counts if its JSON is complete.

Arguments are re-serialized compactly (`json.dumps` with "," and ":" separators, non-ASCII kept), as
OpenAI sends them. Content that is only whitespace (the newlines around blocks) is no content.

For `tool_choice` "required" or a named function the gateway constrains the output instead:
`required_tools_schema` is the JSON Schema for that, and `parse_required_tool_calls` /
`parse_named_tool_call` turn the constrained text into calls.
"""

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"


@dataclass(frozen=True)
class ParsedToolCall:
    """One function call: OpenAI's id, the function's name, and its arguments as JSON object text."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict[str, Any]:
        """The call as an OpenAI message's `tool_calls` entry."""
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ToolCallDelta:
    """A piece of a streamed call: the first piece of each call has its id and name, the rest none."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The piece as an entry of an OpenAI chunk's `delta.tool_calls`."""
        if self.id is None:
            return {"index": self.index, "function": {"arguments": self.arguments}}
        function = {"name": self.name, "arguments": self.arguments}
        return {"index": self.index, "id": self.id, "type": "function", "function": function}


def new_call_id() -> str:
    """A fresh id shaped like OpenAI's: `call_` and 24 hex digits."""
    return "call_" + uuid.uuid4().hex[:24]


def _reject_constant(name: str) -> Any:
    # json.loads takes NaN and Infinity, which json.dumps would write back as non-JSON text.
    raise ValueError(f"{name} is not JSON")


def _loads(text: str) -> Any:
    return json.loads(text, parse_constant=_reject_constant)


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _call_from_block(inner: str) -> ParsedToolCall | None:
    """The call a block's inside describes, or None when it describes none."""
    try:
        obj = _loads(inner)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return ParsedToolCall(new_call_id(), obj["name"], _dumps(arguments))


def _content_or_none(content: str) -> str | None:
    return content if content.strip() else None


def parse_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """The whole output's content (None if only whitespace) and its tool calls, in order."""
    content: list[str] = []
    calls: list[ParsedToolCall] = []
    pos = 0
    while (start := text.find(TOOL_CALL_START, pos)) != -1:
        content.append(text[pos:start])
        inner_at = start + len(TOOL_CALL_START)
        end = text.find(TOOL_CALL_END, inner_at)
        inner_end = len(text) if end == -1 else end
        pos = len(text) if end == -1 else end + len(TOOL_CALL_END)
        call = _call_from_block(text[inner_at:inner_end])
        if call is None:
            content.append(text[start:pos])
        else:
            calls.append(call)
    content.append(text[pos:])
    return _content_or_none("".join(content)), calls


def _partial_tag_length(text: str, tag: str) -> int:
    """How many of text's last characters could be the start of tag (tag itself not included)."""
    for n in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ToolCallStream:
    """Turns streamed text into content pieces and tool-call deltas that add up to `parse_tool_calls`.

    A block is sent once it closes, as two deltas (id and name, then the arguments): only then is it
    known to be a call and not content. Text that may begin a `<tool_call>` tag is held back, and so
    is leading whitespace until some real content follows it.
    """

    def __init__(self) -> None:
        self._held = ""  # text not yet sent: a possible tag start, or the open block being read
        self._in_block = False
        self._blank = ""  # whitespace-only content not yet sent: it is sent before the first real content
        self._content_started = False
        self._next_index = 0

    def feed(self, text: str) -> list[str | ToolCallDelta]:
        """What to send for this piece of output, in order: content strings and tool-call deltas."""
        out: list[str | ToolCallDelta] = []
        searched = len(self._held)
        self._held += text
        while True:
            if self._in_block:
                # Resume the search where a tag could still begin, so char-by-char feeding stays linear.
                end = self._held.find(TOOL_CALL_END, max(len(TOOL_CALL_START), searched - len(TOOL_CALL_END) + 1))
                if end == -1:
                    return out
                self._close_block(end, out)
            else:
                start = self._held.find(TOOL_CALL_START)
                if start == -1:
                    keep = _partial_tag_length(self._held, TOOL_CALL_START)
                    self._content(self._held[: len(self._held) - keep], out)
                    self._held = self._held[len(self._held) - keep :]
                    return out
                self._content(self._held[:start], out)
                self._held = self._held[start:]
                self._in_block = True
            searched = 0

    def finish(self) -> list[str | ToolCallDelta]:
        """What is left to send once the output has ended: a held-back tag start or an unclosed block."""
        out: list[str | ToolCallDelta] = []
        if self._in_block:
            self._close_block(len(self._held), out)
        else:
            self._content(self._held, out)
            self._held = ""
        return out

    def _close_block(self, end: int, out: list[str | ToolCallDelta]) -> None:
        """Sends the block held up to end (its closing tag, if any, right after) as a call or as content."""
        block_end = min(len(self._held), end + len(TOOL_CALL_END))
        call = _call_from_block(self._held[len(TOOL_CALL_START) : end])
        if call is None:
            self._content(self._held[:block_end], out)
        else:
            out.append(ToolCallDelta(self._next_index, "", id=call.id, name=call.name))
            out.append(ToolCallDelta(self._next_index, call.arguments))
            self._next_index += 1
        self._held = self._held[block_end:]
        self._in_block = False

    def _content(self, text: str, out: list[str | ToolCallDelta]) -> None:
        if not text:
            return
        if not self._content_started:
            if not text.strip():
                self._blank += text
                return
            text, self._blank, self._content_started = self._blank + text, "", True
        if out and isinstance(out[-1], str):
            out[-1] += text
        else:
            out.append(text)


def _tool_function(tool: Mapping[str, Any]) -> Mapping[str, Any]:
    function = tool.get("function")
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError("each tool needs a function with a name")
    return function


def required_tools_schema(tools: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """JSON Schema for `tool_choice: "required"`: a non-empty array of {"name", "parameters"} calls.

    tools is OpenAI's `tools` list (ValueError if a tool has no function name); a function without
    parameters takes any object.
    """
    choices = []
    for tool in tools:
        function = _tool_function(tool)
        choices.append(
            {
                "type": "object",
                "properties": {
                    "name": {"type": "string", "const": function["name"]},
                    "parameters": function.get("parameters") or {"type": "object"},
                },
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    return {"type": "array", "minItems": 1, "items": {"anyOf": choices}}


def parse_required_tool_calls(text: str) -> tuple[str | None, list[ParsedToolCall]]:
    """The calls in output constrained by `required_tools_schema`; the text as content if it does not parse.

    Constrained output fails to parse only when it was cut short (finish reason "length").
    """
    try:
        items = _loads(text)
    except ValueError:
        return text or None, []
    if not isinstance(items, list) or not items:
        return text or None, []
    calls = []
    for item in items:
        arguments = item.get("parameters", {}) if isinstance(item, dict) else None
        if not isinstance(arguments, dict) or not isinstance(item.get("name"), str) or not item["name"]:
            return text or None, []
        calls.append(ParsedToolCall(new_call_id(), item["name"], _dumps(arguments)))
    return None, calls


def parse_named_tool_call(text: str, name: str) -> tuple[str | None, list[ParsedToolCall]]:
    """The call of function name whose arguments object is text (output constrained by its parameters)."""
    try:
        arguments = _loads(text)
    except ValueError:
        return text or None, []
    if not isinstance(arguments, dict):
        return text or None, []
    return None, [ParsedToolCall(new_call_id(), name, _dumps(arguments))]
