"""The OpenAI API through the official `openai` SDK: a real gateway in front of two real workers."""

import json

import httpx
import openai
import pytest
from gateway_harness import API_KEY, GatewayServer

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to five."}]
PROMPT = "The quick brown fox"


def test_models_list(client: openai.OpenAI, model_name: str) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [model_name]
    assert models.data[0].object == "model"


def test_chat_completion(client: openai.OpenAI, model_name: str) -> None:
    reply = client.chat.completions.create(model=model_name, messages=MESSAGES, max_tokens=8, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_completion(client: openai.OpenAI, model_name: str) -> None:
    reply = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=6, temperature=0, extra_body={"ignore_eos": True}
    )
    assert reply.object == "text_completion"
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6  # type: ignore[union-attr]


def _stream_chat(client: openai.OpenAI, **kwargs: object) -> tuple[dict[int, str], dict[int, str], list]:
    texts: dict[int, str] = {}
    finishes: dict[int, str] = {}
    chunks = list(client.chat.completions.create(stream=True, **kwargs))  # type: ignore[call-overload]
    for chunk in chunks:
        for choice in chunk.choices:
            assert choice.index not in finishes, "nothing may follow a choice's finish_reason"
            texts[choice.index] = texts.get(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
    return texts, finishes, chunks


def test_streamed_chat_equals_non_streamed_at_temperature_zero(client: openai.OpenAI, model_name: str) -> None:
    args = {"model": model_name, "messages": MESSAGES, "max_tokens": 24, "temperature": 0}
    whole = client.chat.completions.create(**args)  # type: ignore[call-overload]
    texts, finishes, chunks = _stream_chat(client, **args)
    assert texts[0] == whole.choices[0].message.content
    assert finishes[0] == whole.choices[0].finish_reason
    assert chunks[0].choices[0].delta.role == "assistant"  # the role comes in the first delta only
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert len({c.id for c in chunks}) == 1


def test_streamed_completion_equals_non_streamed(client: openai.OpenAI, model_name: str) -> None:
    args = {"model": model_name, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
    whole = client.completions.create(**args)  # type: ignore[call-overload]
    chunks = list(client.completions.create(stream=True, **args))  # type: ignore[call-overload]
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks][-1] == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_n_choices(client: openai.OpenAI, model_name: str) -> None:
    reply = client.chat.completions.create(
        model=model_name, messages=MESSAGES, n=2, max_tokens=8, temperature=1.0, seed=7
    )
    assert [c.index for c in reply.choices] == [0, 1]
    texts, finishes, _ = _stream_chat(
        client, model=model_name, messages=MESSAGES, n=2, max_tokens=8, temperature=1.0, seed=7
    )
    assert set(finishes) == {0, 1}
    assert [texts[0], texts[1]] == [c.message.content for c in reply.choices]  # same seed, same samples
    completions = client.completions.create(model=model_name, prompt=["a b", "c d"], n=2, max_tokens=4)
    assert [c.index for c in completions.choices] == [0, 1, 2, 3]


def test_stop_string_cuts_the_output(client: openai.OpenAI, model_name: str) -> None:
    args = {
        "model": model_name,
        "prompt": PROMPT,
        "max_tokens": 24,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    full = client.completions.create(**args).choices[0].text  # type: ignore[call-overload]
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), f"the greedy output has no usable stop string: {full!r}"
    cut = client.completions.create(stop=[stop], **args).choices[0]  # type: ignore[call-overload]
    assert cut.text == full[: full.index(stop)]
    assert cut.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client: openai.OpenAI, model_name: str) -> None:
    args = {
        "model": model_name,
        "messages": MESSAGES,
        "max_tokens": 16,
        "temperature": 1.0,
        "extra_body": {"ignore_eos": True},
    }
    first = client.chat.completions.create(seed=1234, **args).choices[0].message.content  # type: ignore[call-overload]
    again = client.chat.completions.create(seed=1234, **args).choices[0].message.content  # type: ignore[call-overload]
    other = client.chat.completions.create(seed=4321, **args).choices[0].message.content  # type: ignore[call-overload]
    assert first == again
    assert first != other


def test_include_usage_sends_a_final_usage_chunk(client: openai.OpenAI, model_name: str) -> None:
    chunks = list(
        client.chat.completions.create(
            model=model_name,
            messages=MESSAGES,
            max_tokens=5,
            temperature=0,
            extra_body={"ignore_eos": True},
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None and last.usage.completion_tokens == 5
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format(gateway: GatewayServer, model_name: str) -> None:
    body = {
        "model": model_name,
        "prompt": PROMPT,
        "max_tokens": 3,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", gateway.url + "/v1/completions", json=body, headers=headers) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: ") :]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] >= 1
    assert all(p["usage"] is None for p in payloads[:-1])


def test_logprobs(client: openai.OpenAI, model_name: str) -> None:
    reply = client.chat.completions.create(
        model=model_name,
        messages=MESSAGES,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 4
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    legacy = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=3, logprobs=2, extra_body={"ignore_eos": True}
    )
    lp = legacy.choices[0].logprobs
    assert lp is not None and len(lp.tokens) == 3 and len(lp.top_logprobs) == 3  # type: ignore[arg-type]


def test_token_id_prompt(client: openai.OpenAI, model_name: str) -> None:
    reply = client.completions.create(
        model=model_name, prompt=[1, 2, 3, 4], max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert reply.usage.prompt_tokens == 4 and reply.usage.completion_tokens == 3  # type: ignore[union-attr]


def test_health_and_metrics(gateway: GatewayServer) -> None:
    health = httpx.get(gateway.url + "/health")
    assert health.status_code == 200 and health.json()["healthy_workers"] == 2
    samples = gateway.metrics()
    names = {name for name, _ in samples}
    for expected in (
        "sfllm_gateway:requests_total",
        "sfllm_gateway:time_to_first_token_seconds_bucket",
        "sfllm_gateway:e2e_request_latency_seconds_bucket",
        "sfllm_gateway:worker_requests_in_flight",
        "sfllm_gateway:worker_healthy",
    ):
        assert expected in names


@pytest.mark.parametrize("stream", [False, True])
def test_async_client(gateway: GatewayServer, model_name: str, stream: bool) -> None:
    import asyncio

    async def main() -> str:
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0) as client:
            if not stream:
                reply = await client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, temperature=0)
                return reply.choices[0].text
            text = ""
            async for chunk in await client.completions.create(
                model=model_name, prompt=PROMPT, max_tokens=4, temperature=0, stream=True
            ):
                text += chunk.choices[0].text
            return text

    assert isinstance(asyncio.run(main()), str)
