"""Issue 11's OpenAI surface through a real gateway and workers: structured output, tools, reasoning, echo, logit_bias.

The tiny Qwen3 has random weights, so where a test needs a particular output it fixes it with a
constraint (vLLM's structured_outputs regex): the model then writes exactly that text, and the
gateway's parsing is what is under test.
"""

import json
import re

import httpx
import openai
import pytest
from gateway_harness import API_KEY, GatewayServer

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
CITY_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
        "where": {
            "type": "object",
            "properties": {"lat": {"type": "number"}, "indoor": {"type": "boolean"}},
            "required": ["indoor"],
            "additionalProperties": False,
        },
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["city", "days", "where"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 5}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


def check_city(value: dict) -> None:
    """CITY_SCHEMA's rules, by hand."""
    assert set(value) <= {"city", "days", "tags", "where", "note"} and {"city", "days", "where"} <= set(value)
    assert value["city"] in ("Paris", "Tokyo", "Lima")
    assert isinstance(value["days"], int) and 1 <= value["days"] <= 9
    assert all(isinstance(t, str) and len(t) <= 6 for t in value.get("tags", [])) and len(value.get("tags", [])) <= 3
    assert isinstance(value["where"]["indoor"], bool) and set(value["where"]) <= {"lat", "indoor"}
    assert len(value.get("note", "")) <= 8


def forced(text: str) -> dict:
    """extra_body making the model write exactly `text`."""
    return {"structured_outputs": {"regex": re.escape(text)}}


def stream_chat(client: openai.OpenAI, **kwargs: object) -> tuple[str, str, list, str]:
    """A streamed chat's content, reasoning, tool-call deltas and finish reason."""
    content, reasoning, calls, finish = [], [], [], None
    for chunk in client.chat.completions.create(stream=True, **kwargs):  # type: ignore[call-overload]
        choice = chunk.choices[0]
        delta = choice.delta
        content.append(delta.content or "")
        reasoning.append(getattr(delta, "reasoning_content", None) or "")
        calls.extend(delta.tool_calls or [])
        finish = choice.finish_reason or finish
    return "".join(content), "".join(reasoning), calls, finish  # type: ignore[return-value]


def merge_call_deltas(deltas: list) -> list[dict]:
    calls: dict[int, dict] = {}
    for d in deltas:
        call = calls.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
        call["id"] = d.id or call["id"]
        call["name"] = (d.function.name if d.function else None) or call["name"]
        call["arguments"] += (d.function.arguments if d.function else "") or ""
    return [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_json_schema_output_parses_and_validates(client: openai.OpenAI, model_name: str, temperature: float) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "trip", "schema": CITY_SCHEMA, "strict": True}}
    messages = [{"role": "user", "content": "Plan a trip."}]
    whole = client.chat.completions.create(
        model=model_name, messages=messages, response_format=fmt, max_tokens=200, temperature=temperature, seed=3, n=3
    )
    for choice in whole.choices:
        assert choice.finish_reason == "stop"
        check_city(json.loads(choice.message.content))
    streamed, _, _, finish = stream_chat(
        client,
        model=model_name,
        messages=messages,
        response_format=fmt,
        max_tokens=200,
        temperature=temperature,
        seed=3,
    )
    assert finish == "stop"
    check_city(json.loads(streamed))
    if temperature == 0.0:
        assert streamed == whole.choices[0].message.content
    text = client.completions.create(
        model=model_name, prompt="Trip:", max_tokens=200, temperature=temperature, extra_body={"response_format": fmt}
    )
    check_city(json.loads(text.choices[0].text))


def test_json_object_and_vllm_structured_outputs(client: openai.OpenAI, model_name: str) -> None:
    out = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_object"},
        max_tokens=300,
        temperature=0,
    )
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content), dict)
    choice = client.completions.create(
        model=model_name, prompt="Pick:", max_tokens=10, extra_body={"structured_outputs": {"choice": ["yes", "no"]}}
    )
    assert choice.choices[0].text in ("yes", "no")
    digits = client.completions.create(
        model=model_name, prompt="N:", max_tokens=10, extra_body={"structured_outputs": {"regex": "[0-9]{3}"}}
    )
    assert re.fullmatch("[0-9]{3}", digits.choices[0].text)


