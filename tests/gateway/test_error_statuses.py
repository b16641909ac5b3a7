"""Every error status, provoked through the real gateway; each leaves the gateway serving."""

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from gateway_harness import API_KEY, GatewayServer, WorkerProcess, free_port, gateway_config

from worker.client import WorkerClient

HEADERS = {"Authorization": f"Bearer {API_KEY}"}


def assert_still_serving(gateway: GatewayServer, model: str) -> None:
    assert httpx.get(gateway.url + "/health").status_code == 200
    reply = gateway.client().completions.create(model=model, prompt="still there?", max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def error_body(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_400_invalid_value_names_the_field(client: openai.OpenAI, gateway: GatewayServer, model_name: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model_name, messages=[{"role": "user", "content": "x"}], temperature=-1)
    assert info.value.status_code == 400 and info.value.param == "temperature"
    assert "temperature" in info.value.message
    assert_still_serving(gateway, model_name)


def test_400_prompt_over_the_context(client: openai.OpenAI, gateway: GatewayServer, model_name: str) -> None:
    with WorkerClient(gateway.config.workers[0], timeout=5) as worker:
        context = worker.model_info().max_context_length
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="hello world " * context, max_tokens=4)
    assert f"maximum context length is {context} tokens" in info.value.message
    assert info.value.code == "context_length_exceeded"
    # streamed requests get the same status, not a 200 with an error inside
    with pytest.raises(openai.BadRequestError):
        list(client.completions.create(model=model_name, prompt="hello world " * context, stream=True))
    assert_still_serving(gateway, model_name)


def test_400_unsupported_openai_fields_are_named(
    client: openai.OpenAI, gateway: GatewayServer, model_name: str
) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": "x"}], modalities=["text", "audio"]
        )
    assert info.value.param == "modalities" and "modalities" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=model_name, prompt="x", suffix="y", max_tokens=2)
    assert info.value.param == "suffix"
    assert_still_serving(gateway, model_name)


def test_400_limits_are_the_workers_own(client: openai.OpenAI, gateway: GatewayServer, model_name: str) -> None:
    with WorkerClient(gateway.config.workers[0], timeout=5) as worker:
        info = worker.model_info()
    assert info.max_n >= 1 and info.max_stop_strings >= 1 and info.max_top_logprobs == 20
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model_name, prompt="x", max_tokens=1, n=info.max_n + 1)
    assert error.value.param == "n" and str(info.max_n) in error.value.message
    stops = [f"s{i}" for i in range(info.max_stop_strings + 1)]
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model_name, prompt="x", max_tokens=1, stop=stops)
    assert error.value.param == "stop"
    assert (
        len(client.completions.create(model=model_name, prompt="x", max_tokens=1, n=info.max_n).choices) == info.max_n
    )
    assert_still_serving(gateway, model_name)


def test_401_bad_or_missing_api_key(gateway: GatewayServer, model_name: str) -> None:
    with pytest.raises(openai.AuthenticationError) as info:
        gateway.client(api_key="wrong").models.list()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    response = httpx.post(gateway.url + "/v1/completions", json={"model": model_name, "prompt": "x"})
    assert response.status_code == 401 and error_body(response)["code"] == "invalid_api_key"
    assert_still_serving(gateway, model_name)


def test_404_unknown_model(client: openai.OpenAI, gateway: GatewayServer, model_name: str) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert info.value.code == "model_not_found" and "no-such-model" in info.value.message
    unknown_route = httpx.get(gateway.url + "/v1/nothing-here", headers=HEADERS)
    assert unknown_route.status_code == 404 and error_body(unknown_route)
    assert_still_serving(gateway, model_name)


def test_400_malformed_json_and_415_a_body_that_is_not_json(gateway: GatewayServer, model_name: str) -> None:
    for body in (b'{"model": "x", "prompt": ', b"\xff\xfe", b"[1, 2]", b""):
        response = httpx.post(gateway.url + "/v1/completions", content=body, headers=HEADERS)
        assert response.status_code == 400, body  # as OpenAI answers, not FastAPI's 422
        assert error_body(response)["code"] == "invalid_json"
    good = json.dumps({"model": model_name, "prompt": "x", "max_tokens": 1}).encode()
    for content_type in ("text/plain", "application/x-www-form-urlencoded"):
        response = httpx.post(
            gateway.url + "/v1/completions", content=good, headers={**HEADERS, "Content-Type": content_type}
        )
        assert response.status_code == 415 and content_type in error_body(response)["message"]
    charset = {**HEADERS, "Content-Type": "application/json; charset=utf-8"}
    assert httpx.post(gateway.url + "/v1/completions", content=good, headers=charset).status_code == 200
    assert_still_serving(gateway, model_name)


BAD_BODIES = [
    {"model": "m"},
    {"messages": [{"role": "user", "content": "x"}]},
    {"model": "m", "messages": "hello"},
    {"model": "m", "messages": [{"role": "user"}]},
    {"model": "m", "messages": [{"role": "user", "content": {"nested": True}}]},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": "two"},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2**40},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": 5},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 2**64},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes please"},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": True}},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 5},
    {"model": "m", "messages": [{"role": "user", "content": "\ud800"}]},
    {"model": "m", "messages": [{"role": "tool", "content": "x"}]},  # no tool_call_id
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"five": 10}},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1000}},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": "0.5"},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
    {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},  # no tools
]


