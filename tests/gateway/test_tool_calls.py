"""Qwen3 (Hermes-style) tool calls out of generated text, whole and streamed, and constrained tool choices."""

import json
import random
import re

import pytest

from gateway.tool_calls import (
    ParsedToolCall,
    ToolCallDelta,
    ToolCallStream,
    parse_named_tool_call,
    parse_required_tool_calls,
    parse_tool_calls,
    required_tools_schema,
)

WEATHER = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
TIME = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "Europe/Paris", "format": {"h24": true}}}\n</tool_call>'


def _named(calls: list[ParsedToolCall]) -> list[tuple[str, str]]:
    return [(call.name, call.arguments) for call in calls]


def test_a_tool_call_block_is_a_call_with_compact_arguments():
    content, calls = parse_tool_calls(WEATHER)
    assert content is None
    assert _named(calls) == [("get_weather", '{"city":"Paris"}')]
    assert re.fullmatch(r"call_[0-9a-f]{24}", calls[0].id)
    assert calls[0].to_openai() == {
        "id": calls[0].id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }


def test_content_before_between_and_after_calls_is_kept():
    content, calls = parse_tool_calls("Let me check both.\n" + WEATHER + "\n" + TIME + "\nOne moment.")
    assert content == "Let me check both.\n\n\nOne moment."
    assert _named(calls) == [
        ("get_weather", '{"city":"Paris"}'),
        ("get_time", '{"zone":"Europe/Paris","format":{"h24":true}}'),
    ]
    assert calls[0].id != calls[1].id


def test_whitespace_around_calls_is_no_content():
    assert parse_tool_calls("\n\n" + WEATHER + "\n" + TIME + "\n")[0] is None


def test_text_without_calls_is_all_content():
    assert parse_tool_calls("Paris is sunny.") == ("Paris is sunny.", [])
    assert parse_tool_calls("a < b and <tool> is not a tag") == ("a < b and <tool> is not a tag", [])
    assert parse_tool_calls("") == (None, [])


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>\n{not json}\n</tool_call>",
        '<tool_call>\n{"arguments": {"city": "Paris"}}\n</tool_call>',  # no name
        '<tool_call>\n{"name": "", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": 3, "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": "{\\"city\\": 1}"}\n</tool_call>',  # arguments not an object
        '<tool_call>\n["get_weather"]\n</tool_call>',
        '<tool_call>\n{"name": "f", "arguments": {"x": NaN}}\n</tool_call>',  # not JSON, though Python reads it
        '<tool_call>\n{"name": "f", "arguments": {}} trailing\n</tool_call>',
        "<tool_call></tool_call>",
    ],
)
def test_a_malformed_block_stays_in_the_content(block):
    content, calls = parse_tool_calls("Before. " + block + " " + WEATHER)
    assert content == "Before. " + block + " "
    assert _named(calls) == [("get_weather", '{"city":"Paris"}')]


def test_arguments_keep_non_ascii_and_default_to_an_empty_object():
    _, calls = parse_tool_calls('<tool_call>{"name": "greet", "arguments": {"name": "Zoë 🙂", "n": 1e2}}</tool_call>')
    assert _named(calls) == [("greet", '{"name":"Zoë 🙂","n":100.0}')]
    _, calls = parse_tool_calls('<tool_call>{"name": "ping"}</tool_call>')
    assert _named(calls) == [("ping", "{}")]


def test_an_unclosed_last_block_counts_when_its_json_is_complete():
    content, calls = parse_tool_calls('Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n')
    assert content == "Sure.\n"
    assert _named(calls) == [("get_weather", '{"city":"Paris"}')]
    cut = 'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"ci'
    assert parse_tool_calls(cut) == (cut, [])


SAMPLES = [
    WEATHER,
    "Let me check both.\n" + WEATHER + "\n" + TIME + "\nOne moment.",
    "\n\n" + WEATHER + "\n" + TIME + "\n",
    "Before. <tool_call>\n{not json}\n</tool_call> " + WEATHER,
    'x<tool_call>{"name": "f", "arguments": {}} trailing</tool_call>y',
    "<tool_call><tool_call>" + WEATHER[len("<tool_call>") :],
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n',
    'Sure.\n<tool_call>\n{"name": "get_weather", "arguments": {"ci',
    "a < b, <tool_c and </tool_call> are text",
    "ends with a partial tag <tool_ca",
    '<tool_call>{"name": "greet", "arguments": {"name": "Zoë 🙂 </tool", "tag": "<tool_call>"}}</tool_call>',
    "<tool_call></tool_call>",
    "   ",
    "",
]


