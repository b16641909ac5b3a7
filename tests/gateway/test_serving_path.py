"""The serving path under pressure: multi-token events, oversized bodies, and clients that leave mid-prefill."""

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from gateway_harness import API_KEY, GatewayServer, WorkerProcess, worker_behind_gateway

from worker.client import WorkerClient

HEADERS = {"Authorization": f"Bearer {API_KEY}"}
PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def coalescing(qwen3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayServer]:
    """A gateway over a worker that sends five tokens per delta at least: every SSE event carries several."""
    with worker_behind_gateway(
        qwen3_path, tmp_path_factory.mktemp("coalescing"), "coalescing", "--stream-interval", "5"
    ) as (_, gateway):
        yield gateway


def _sse(gateway: GatewayServer, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", gateway.url + path, json={**body, "stream": True}, headers=HEADERS) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_multi_token_events_carry_the_text_and_logprobs_of_one_token_events(
    coalescing: GatewayServer, gateway: GatewayServer, model_name: str
) -> None:
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": 23, "temperature": 0, "logprobs": 2}
    body["ignore_eos"] = True
    events = _sse(coalescing, "/v1/completions", body)
    whole = httpx.post(gateway.url + "/v1/completions", json=body, headers=HEADERS).json()["choices"][0]
    texts = [e["choices"][0]["text"] for e in events if e["choices"][0]["text"]]
    assert "".join(texts) == whole["text"]
    assert len(texts) <= 6  # 23 tokens: the first at once, then five or more per event
    merged = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for event in events:
        lps = event["choices"][0]["logprobs"]
        if lps is not None:
            for key in merged:
                merged[key] += lps[key]
    assert merged == whole["logprobs"]  # offsets continue across events as in one piece
    assert events[-1]["choices"][0]["finish_reason"] == whole["finish_reason"] == "length"

    chat = {"model": model_name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 17}
    chat.update(temperature=0, logprobs=True, top_logprobs=1, ignore_eos=True)
    events = _sse(coalescing, "/v1/chat/completions", chat)
    whole = httpx.post(gateway.url + "/v1/chat/completions", json=chat, headers=HEADERS).json()["choices"][0]
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == whole["message"]["content"]
    content = [lp for e in events if e["choices"][0]["logprobs"] for lp in e["choices"][0]["logprobs"]["content"]]
    assert content == whole["logprobs"]["content"]


def test_a_body_over_the_workers_message_limit_is_413_and_leaves_the_worker_usable(
    qwen3_path: Path, tmp_path: Path, model_name: str
) -> None:
    with worker_behind_gateway(qwen3_path, tmp_path, "small-messages", "--max-message-bytes", str(1 << 20)) as (
        proc,
        gateway,
    ):
        huge = {"model": model_name, "prompt": "hello " * ((2 << 20) // 6), "max_tokens": 2}  # 2 MiB
        response = httpx.post(gateway.url + "/v1/completions", json=huge, headers=HEADERS)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "too_large"
        worker = gateway.app.state.router.workers[proc.target]
        assert worker.healthy and not worker.queue_full()  # the client's fault: the worker is not "busy"
        reply = gateway.client().completions.create(model=model_name, prompt="next", max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_5_mib_body_is_refused_quickly_and_the_next_request_is_served(
    gateway: GatewayServer, model_name: str
) -> None:
    huge = {"model": model_name, "prompt": "hello world " * ((5 << 20) // 12), "max_tokens": 2}
    response = httpx.post(gateway.url + "/v1/completions", json=huge, headers=HEADERS, timeout=60)
    assert response.status_code in (400, 413)
    assert "maximum context length" in response.json()["error"]["message"]
    reply = gateway.client().completions.create(model=model_name, prompt="next", max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


@pytest.fixture(scope="module")
def slow_prefill(
    qwen3_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, GatewayServer]]:
    """A worker whose prefill of a long prompt takes dozens of paced 16-token chunks."""
    args = ["--max-num-batched-tokens", "16", "--debug-step-delay-s", "0.02", "--no-prefix-caching"]
    with worker_behind_gateway(qwen3_path, tmp_path_factory.mktemp("slow-prefill"), "slow", *args) as stack:
        yield stack


def _aborted(proc: WorkerProcess) -> list[dict]:
    records = []
    for line in proc.log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("msg") == "aborted":
            records.append(record)
    return records


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_leaving_mid_prefill_frees_its_sequence_at_the_next_chunk(
    slow_prefill: tuple[WorkerProcess, GatewayServer], model_name: str, stream: bool
) -> None:
    proc, gateway = slow_prefill
    with WorkerClient(proc.target, timeout=5) as worker:
        context = worker.model_info().max_context_length
    prompt = [7] * (context - 24)  # about 60 chunks: over a second of prefill
    body = json.dumps({"model": model_name, "prompt": prompt, "max_tokens": 8, "stream": stream}).encode()
    before = len(_aborted(proc))
    with socket.create_connection(("127.0.0.1", gateway.config.port)) as sock:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        sock.sendall(head.encode() + body)
        time.sleep(0.3)  # a few chunks in, well before the first token
    deadline = time.monotonic() + 20
    while len(_aborted(proc)) == before:
        assert time.monotonic() < deadline, "the worker never aborted the request"
        time.sleep(0.05)
    record = _aborted(proc)[-1]
    assert record["prompt_tokens"] == len(prompt)
    # Dropped mid-prefill: had the gateway waited for the first token, every prompt token would be computed.
    assert 0 < record["computed_tokens"] < len(prompt) // 2
    with WorkerClient(proc.target, timeout=5) as worker:
        deadline = time.monotonic() + 10
        while (load := worker.load()).num_requests_running or load.kv_pages_used:
            assert time.monotonic() < deadline, f"the sequence kept its pages: {load}"
            time.sleep(0.02)
    assert gateway.app.state.serving.in_flight == 0


def test_the_sdk_sees_multi_token_chunks_as_ordinary_chunks(coalescing: GatewayServer, model_name: str) -> None:
    client: openai.OpenAI = coalescing.client()
    chunks = list(
        client.completions.create(
            model=model_name, prompt=PROMPT, max_tokens=12, temperature=0, stream=True, extra_body={"ignore_eos": True}
        )
    )
    text = "".join(c.choices[0].text for c in chunks)
    whole = client.completions.create(
        model=model_name, prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert text == whole.choices[0].text and chunks[-1].choices[0].finish_reason == "length"
