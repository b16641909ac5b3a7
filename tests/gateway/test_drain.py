"""A worker's SIGTERM drain under traffic: the gateway stops sending it work at once, without holding
the drain against it, and every request keeps succeeding on the other worker."""

import datetime
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gateway_harness import GatewayServer, WorkerProcess, gateway_config

from worker.client import WorkerClient, build_request

PROMPT = "Tell me a long story about a lighthouse keeper."


@pytest.fixture
def draining(qwen3_path: Path, tmp_path: Path) -> Iterator[WorkerProcess]:
    """A worker of its own, to be given SIGTERM; a drain of up to 60 s, kept going by a stream held on it."""
    worker = WorkerProcess(qwen3_path, tmp_path, "draining", "--debug-step-delay-s", "0.02", "--drain-timeout-s", "60")
    worker.start()
    worker.wait_serving()
    yield worker
    worker.stop()


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def served_since(worker: WorkerProcess) -> list[float]:
    """When each call the worker served (its per-request log records, the held stream's aside) began, wall clock."""
    starts = []
    for record in worker.request_records():
        if record["request_id"] != "hold":
            end = datetime.datetime.strptime(record["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC)
            starts.append(end.timestamp() - record["latency_s"])
    return starts


class Traffic:
    """Short completions through the gateway from two threads, back to back, until stopped."""

    def __init__(self, gw: GatewayServer, model: str) -> None:
        self.client = gw.client()
        self.model = model
        self.ok = 0
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                reply = self.client.completions.create(model=self.model, prompt=PROMPT, max_tokens=2)
                assert reply.choices[0].finish_reason in ("stop", "length")
                self.ok += 1
            except BaseException as exc:  # reported by stop()
                self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        assert self.errors == []


def test_a_draining_worker_gets_no_new_request_after_not_serving_and_the_rest_succeed(
    workers: list[WorkerProcess], draining: WorkerProcess, model_name: str
) -> None:
    survivor = workers[0]
    # health checks every 5 s: that the gateway stops at once is the refusal's doing, not a check's luck
    gw = GatewayServer(gateway_config([draining.target, survivor.target], health_interval_s=5)).start()
    traffic = None
    hold = None
    try:
        gw.wait_healthy(2)
        with WorkerClient(draining.target, timeout=5) as direct:
            hold = direct.stub.Generate(build_request(PROMPT, request_id="hold", max_tokens=900, ignore_eos=True))
            wait_for(lambda: direct.load().num_requests_running == 1, 30, "the held stream to run")
            traffic = Traffic(gw, model_name)
            wait_for(lambda: min(gw.routed().values()) >= 2, 30, "traffic on both workers")

            assert draining.proc is not None
            draining.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: direct.health() == "NOT_SERVING", 10, "NOT_SERVING")
            not_serving_at = time.time()
            router = gw.app.state.router
            wait_for(lambda: not router.workers[draining.target].healthy, 5, "the gateway to take it out")
            routed_then = gw.routed()[draining.target]
            ok_then = traffic.ok
            wait_for(lambda: traffic.ok >= ok_then + 8, 30, "traffic after the ejection")
            traffic.stop()

            metrics = gw.metrics()
            routed = gw.routed()
            assert routed[draining.target] == routed_then  # nothing more once out of routing
            assert routed[survivor.target] > ok_then  # which took all of it
            # Calls that reached it after SIGTERM (before the gateway knew) were refused as draining and
            # re-sent: none held against it, none served there.
            retried = metrics.get(("sfllm_gateway:request_retries_total", (("reason", "worker_draining"),)), 0.0)
            failed = metrics.get(("sfllm_gateway:request_retries_total", (("reason", "worker_failed"),)), 0.0)
            assert failed == 0
            breaker = router.workers[draining.target].breaker
            assert breaker.consecutive_failures == 0 and breaker.allows()
            ejections = {
                dict(labels)["reason"]: value
                for (name, labels), value in metrics.items()
                if name == "sfllm_gateway:worker_ejections_total" and dict(labels)["worker"] == draining.target
            }
            assert ejections in ({"draining": 1}, {"health_not_serving": 1}), ejections
            wait_for(lambda: len(served_since(draining)) == routed_then - retried, 10, "the worker's request records")
            assert all(start < not_serving_at + 0.01 for start in served_since(draining))  # each began before
            assert traffic.ok == len(served_since(draining)) + routed[survivor.target]  # each request served once

            hold.cancel()
        assert draining.proc.wait(30) == 0
    finally:
        if traffic is not None:
            traffic._stop.set()
        if hold is not None:
            hold.cancel()
        gw.stop()
