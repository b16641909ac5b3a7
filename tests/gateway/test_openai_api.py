"""The OpenAI API through the official `openai` SDK: a real gateway in front of two real workers."""

import asyncio
import json
import time

import httpx
import openai
import pytest
from gateway_harness import API_KEY, GatewayServer, WorkerProcess

from worker.client import WorkerClient

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count to five."}]
PROMPT = "The quick brown fox"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


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


def test_logprobs(client: openai.OpenAI, model_name: str, workers: list[WorkerProcess]) -> None:
    """The gateway relays the worker's own logprobs: the same tokens and values as a direct Generate call."""
    sampling = {"max_tokens": 4, "temperature": 0, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    with WorkerClient(workers[0].target, timeout=60) as worker:
        direct_chat = worker.generate(messages=MESSAGES, **sampling).choices[0].logprobs
        direct_text = worker.generate(PROMPT, add_special_tokens=True, **sampling).choices[0].logprobs
    assert len(direct_chat) == 4 and len(direct_text) == 4

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
    assert content is not None
    assert [t.token for t in content] == [lp.token for lp in direct_chat]
    assert [t.logprob for t in content] == pytest.approx([lp.logprob for lp in direct_chat], abs=1e-6)
    for relayed, own in zip(content, direct_chat, strict=True):
        assert relayed.bytes == list(own.token.encode("utf-8"))
        assert [t.token for t in relayed.top_logprobs] == [t.token for t in own.top_logprobs]
        assert [t.logprob for t in relayed.top_logprobs] == pytest.approx(
            [t.logprob for t in own.top_logprobs], abs=1e-6
        )

    legacy = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    relayed_text = legacy.choices[0].logprobs
    assert relayed_text is not None
    assert relayed_text.tokens == [t.token for t in direct_text]
    assert relayed_text.token_logprobs == pytest.approx([t.logprob for t in direct_text], abs=1e-6)
    assert relayed_text.top_logprobs == [
        pytest.approx({top.token: top.logprob for top in t.top_logprobs}, abs=1e-6) for t in direct_text
    ]
    assert relayed_text.text_offset == [sum(len(t.token) for t in direct_text[:i]) for i in range(4)]


def test_token_id_prompt(client: openai.OpenAI, model_name: str) -> None:
    reply = client.completions.create(
        model=model_name, prompt=[1, 2, 3, 4], max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert reply.usage.prompt_tokens == 4 and reply.usage.completion_tokens == 3  # type: ignore[union-attr]


def counter_deltas(before: Samples, after: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """How far each labelled sample of `name` moved (samples that did not move are left out)."""
    moved = {labels: value - before.get((n, labels), 0.0) for (n, labels), value in after.items() if n == name}
    return {labels: change for labels, change in moved.items() if change}


def test_health_and_metrics(gateway: GatewayServer, workers: list[WorkerProcess], model_name: str) -> None:
    client = gateway.client()
    before = gateway.metrics()
    whole = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=3, temperature=0, extra_body={"ignore_eos": True}
    )
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
    health = httpx.get(gateway.url + "/health")
    assert health.status_code == 200 and health.json()["healthy_workers"] == 2
    usages = [u for u in (whole.usage, chunks[-1].usage) if u is not None]
    assert [u.completion_tokens for u in usages] == [3, 5]

    # requests_total moves last, once a response is sent (after the request's other metrics), and may
    # trail the client a little: wait until all three requests are counted, then check every metric
    answered = [
        (("endpoint", path), ("status", "200")) for path in ("/v1/completions", "/v1/chat/completions", "/health")
    ]
    deadline = time.monotonic() + 10
    while True:
        after = gateway.metrics()
        requests = counter_deltas(before, after, "sfllm_gateway:requests_total")
        if all(labels in requests for labels in answered):
            break
        assert time.monotonic() < deadline, f"the requests were never all counted: {requests}"
        time.sleep(0.05)
    assert [requests[labels] for labels in answered] == [1, 1, 1]
    assert counter_deltas(before, after, "sfllm_gateway:prompt_tokens_total") == {
        (): sum(u.prompt_tokens for u in usages)
    }
    assert counter_deltas(before, after, "sfllm_gateway:generation_tokens_total") == {(): 3 + 5}
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        observed = counter_deltas(before, after, f"sfllm_gateway:{histogram}_count")
        assert observed == {(("endpoint", "completions"),): 1, (("endpoint", "chat"),): 1}, histogram
    for worker in workers:
        assert after[("sfllm_gateway:worker_healthy", (("worker", worker.target),))] == 1
        assert after[("sfllm_gateway:worker_requests_in_flight", (("worker", worker.target),))] == 0
    assert after[("sfllm_gateway:num_requests_running", ())] == 0
    assert counter_deltas(before, after, "sfllm_gateway:worker_ejections_total") == {}


def test_async_client(client: openai.OpenAI, gateway: GatewayServer, model_name: str) -> None:
    """The async SDK, streamed or not, gets the same greedy text as the sync SDK."""
    args = {
        "model": model_name,
        "prompt": PROMPT,
        "max_tokens": 4,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    expected = client.completions.create(**args).choices[0].text  # type: ignore[call-overload]
    assert expected

    async def main() -> tuple[str, str]:
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0) as aclient:
            reply = await aclient.completions.create(**args)  # type: ignore[call-overload]
            text = ""
            async for chunk in await aclient.completions.create(stream=True, **args):  # type: ignore[call-overload]
                text += chunk.choices[0].text
            return reply.choices[0].text, text

    whole, streamed = asyncio.run(main())
    assert whole == expected
    assert streamed == expected
