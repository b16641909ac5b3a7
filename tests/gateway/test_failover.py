"""Worker deaths and client disconnects: nothing hangs, nothing is lost silently, nothing leaks."""

import asyncio
import concurrent.futures
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from gateway_harness import API_KEY, GatewayServer, WorkerProcess, gateway_config

from worker.client import WorkerClient

PROMPT = "Tell me a long story about a lighthouse keeper."


@pytest.fixture
def restartable(workers: list[WorkerProcess], gateway: GatewayServer) -> Iterator[list[WorkerProcess]]:
    """The shared workers, each running and admitted by the shared gateway again after the test."""
    yield workers
    for worker in workers:
        if worker.proc is None or worker.proc.poll() is not None:
            worker.start()
    for worker in workers:
        worker.wait_serving()
    gateway.wait_healthy(2)


def context_length(worker: WorkerProcess) -> int:
    with WorkerClient(worker.target, timeout=5) as client:
        return client.model_info().max_context_length


def wait_idle(workers: list[WorkerProcess], timeout: float = 20.0) -> None:
    """Until every worker runs and queues nothing and holds no KV page."""
    deadline = time.monotonic() + timeout
    while True:
        loads = [w.load() for w in workers]
        if all(l.num_requests_running == 0 and l.num_requests_waiting == 0 and l.kv_pages_used == 0 for l in loads):  # noqa: E741
            return
        assert time.monotonic() < deadline, f"workers still busy: {loads}"
        time.sleep(0.05)


def routed_delta(gateway: GatewayServer, before: dict[str, float]) -> dict[str, float]:
    after = gateway.routed()
    return {worker: after.get(worker, 0) - before.get(worker, 0) for worker in after}


def worker_failed_retries(gateway: GatewayServer) -> float:
    return gateway.metrics().get(("sfllm_gateway:request_retries_total", (("reason", "worker_failed"),)), 0.0)


def aim_round_robin_at(gateway: GatewayServer, worker: WorkerProcess, model_name: str) -> None:
    """Send requests until one lands on the other worker: round robin over two then picks `worker` next."""
    client = gateway.client()
    for _ in range(2):
        before = gateway.routed()
        client.completions.create(model=model_name, prompt="aim", max_tokens=1)
        if routed_delta(gateway, before)[worker.target] == 0:
            return
    raise AssertionError(f"round robin sent two requests in a row to {worker.target}")


def test_a_worker_killed_between_requests_is_ejected_by_its_channel_before_a_request_finds_it(
    restartable: list[WorkerProcess], model_name: str
) -> None:
    """Health checks only every 30 s: what tells the gateway is its channel, whose connection closes and cannot be
    made again (TRANSIENT_FAILURE). No request pays a retry for the death; in-flight calls that do are retried
    invisibly (test_killing_a_worker_mid_load)."""
    victim, survivor = restartable
    gw = GatewayServer(gateway_config([w.target for w in restartable], health_interval_s=30)).start()
    try:
        gw.wait_healthy(2)
        aim_round_robin_at(gw, victim, model_name)
        retries_before = worker_failed_retries(gw)
        victim.kill()
        handle = gw.app.state.router.workers[victim.target]
        deadline = time.monotonic() + 5
        while handle.healthy:  # a GetLoad poll finds the connection gone, every 0.1 s
            assert time.monotonic() < deadline, "the killed worker was not ejected"
            time.sleep(0.01)
        ejections = {
            dict(labels)["reason"]: value
            for (name, labels), value in gw.metrics().items()
            if name == "sfllm_gateway:worker_ejections_total" and dict(labels)["worker"] == victim.target
        }
        assert ejections == {"channel_transient_failure": 1}, ejections

        client = gw.client()
        before = gw.routed()
        for stream in (False, True, False, True):
            if stream:
                chunks = list(client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4, stream=True))
                finish = chunks[-1].choices[0].finish_reason
            else:
                finish = (
                    client.completions.create(model=model_name, prompt=PROMPT, max_tokens=4).choices[0].finish_reason
                )
            assert finish in ("stop", "length"), f"stream={stream}"
        assert routed_delta(gw, before) == {victim.target: 0, survivor.target: 4}
        assert worker_failed_retries(gw) == retries_before  # no request tried the dead worker

        victim.start()
        victim.wait_serving()
        gw.wait_healthy(2, timeout=10)  # re-admitted by its health check (an ejected worker is checked often)
        before = gw.routed()
        for _ in range(10):
            client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2)
        assert routed_delta(gw, before) == {victim.target: 5, survivor.target: 5}
    finally:
        gw.stop()