def _stream(chunks: list[str]) -> tuple[str | None, list[tuple[str, str]], list[ToolCallDelta]]:
    stream = ToolCallStream()
    items = [item for chunk in chunks for item in stream.feed(chunk)] + stream.finish()
    content = "".join(item for item in items if isinstance(item, str))
    deltas = [item for item in items if isinstance(item, ToolCallDelta)]
    calls: dict[int, list[str]] = {}
    for delta in deltas:
        if delta.id is not None:  # a call's first delta
            assert delta.index == len(calls) and delta.arguments == ""
            calls[delta.index] = [delta.name, ""]
        calls[delta.index][1] += delta.arguments
    return content or None, [(name, arguments) for name, arguments in calls.values()], deltas


def _chunkings(text: str, seed: int) -> list[list[str]]:
    """Every way to cut text once, one character at a time, and random cuts."""
    ways = [[text[:i], text[i:]] for i in range(len(text) + 1)]
    ways.append(list(text))
    rng = random.Random(seed)
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        ways.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return ways


@pytest.mark.parametrize("text", SAMPLES)
def test_streaming_any_chunking_gives_the_whole_text_parse(text):
    content, calls = parse_tool_calls(text)
    for chunks in _chunkings(text, seed=len(text)):
        assert _stream(chunks)[:2] == (content, _named(calls)), chunks


def test_streamed_deltas_are_openai_shaped():
    stream = ToolCallStream()
    items = stream.feed("Checking.\n" + WEATHER[:20]) + stream.feed(WEATHER[20:] + TIME) + stream.finish()
    assert items[0] == "Checking.\n"
    first, arguments = items[1], items[2]
    assert first.to_openai() == {
        "index": 0,
        "id": first.id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    assert arguments.to_openai() == {"index": 0, "function": {"arguments": '{"city":"Paris"}'}}
    assert [item.to_openai()["index"] for item in items[3:]] == [1, 1]
    assert items[3].id != first.id


def test_content_is_never_a_piece_of_a_tag():
    stream = ToolCallStream()
    assert stream.feed("Hi <tool") == ["Hi "]  # "<tool" may begin <tool_call>
    assert stream.feed("box> ") == ["<toolbox> "]
    assert stream.feed("<tool_call>{") == []  # inside a block until it closes
    assert stream.finish() == ["<tool_call>{"]  # never closed, not a call: content


def test_leading_whitespace_waits_for_real_content():
    stream = ToolCallStream()
    assert stream.feed("\n\n") == []
    assert stream.feed("Done.") == ["\n\nDone."]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    },
    {"type": "function", "function": {"name": "ping"}},
]


def test_required_tools_schema_is_an_array_of_one_of_the_tools_calls():
    schema = required_tools_schema(TOOLS)
    assert schema["type"] == "array" and schema["minItems"] == 1
    weather, ping = schema["items"]["anyOf"]
    assert weather["properties"]["name"] == {"type": "string", "const": "get_weather"}
    assert weather["properties"]["parameters"] == TOOLS[0]["function"]["parameters"]
    assert weather["required"] == ["name", "parameters"]
    assert ping["properties"]["parameters"] == {"type": "object"}
    json.dumps(schema)  # goes to the worker as JSON text
    with pytest.raises(ValueError):
        required_tools_schema([{"type": "function"}])


def test_required_output_becomes_calls():
    text = '[{"name": "get_weather", "parameters": {"city": "Paris"}}, {"name": "ping", "parameters": {}}]'
    content, calls = parse_required_tool_calls(text)
    assert content is None
    assert _named(calls) == [("get_weather", '{"city":"Paris"}'), ("ping", "{}")]
    cut = '[{"name": "get_weather", "parameters": {"ci'  # stopped by max_tokens
    assert parse_required_tool_calls(cut) == (cut, [])
    assert parse_required_tool_calls("[]") == ("[]", [])
    assert parse_required_tool_calls('[{"parameters": {}}]') == ('[{"parameters": {}}]', [])


def test_named_function_output_becomes_its_call():
    content, calls = parse_named_tool_call('{ "city" : "Paris" }', "get_weather")
    assert content is None
    assert _named(calls) == [("get_weather", '{"city":"Paris"}')]
    assert parse_named_tool_call('{"city": "Pa', "get_weather") == ('{"city": "Pa', [])
    assert parse_named_tool_call("[1]", "get_weather") == ("[1]", [])