@pytest.mark.parametrize("endpoint", ["/v1/chat/completions", "/v1/completions"])
def test_bad_input_is_never_a_500(gateway: GatewayServer, model_name: str, endpoint: str) -> None:
    bodies = BAD_BODIES + [
        {"model": model_name, "prompt": {"dict": 1}},
        {"model": model_name, "prompt": [[1, 2], "mixed"]},
        {"model": model_name, "prompt": [2**40]},
        {"model": model_name, "prompt": "x", "temperature": float("inf")},
        {"model": model_name, "prompt": "x", "echo": "yes"},
        {"model": model_name, "prompt": ""},
        {"model": model_name, "prompt": ["a", ""]},
        {"model": model_name, "prompt": "x", "n": 10_000},
        {"model": model_name, "prompt": [99_999_999], "max_tokens": 2},  # outside the vocabulary: the worker says 400
    ]
    for body in bodies:
        content = json.dumps(body).encode()  # escapes lone surrogates and writes Infinity, as some clients do
        response = httpx.post(gateway.url + endpoint, content=content, headers=HEADERS)
        assert response.status_code in (400, 404), (body, response.text)
        error_body(response)
    assert_still_serving(gateway, model_name)


def test_413_body_too_large(gateway: GatewayServer, model_name: str) -> None:
    huge = {"model": model_name, "prompt": "x" * (gateway.config.max_request_bytes + 1)}
    response = httpx.post(gateway.url + "/v1/completions", json=huge, headers=HEADERS)
    assert response.status_code == 413 and error_body(response)
    assert_still_serving(gateway, model_name)


@pytest.fixture(scope="module")
def small_worker(qwen3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker that runs one sequence and queues one more: easy to fill."""
    proc = WorkerProcess(
        qwen3_path, tmp_path_factory.mktemp("small-worker"), "small", "--max-num-seqs", "1", "--max-waiting", "1"
    )
    proc.start()
    proc.wait_serving()
    yield proc
    proc.stop()


def test_429_when_every_worker_queue_is_full(
    small_worker: WorkerProcess, gateway: GatewayServer, model_name: str
) -> None:
    busy = GatewayServer(gateway_config([small_worker.target])).start()
    busy.wait_healthy(1)
    client = busy.client()
    with WorkerClient(small_worker.target, timeout=5) as worker:
        context = worker.model_info().max_context_length
    long_request = {
        "model": model_name,
        "prompt": "busy",
        "max_tokens": context - 16,
        "extra_body": {"ignore_eos": True},
        "stream": True,
    }
    streams: list = []

    def hold() -> None:
        stream = client.completions.create(**long_request)  # type: ignore[call-overload]
        streams.append(stream)
        with contextlib.suppress(openai.APIError):  # closed from the test's thread
            for _ in stream:
                pass

    holders = [threading.Thread(target=hold, daemon=True) for _ in range(2)]
    try:
        with WorkerClient(small_worker.target, timeout=5) as worker:
            for holder in holders:  # one running, then one waiting
                holder.start()
                deadline = time.monotonic() + 20
                while True:
                    load = worker.load()
                    if load.num_requests_running + load.num_requests_waiting >= holders.index(holder) + 1:
                        break
                    assert time.monotonic() < deadline and holder.is_alive()
                    time.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=model_name, prompt="one more", max_tokens=2)
        assert info.value.status_code == 429
        assert int(info.value.response.headers["retry-after"]) >= 1
    finally:
        deadline = time.monotonic() + 10
        while len(streams) < len(holders) and time.monotonic() < deadline:
            time.sleep(0.05)
        for stream in streams:
            stream.close()  # disconnecting ends them on the worker too
        for holder in holders:
            if holder.ident is not None:
                holder.join(30)
    time.sleep(1.1)  # the worker's retry hint
    assert_still_serving(busy, model_name)
    busy.stop()
    assert_still_serving(gateway, model_name)


def test_503_when_no_worker_is_healthy(gateway: GatewayServer, model_name: str) -> None:
    lonely = GatewayServer(gateway_config([f"127.0.0.1:{free_port()}"], health_timeout_s=0.2)).start()
    try:
        health = httpx.get(lonely.url + "/health")
        assert health.status_code == 503 and error_body(health)["code"] == "no_healthy_worker"
        with pytest.raises(openai.InternalServerError) as info:
            lonely.client().completions.create(model=model_name, prompt="x", max_tokens=2)
        assert info.value.status_code == 503
    finally:
        lonely.stop()
    assert_still_serving(gateway, model_name)


def test_429_past_the_gateway_in_flight_bound(workers: list[WorkerProcess], model_name: str) -> None:
    bounded = GatewayServer(gateway_config([w.target for w in workers], max_in_flight=2)).start()
    bounded.wait_healthy(2)
    client = bounded.client()
    with WorkerClient(workers[0].target, timeout=5) as worker:
        context = worker.model_info().max_context_length
    long_request = {"model": model_name, "prompt": "hold", "max_tokens": context // 2, "stream": True}
    held = [client.completions.create(extra_body={"ignore_eos": True}, **long_request) for _ in range(2)]  # type: ignore[call-overload]
    try:
        with pytest.raises(openai.RateLimitError) as info:
            client.completions.create(model=model_name, prompt="third", max_tokens=2)
        assert "in-flight" in info.value.message and info.value.response.headers["retry-after"] == "1"
    finally:
        for stream in held:
            stream.close()
    deadline = time.monotonic() + 10
    while bounded.app.state.serving.in_flight:  # the closed streams release their slots
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert_still_serving(bounded, model_name)
    bounded.stop()