def test_killing_a_worker_mid_load(restartable: list[WorkerProcess], gateway: GatewayServer, model_name: str) -> None:
    victim, survivor = restartable
    client = gateway.client(timeout=60)
    max_tokens = context_length(victim) // 2
    received: list[int] = [0] * 16

    def one(i: int) -> str:
        args = {"model": model_name, "prompt": PROMPT, "max_tokens": max_tokens, "extra_body": {"ignore_eos": True}}
        if i % 2 == 0:  # non-streamed: every failure short of the end is retried invisibly
            reply = client.completions.create(**args)  # type: ignore[call-overload]
            assert reply.choices[0].finish_reason == "length"
            assert reply.usage.completion_tokens == max_tokens  # type: ignore[union-attr]
            return "ok"
        finish, tokens = None, 0
        for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **args):  # type: ignore[call-overload]
            received[i] += 1
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        assert (finish, tokens) == ("length", max_tokens)
        return "ok"

    router = gateway.app.state.router
    migrated = ("sfllm_gateway:request_retries_total", (("reason", "migrated"),))
    migrated_before = gateway.metrics().get(migrated, 0.0)
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        # the streams first, alone: round robin puts four on each worker
        streams = [pool.submit(one, i) for i in range(1, 16, 2)]
        deadline = time.monotonic() + 30
        while not all(received[i] > 0 for i in range(1, 16, 2)):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        whole = [pool.submit(one, i) for i in range(0, 16, 2)]
        while router.workers[victim.target].in_flight < 8:  # its four streams and four whole requests
            assert time.monotonic() < deadline
            time.sleep(0.01)
        victim.kill()
        # none hangs; none ends without a result or an error
        outcomes = {"whole": [f.result(timeout=60) for f in whole], "streams": [f.result(timeout=60) for f in streams]}
    assert outcomes["whole"] == ["ok"] * 8  # retried on the survivor, invisibly
    assert outcomes["streams"] == ["ok"] * 8  # the victim's four migrated to the survivor mid-stream
    assert gateway.metrics()[migrated] - migrated_before == 4

    before = gateway.routed()
    for _ in range(4):
        client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2)
    assert routed_delta(gateway, before).get(victim.target, 0) == 0

    victim.start()
    victim.wait_serving()
    gateway.wait_healthy(2, timeout=10)
    before = gateway.routed()
    for _ in range(4):
        client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2)
    assert routed_delta(gateway, before)[victim.target] == 2


def test_fifty_clients_disconnecting_mid_stream_leave_no_work_behind(
    workers: list[WorkerProcess], gateway: GatewayServer, model_name: str
) -> None:
    max_tokens = context_length(workers[0]) // 2

    async def client_that_leaves(client: openai.AsyncOpenAI, i: int) -> int:
        stream = await client.chat.completions.create(
            model=model_name,
            messages=[{"role": "user", "content": f"{PROMPT} ({i})"}],
            max_tokens=max_tokens,
            extra_body={"ignore_eos": True},
            stream=True,
        )
        seen = 0
        async for _ in stream:
            seen += 1
            if seen == 3:
                break
        await stream.close()
        return seen

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=100)
        http = openai.DefaultAsyncHttpxClient(limits=limits)
        async with openai.AsyncOpenAI(
            base_url=gateway.url + "/v1", api_key=API_KEY, max_retries=0, http_client=http, timeout=60
        ) as client:
            return await asyncio.gather(*(client_that_leaves(client, i) for i in range(50)))

    assert asyncio.run(main()) == [3] * 50
    wait_idle(workers, timeout=20)
    metrics = gateway.metrics()
    assert metrics[("sfllm_gateway:num_requests_running", ())] == 0
    assert all(metrics[("sfllm_gateway:worker_requests_in_flight", (("worker", w.target),))] == 0 for w in workers)


def test_a_non_streamed_request_is_aborted_when_its_client_leaves(
    workers: list[WorkerProcess], gateway: GatewayServer, model_name: str
) -> None:
    body = {"model": model_name, "prompt": PROMPT, "max_tokens": context_length(workers[0]) // 2, "n": 4}
    body["ignore_eos"] = True
    headers = {"Authorization": f"Bearer {API_KEY}"}

    def leave_early() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(gateway.url + "/v1/completions", json=body, headers=headers, timeout=0.5)

    seen = [len(w.request_records()) for w in workers]

    def new_records() -> list[dict]:
        return [r for w, n in zip(workers, seen) for r in w.request_records()[n:]]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: leave_early(), range(8)))
    wait_idle(workers, timeout=20)
    # Each of the 8 requests ends on its worker as 4 aborted choices, short of max_tokens: none ran to its end.
    deadline = time.monotonic() + 10
    while len(records := new_records()) < 8:
        assert time.monotonic() < deadline, records
        time.sleep(0.05)
    assert len(records) == 8
    for record in records:
        assert record["finish_reason"] == ",".join(["abort"] * 4), record
        assert record["completion_tokens"] < 4 * body["max_tokens"], record