def test_an_invalid_schema_is_a_400_naming_it(client: openai.OpenAI, model_name: str) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": {"type": 5}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "x"}], response_format=bad
        )
    assert info.value.param == "response_format"
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="x", extra_body={"structured_outputs": {"regex": "(("}})
    assert info.value.param == "structured_outputs"
    assert client.completions.create(model=model_name, prompt="x", max_tokens=2).choices[0].text is not None


def test_auto_tool_calls_are_parsed_streamed_and_not(client: openai.OpenAI, model_name: str) -> None:
    output = (
        'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    )
    args = dict(
        model=model_name,
        messages=[{"role": "user", "content": "Weather and time in Paris?"}],
        tools=[WEATHER_TOOL, TIME_TOOL],
        max_tokens=200,
        extra_body=forced(output),
    )
    whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
    choice = whole.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert calls == [("get_weather", {"city": "Paris", "unit": "C"}), ("get_time", {"zone": "CET"})]
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    content, _, deltas, finish = stream_chat(client, **args)
    assert content == "Let me check." and finish == "tool_calls"
    merged = merge_call_deltas(deltas)
    assert [(c["name"], c["arguments"]) for c in merged] == [
        (c.function.name, c.function.arguments) for c in choice.message.tool_calls
    ]
    assert all(c["id"] for c in merged)
    # The conversation goes on with the calls and their results, as OpenAI clients send them back.
    follow = client.chat.completions.create(
        model=model_name,
        messages=[
            {"role": "user", "content": "Weather and time in Paris?"},
            choice.message.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": choice.message.tool_calls[0].id, "content": "18 C, sunny"},
            {"role": "tool", "tool_call_id": choice.message.tool_calls[1].id, "content": "14:05"},
        ],
        tools=[WEATHER_TOOL, TIME_TOOL],
        max_tokens=3,
    )
    assert follow.choices[0].finish_reason == "length"


def test_tool_choice_none_ignores_tools(client: openai.OpenAI, model_name: str) -> None:
    output = '<tool_call>\n{"name": "get_weather", "arguments": {}}\n</tool_call>'
    out = client.chat.completions.create(
        model=model_name,
        messages=[{"role": "user", "content": "x"}],
        tools=[WEATHER_TOOL],
        tool_choice="none",
        max_tokens=100,
        extra_body=forced(output),
    )
    assert out.choices[0].message.content == output and not out.choices[0].message.tool_calls
    assert out.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_required_and_named_tool_choices_give_valid_arguments(
    client: openai.OpenAI, model_name: str, temperature: float
) -> None:
    messages = [{"role": "user", "content": "Weather?"}]
    named = {"type": "function", "function": {"name": "get_weather"}}
    for tool_choice in ("required", named):
        args = dict(
            model=model_name,
            messages=messages,
            tools=[WEATHER_TOOL, TIME_TOOL],
            tool_choice=tool_choice,
            max_tokens=120,
            temperature=temperature,
            seed=5,
            parallel_tool_calls=False,  # a random model may otherwise list calls until max_tokens
        )
        whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
        calls = whole.choices[0].message.tool_calls
        assert calls, whole
        for call in calls:
            arguments = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                assert arguments["city"] in ("Paris", "Tokyo") and arguments["unit"] in ("C", "F")
            else:
                assert call.function.name == "get_time" and len(arguments["zone"]) <= 5
        assert len(calls) == 1
        if tool_choice == named:
            assert [c.function.name for c in calls] == ["get_weather"]
        assert whole.choices[0].finish_reason == ("tool_calls" if tool_choice == "required" else "stop")
        _, _, deltas, _ = stream_chat(client, **args)
        merged = merge_call_deltas(deltas)
        assert [c["name"] for c in merged] == [c.function.name for c in calls]
        if temperature == 0.0:
            assert [c["arguments"] for c in merged] == [c.function.arguments for c in calls]


def test_qwen3_think_block_is_reasoning_content(client: openai.OpenAI, model_name: str) -> None:
    args = dict(
        model=model_name,
        messages=[{"role": "user", "content": "2+2?"}],
        max_tokens=100,
        extra_body=forced("<think>\nTwo and two make four.\n</think>\n\nIt is 4."),
    )
    message = client.chat.completions.create(**args).choices[0].message  # type: ignore[call-overload]
    assert message.content == "It is 4."
    assert message.reasoning_content == "Two and two make four."  # type: ignore[attr-defined]
    content, reasoning, _, finish = stream_chat(client, **args)
    assert (content, reasoning, finish) == ("It is 4.", "Two and two make four.", "stop")


def test_echo_returns_the_prompt_and_its_logprobs(client: openai.OpenAI, model_name: str) -> None:
    plain = client.completions.create(model=model_name, prompt="Once upon", max_tokens=4, temperature=0)
    echoed = client.completions.create(model=model_name, prompt="Once upon", max_tokens=4, temperature=0, echo=True)
    assert echoed.choices[0].text == "Once upon" + plain.choices[0].text
    ids = client.completions.create(model=model_name, prompt=[5, 6, 7], max_tokens=3, temperature=0)
    ids_echoed = client.completions.create(model=model_name, prompt=[5, 6, 7], max_tokens=3, temperature=0, echo=True)
    assert ids_echoed.choices[0].text.endswith(ids.choices[0].text)
    assert len(ids_echoed.choices[0].text) > len(ids.choices[0].text)
    with_lps = client.completions.create(
        model=model_name, prompt="Once upon", max_tokens=4, temperature=0, echo=True, logprobs=2
    )
    lps = with_lps.choices[0].logprobs
    assert with_lps.choices[0].text == echoed.choices[0].text
    assert "".join(lps.tokens) == with_lps.choices[0].text
    assert lps.token_logprobs[0] is None and lps.top_logprobs[0] is None
    assert all(lp <= 0 for lp in lps.token_logprobs[1:])
    assert lps.text_offset == [sum(len(t) for t in lps.tokens[:i]) for i in range(len(lps.tokens))]
    streamed = client.completions.create(
        model=model_name, prompt="Once upon", max_tokens=4, temperature=0, echo=True, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == echoed.choices[0].text


def test_logit_bias_steers_and_bans(client: openai.OpenAI, model_name: str) -> None:
    favourite = 42
    out = client.completions.create(
        model=model_name,
        prompt=[5, 6],
        max_tokens=5,
        temperature=1.0,
        logit_bias={str(favourite): 100},
        seed=1,
        logprobs=0,
    )
    assert all(lp == out.choices[0].logprobs.tokens[0] for lp in out.choices[0].logprobs.tokens)
    free = client.completions.create(model=model_name, prompt=[5, 6], max_tokens=1, temperature=0, logprobs=0)
    first = free.choices[0].logprobs.tokens[0]
    banned_token = client.completions.create(model=model_name, prompt=[5, 6], max_tokens=1, temperature=0, echo=True)
    assert banned_token.choices[0].text.endswith(first)


def test_models_retrieve_and_max_completion_tokens(
    client: openai.OpenAI, gateway: GatewayServer, model_name: str
) -> None:
    card = client.models.retrieve(model_name)
    assert card.id == model_name and card.object == "model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    out = client.completions.create(model=model_name, prompt="x", extra_body={"max_completion_tokens": 3})
    assert out.usage.completion_tokens == 3 and out.choices[0].finish_reason == "length"
    body = {"model": model_name, "prompt": "x", "stream": "yes"}
    assert httpx.post(gateway.url + "/v1/completions", json=body, headers=HEADERS).status_code == 400
