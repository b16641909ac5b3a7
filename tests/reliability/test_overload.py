"""Overload past every queue (the workers' and the gateway's): 429 with Retry-After, never a 5xx, memory bounded,
and full service again once the burst is over."""

import asyncio
import contextlib
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from gateway_harness import REPO, WorkerProcess, free_port
from prometheus_client.parser import text_string_to_metric_families
from reliability_harness import MAX_NUM_SEQS, MAX_WAITING, PROMPT, RssWatch, Sizes, settled, wait_for

from worker.client import WorkerClient, build_request

GATEWAY_MAX_IN_FLIGHT = 24  # below the 2 x (8 + 16) the workers hold: a burst meets the gateway's bound first
MAX_TOKENS = 16
REQUEST_TIMEOUT_S = 60.0
MIB = 1024 * 1024
# Resident memory a burst may add, whatever its size: the queues are bounded, so memory is too.
GATEWAY_RSS_GROWTH_BOUND = 64 * MIB
WORKER_RSS_GROWTH_BOUND = 128 * MIB  # a worker's three processes together


@pytest.fixture
def gateway_process(workers: list[WorkerProcess], tmp_path: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    """`python -m gateway` on its own (its memory is its own), no API key, over the pair."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "gateway", "--workers", ",".join(w.target for w in workers)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--max-in-flight", str(GATEWAY_MAX_IN_FLIGHT)]
    command += ["--load-interval-s", "0.1", "--log-level", "warning"]
    log_path = tmp_path / "gateway.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"})
    try:

        def ready() -> bool:
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.TransportError):
                reply = httpx.get(url + "/health")
                return reply.status_code == 200 and reply.json()["healthy_workers"] == len(workers)
            return False

        wait_for(ready, 60, lambda: "the gateway to serve: " + log_path.read_text()[-2000:])
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _gateway_held(url: str) -> float:
    """Requests and worker calls the gateway holds now, by its /metrics."""
    text = httpx.get(url + "/metrics").text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name in ("sfllm_gateway:num_requests_running", "sfllm_gateway:worker_requests_in_flight")
    )


async def _one(http: httpx.AsyncClient, url: str, model: str, i: int) -> tuple[str, str | None, dict | None]:
    """One request (streamed or not, alternately): ("ok" | status code | "hung", Retry-After, error body)."""
    body = {"model": model, "prompt": f"overload {i}", "max_tokens": MAX_TOKENS, "ignore_eos": True}
    body["stream"] = i % 2 == 1
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT_S):
            async with http.stream("POST", url + "/v1/completions", json=body) as response:
                raw = await response.aread()
    except TimeoutError:
        return "hung", None, None
    if response.status_code != 200:
        error = None
        with contextlib.suppress(ValueError):
            error = response.json().get("error")
        return str(response.status_code), response.headers.get("retry-after"), error
    text = raw.decode()
    finished = '"finish_reason":"length"' in text.replace(" ", "")
    if body["stream"]:
        finished = finished and text.rstrip().endswith("data: [DONE]")
    return ("ok" if finished else "incomplete"), None, None


@contextlib.contextmanager
def _workers_full(workers: list[WorkerProcess]) -> Iterator[None]:
    """Every worker's queue filled straight over gRPC (as other gateways would): MAX_NUM_SEQS long sequences
    running, then MAX_WAITING more waiting, each; cancelled after."""
    calls = []
    clients = [WorkerClient(w.target, timeout=5) for w in workers]
    try:
        for i, (worker, direct) in enumerate(zip(workers, clients)):
            for count, field in ((MAX_NUM_SEQS, "num_requests_running"), (MAX_WAITING, "num_requests_waiting")):
                for j in range(count):
                    request = build_request(PROMPT, request_id=f"hold-{i}-{field}-{j}", max_tokens=400, ignore_eos=True)
                    calls.append(direct.stub.Generate(request))
                # the waiting ones go in only once the running ones run: sent together, some would be refused
                wait_for(lambda d=direct, f=field, c=count: getattr(d.load(), f) == c, 30, f"{worker.target} {field}")
        yield
    finally:
        for call in calls:
            call.cancel()
        for direct in clients:
            direct.close()


def test_overload_past_every_queue_is_429_with_bounded_memory_then_full_recovery(
    workers: list[WorkerProcess], gateway_process: tuple[subprocess.Popen, str], model_name: str, sizes: Sizes
) -> None:
    """First a burst the workers could hold but the gateway may not (its bound: 429); then a burst while other
    clients hold every worker's queue full (the workers' bound: 429 through the gateway). Memory is watched
    throughout; after, the same gateway and workers serve a load within their capacity in full."""
    proc, url = gateway_process
    assert all(w.proc is not None for w in workers)
    pids = {"gateway": proc.pid, **{w.target: w.proc.pid for w in workers}}  # type: ignore[union-attr]
    baseline_pages = [w.load().kv_pages_used for w in workers]

    async def main() -> tuple[dict[str, list], RssWatch, list]:
        limits = httpx.Limits(max_connections=sizes.overload_burst + 8)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(REQUEST_TIMEOUT_S)) as http:

            async def burst(count: int, first: int) -> list:
                return list(await asyncio.gather(*(_one(http, url, model_name, first + i) for i in range(count))))

            # warm-up: every path the bursts take has run once, so its lazy allocations are in the baseline
            assert [kind for kind, _, _ in await burst(4, 0)] == ["ok"] * 4
            watch, stop = RssWatch(pids), asyncio.Event()
            watcher = asyncio.create_task(watch.watch(stop))
            await asyncio.sleep(0.1)
            bursts = {"gateway": await burst(sizes.overload_burst, 100)}
            with _workers_full(workers):
                bursts["workers"] = await burst(sizes.overload_burst // 2, 100 + sizes.overload_burst)
            stop.set()
            await watcher
            # recovery: once idle and past the longest retry hint, a load the workers hold is served in full
            hints = [
                int(retry) for outcomes in bursts.values() for _, retry, _ in outcomes if retry and retry.isdigit()
            ]
            ended = time.monotonic()
            await asyncio.to_thread(
                wait_for,
                lambda: settled(workers, None, baseline_pages) is None and _gateway_held(url) == 0,
                30,
                lambda: f"the bursts' work to drain: {settled(workers, None, baseline_pages)}",
            )
            await asyncio.sleep(max(0.0, max(hints, default=0) - (time.monotonic() - ended)))
            gate = asyncio.Semaphore(MAX_NUM_SEQS)

            async def within_capacity(i: int) -> tuple:
                async with gate:
                    return await _one(http, url, model_name, 10_000 + i)

            after = await asyncio.gather(*(within_capacity(i) for i in range(2 * 2 * MAX_NUM_SEQS)))
            return bursts, watch, list(after)

    started = time.monotonic()
    bursts, watch, after = asyncio.run(main())
    took = time.monotonic() - started
    growth = {name: watch.peak[name] - watch.baseline[name] for name in pids}
    figures = []
    for name, outcomes in bursts.items():
        kinds = Counter(kind for kind, _, _ in outcomes)
        bounds = Counter(_bound(error) for kind, _, error in outcomes if kind == "429")
        server_errors = sum(count for kind, count in kinds.items() if kind.startswith("5"))
        other = len(outcomes) - kinds["ok"] - kinds["429"] - server_errors
        figures.append(
            f"{len(outcomes)} requests ({'workers free' if name == 'gateway' else 'worker queues held full'}): "
            f"served {kinds['ok']}, 429 {kinds['429']} (gateway bound {bounds['gateway']}, worker queues "
            f"{bounds['workers']}), 5xx {server_errors}, other {other}"
        )
    print(
        f"\noverload of a gateway holding {GATEWAY_MAX_IN_FLIGHT} over 2 workers holding {MAX_NUM_SEQS}+{MAX_WAITING} "
        f"each: {'; '.join(figures)}; RSS growth MiB: "
        + ", ".join(f"{n} {g / MIB:.1f} (peak {watch.peak[n] / MIB:.0f})" for n, g in growth.items())
        + f"; after: {sum(1 for k, _, _ in after if k == 'ok')}/{len(after)} served; {took:.1f} s in all"
    )
    for name, outcomes in bursts.items():
        kinds = Counter(kind for kind, _, _ in outcomes)
        assert set(kinds) <= {"ok", "429"}, kinds  # no 5xx, nothing hung, nothing cut short
        refusals = [(retry, error) for kind, retry, error in outcomes if kind == "429"]
        assert any(_bound(error) == name for _, error in refusals), (name, refusals[:3])  # that bound was reached
        for retry_after, error in refusals:
            assert retry_after is not None and retry_after.isdigit() and int(retry_after) >= 1, retry_after
            assert error is not None and set(error) == {"message", "type", "param", "code"}, error
            assert error["type"] == "rate_limit_error" and error["code"] == "server_overloaded", error
    assert growth["gateway"] < GATEWAY_RSS_GROWTH_BOUND, growth
    for worker in workers:
        assert growth[worker.target] < WORKER_RSS_GROWTH_BOUND, growth
    assert [kind for kind, _, _ in after] == ["ok"] * len(after)  # full recovery
    assert httpx.get(url + "/health").status_code == 200


def _bound(error: dict | None) -> str:
    """Which bound a 429 came from: the gateway's in-flight limit, or the workers' queues."""
    return "gateway" if "in-flight request limit" in (error or {}).get("message", "") else "workers"
