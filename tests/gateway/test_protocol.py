"""The OpenAI schema: what is accepted, what is refused by name, and how chunks are framed."""

import json

import pytest
from pydantic import ValidationError

from gateway.errors import from_validation_error
from gateway.protocol import (
    SSE_DONE,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    CompletionRequest,
    DeltaMessage,
    sse_event,
)


def chat(**fields: object) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def completion(**fields: object) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def test_accepts_every_supported_sampling_field() -> None:
    req = chat(
        max_tokens=5,
        max_completion_tokens=7,
        temperature=0.5,
        top_p=0.9,
        top_k=20,
        min_p=0.05,
        n=2,
        stop=["\n", "END"],
        seed=3,
        presence_penalty=0.1,
        frequency_penalty=-0.1,
        repetition_penalty=1.1,
        logprobs=True,
        top_logprobs=3,
        stream=True,
        stream_options={"include_usage": True},
        ignore_eos=True,
        user="u1",
    )
    assert req.max_new_tokens() == 7  # max_completion_tokens wins
    assert req.include_usage and req.stop_list() == ["\n", "END"]
    assert req.first_unsupported_field() is None


def test_message_content_parts_and_developer_role() -> None:
    req = chat(
        messages=[{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    )
    assert req.messages[0].text() == "ab" and req.messages[0].template_role() == "system"


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"temperature": -1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"top_k": -2}, "top_k"),
        ({"stop": ["ok", ""]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages.0.content"),
        ({"model": 3}, "model"),
    ],
)
def test_bad_values_name_their_field(fields: dict, param: str) -> None:
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    error = from_validation_error(info.value)
    assert error.status == 400
    assert error.param is not None and error.param.startswith(param)
    assert param.split(".")[0] in error.message


def test_echoed_assistant_messages_pass_but_message_features_do_not() -> None:
    echoed = {"role": "assistant", "content": "hi", "refusal": None, "tool_calls": [], "annotations": []}
    assert chat(messages=[echoed, {"role": "user", "content": "more"}]).messages[0].text() == "hi"
    with pytest.raises(ValidationError, match="audio"):
        chat(messages=[{"role": "user", "content": "x", "audio": {"id": "a1"}}])


def test_stream_options_need_stream() -> None:
    with pytest.raises(ValidationError):
        chat(stream_options={"include_usage": True})


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"functions": [{"name": "f"}]}, "functions"),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
        ({"modalities": ["text", "audio"]}, "modalities"),
        ({"made_up_field": 1}, "made_up_field"),
        ({"store": True}, "store"),
    ],
)
def test_unsupported_fields_are_named(fields: dict, name: str) -> None:
    field, message = chat(**fields).first_unsupported_field()  # type: ignore[misc]
    assert field == name and name in message


def test_harmless_values_of_unsupported_fields_pass() -> None:
    req = chat(functions=[], function_call="none", audio=None, modalities=["text"], metadata={"a": "b"})
    assert req.first_unsupported_field() is None
    assert completion(best_of=1, suffix=None).first_unsupported_field() is None
    assert completion(best_of=2).first_unsupported_field()[0] == "best_of"  # type: ignore[index]
    assert completion(suffix="x").first_unsupported_field()[0] == "suffix"  # type: ignore[index]


def test_completion_prompt_shapes() -> None:
    assert completion(prompt="a").prompts() == ["a"]
    assert completion(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert completion(prompt=[1, 2, 3]).prompts() == [[1, 2, 3]]
    assert completion(prompt=[[1, 2], [3]]).prompts() == [[1, 2], [3]]
    assert completion().max_new_tokens() == 16  # OpenAI's default for completions
    for bad in ([], [[]], [-1], "", ["a", ""]):
        with pytest.raises(ValidationError):
            completion(prompt=bad)


def test_sse_framing_matches_openai() -> None:
    first = ChatCompletionChunk(
        id="x",
        created=1,
        model="m",
        choices=[ChatChunkChoice(index=0, delta=DeltaMessage(role="assistant", content=""))],
    )
    event = sse_event(first, include_usage=False)
    assert event.startswith("data: ") and event.endswith("\n\n")
    body = json.loads(event[len("data: ") :])
    assert body["object"] == "chat.completion.chunk"
    assert body["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": ""},
        "logprobs": None,
        "finish_reason": None,
    }
    assert "usage" not in body
    with_usage = json.loads(sse_event(first, include_usage=True)[len("data: ") :])
    assert with_usage["usage"] is None  # OpenAI sends "usage": null on every chunk when usage was asked for
    last = ChatCompletionChunk(
        id="x", created=1, model="m", choices=[ChatChunkChoice(index=0, delta=DeltaMessage(), finish_reason="stop")]
    )
    assert json.loads(sse_event(last, False)[6:])["choices"][0]["delta"] == {}
    assert SSE_DONE == "data: [DONE]\n\n"
