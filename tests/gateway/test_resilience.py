"""Resilience through the real gateway: ejection by health checks and re-admission, retries off busy and
draining workers, a gateway SIGTERM with streams in flight, and stop strings split across streamed deltas."""

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
import pytest
import transformers
from gateway_harness import API_KEY, REPO, GatewayServer, WorkerProcess, free_port, gateway_config

from gateway.router import BUSY_HOLD_S, WorkerHandle
from worker.client import WorkerClient, build_request

PROMPT = "Tell me a long story about a lighthouse keeper."
EJECTIONS = "sfllm_gateway:worker_ejections_total"
RETRIES = "sfllm_gateway:request_retries_total"
HEALTHY = "sfllm_gateway:worker_healthy"
# Health checks for the tests that watch them: fast, so an ejection takes about a second.
FAST_HEALTH = {"health_interval_s": 0.2, "health_timeout_s": 0.2}
# An ejection needs two failed checks; this many check intervals is a generous bound on a loaded machine.
EJECTION_BOUND_INTERVALS = 50


# ------------------------------------------------------------------------------------------- helpers


def wait_for(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout}s waiting for: " + (
            what() if callable(what) else what
        )
        time.sleep(0.02)


def sample(gw: GatewayServer, name: str, **labels: str) -> float:
    return gw.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def ejections(gw: GatewayServer, worker: str) -> dict[str, float]:
    """The worker's ejections so far, by reason."""
    return {
        dict(labels)["reason"]: value
        for (name, labels), value in gw.metrics().items()
        if name == EJECTIONS and dict(labels)["worker"] == worker
    }


def retries(gw: GatewayServer) -> dict[str, float]:
    return {dict(labels)["reason"]: value for (name, labels), value in gw.metrics().items() if name == RETRIES}


def routed_delta(gw: GatewayServer, before: dict[str, float]) -> dict[str, float]:
    after = gw.routed()
    return {worker: after.get(worker, 0) - before.get(worker, 0) for worker in after}


def healthy(gw: GatewayServer, worker: str) -> bool:
    return gw.app.state.router.workers[worker].healthy


def make_next_pick(gw: GatewayServer, worker: str, model: str) -> None:
    """Send what it takes (nothing or one request) for round robin's next pick to be `worker`.

    Round robin takes the healthy workers in address order, one per pick, starting with the first.
    """
    ordered = sorted(gw.app.state.router.workers)
    picks = sum(gw.routed().values())
    if ordered[int(picks) % len(ordered)] != worker:
        gw.client().completions.create(model=model, prompt="warm-up", max_tokens=1)
    picks = sum(gw.routed().values())
    assert ordered[int(picks) % len(ordered)] == worker


def short_requests(gw: GatewayServer, model: str, count: int) -> None:
    client = gw.client()
    for _ in range(count):
        reply = client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")


def log_messages(worker: WorkerProcess) -> list[str]:
    messages = []
    for line in worker.log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                messages.append(record.get("msg", ""))
    return messages


class Reader(threading.Thread):
    """Iterates a stream on its own thread, keeping what arrived and how it ended."""

    def __init__(self, open_stream: Callable[[], Iterable]) -> None:
        super().__init__(daemon=True)
        self.open_stream = open_stream
        self.items: list = []
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            for item in self.open_stream():
                self.items.append(item)
        except BaseException as exc:  # reported by finish()
            self.error = exc

    def finish(self, timeout: float = 60.0) -> list:
        self.join(timeout)
        assert not self.is_alive(), "the stream did not end"
        assert self.error is None, repr(self.error)
        return self.items


@pytest.fixture
def spawn(qwen3_path: Path, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Starts a worker of its own with extra flags (waits until it serves); stops it after the test."""
    started: list[WorkerProcess] = []

    def start(*extra: str) -> WorkerProcess:
        worker = WorkerProcess(qwen3_path, tmp_path, f"own{len(started)}", *extra)
        started.append(worker)
        worker.start()
        worker.wait_serving()
        return worker

    yield start
    for worker in started:
        worker.stop()


@pytest.fixture(scope="module")
def slow_worker(qwen3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerProcess]:
    """A worker whose every engine step sleeps: streams stay mid-way for seconds, one token per delta."""
    worker = WorkerProcess(qwen3_path, tmp_path_factory.mktemp("slow-worker"), "slow", "--debug-step-delay-s", "0.05")
    worker.start()
    worker.wait_serving()
    yield worker
    worker.stop()


# --------------------------------------------------------------------------- ejection by health checks


def test_health_checks_alone_eject_a_frozen_worker_and_readmit_it(
    workers: list[WorkerProcess], gateway: GatewayServer, model_name: str
) -> None:
    victim, survivor = workers
    gw = GatewayServer(gateway_config([w.target for w in workers], **FAST_HEALTH)).start()
    try:
        gw.wait_healthy(2)
        assert sample(gw, HEALTHY, worker=victim.target) == 1
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGSTOP)  # alive, port open, answering nothing
        try:
            bound = EJECTION_BOUND_INTERVALS * FAST_HEALTH["health_interval_s"]
            wait_for(lambda: not healthy(gw, victim.target), bound, "the frozen worker's ejection")
            reasons = ejections(gw, victim.target)
            assert len(reasons) == 1 and next(iter(reasons)).startswith("health_"), reasons
            assert sum(reasons.values()) == 1
            assert sample(gw, HEALTHY, worker=victim.target) == 0
            assert sample(gw, HEALTHY, worker=survivor.target) == 1
            assert gw.routed() == {victim.target: 0, survivor.target: 0}  # no request learnt it: the checks did
            before = gw.routed()
            short_requests(gw, model_name, 4)
            assert routed_delta(gw, before) == {victim.target: 0, survivor.target: 4}
            assert retries(gw) == {}  # routed around, not retried
        finally:
            victim.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: healthy(gw, victim.target), 30, "the thawed worker's re-admission")
        assert sample(gw, HEALTHY, worker=victim.target) == 1
        before = gw.routed()
        short_requests(gw, model_name, 4)
        assert routed_delta(gw, before) == {victim.target: 2, survivor.target: 2}
        assert sum(ejections(gw, victim.target).values()) == 1
        assert ejections(gw, survivor.target) == {}
    finally:
        gw.stop()
        gateway.wait_healthy(2)  # the shared gateway saw the freeze too; it has the worker back


def test_an_ejection_for_silence_evicts_the_frozen_worker_s_stream_and_it_migrates(
    workers: list[WorkerProcess], slow_worker: WorkerProcess, model_name: str
) -> None:
    """Health checks of 0.2 s find the frozen worker before keepalive does (2 s + 2 s): the ejection itself cancels
    its call that has received nothing for a health timeout, and the stream goes on from the other worker."""
    survivor = workers[0]
    gw = GatewayServer(gateway_config([slow_worker.target, survivor.target], **FAST_HEALTH)).start()
    try:
        gw.wait_healthy(2)
        client = gw.client()
        body = dict(model=model_name, prompt=PROMPT, max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
        whole = client.completions.create(**body).choices[0].text  # type: ignore[call-overload]
        make_next_pick(gw, slow_worker.target, model_name)
        stream = Reader(lambda: client.completions.create(stream=True, **body))  # type: ignore[call-overload]
        wait_for(lambda: len(stream.items) >= 3, 30, "the stream's first chunks")
        assert gw.app.state.router.workers[slow_worker.target].in_flight == 1
        assert slow_worker.proc is not None
        slow_worker.proc.send_signal(signal.SIGSTOP)
        try:
            frozen_at = time.monotonic()
            wait_for(lambda: gw.app.state.router.workers[slow_worker.target].in_flight == 0, 10, "the eviction")
            released_s = time.monotonic() - frozen_at
            chunks = stream.finish()  # while the worker is still frozen
        finally:
            slow_worker.proc.send_signal(signal.SIGCONT)
        assert released_s < 2.0  # before keepalive could have: the ejection did it
        reasons = ejections(gw, slow_worker.target)
        assert len(reasons) == 1 and next(iter(reasons)).startswith("health_"), reasons
        assert sample(gw, "sfllm_gateway:worker_calls_evicted_total", worker=slow_worker.target) == 1
        assert retries(gw).get("migrated") == 1
        assert "".join(c.choices[0].text for c in chunks) == whole  # one stream, token for token
        wait_for(lambda: healthy(gw, slow_worker.target), 30, "the thawed worker's re-admission")
    finally:
        gw.stop()


def test_a_draining_worker_reports_not_serving_and_is_taken_out_of_routing(
    workers: list[WorkerProcess], spawn: Callable[..., WorkerProcess], model_name: str
) -> None:
    survivor = workers[0]
    draining = spawn("--debug-step-delay-s", "0.03", "--drain-timeout-s", "60")
    gw = GatewayServer(gateway_config([draining.target, survivor.target], **FAST_HEALTH)).start()
    try:
        gw.wait_healthy(2)
        client = gw.client()
        make_next_pick(gw, draining.target, model_name)
        before = gw.routed()
        max_tokens = 120  # at least 3.6 s at 0.03 s a step: ejection takes about one second
        stream = Reader(
            lambda: client.completions.create(
                model=model_name,
                prompt=PROMPT,
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
        )
        wait_for(lambda: len(stream.items) >= 2, 30, "the long stream's first chunks")
        assert routed_delta(gw, before) == {draining.target: 1, survivor.target: 0}
        assert draining.proc is not None
        draining.proc.send_signal(signal.SIGTERM)
        bound = EJECTION_BOUND_INTERVALS * FAST_HEALTH["health_interval_s"]
        wait_for(lambda: not healthy(gw, draining.target), bound, "the draining worker's ejection")
        assert ejections(gw, draining.target) == {"health_not_serving": 1}
        assert sample(gw, HEALTHY, worker=draining.target) == 0
        seen = len(stream.items)
        assert stream.is_alive() and stream.error is None  # ejected while its stream still runs
        wait_for(lambda: len(stream.items) > seen + 3, 30, "more chunks after the ejection")

        before = gw.routed()
        short_requests(gw, model_name, 4)
        assert routed_delta(gw, before) == {draining.target: 0, survivor.target: 4}
        assert retries(gw) == {}  # never sent there: no refusal to retry

        chunks = stream.finish()
        assert chunks[-1].choices[0].finish_reason == "length"
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
        assert draining.proc.wait(30) == 0  # drained: the stream was its last work
        assert "draining" in log_messages(draining)
    finally:
        gw.stop()


# ------------------------------------------------------------------------------------------------ retries


def test_a_busy_worker_is_retried_on_the_other_one(
    workers: list[WorkerProcess], spawn: Callable[..., WorkerProcess], model_name: str
) -> None:
    other = workers[0]
    small = spawn("--max-num-seqs", "1", "--max-waiting", "1", "--debug-step-delay-s", "0.05")
    gw = GatewayServer(gateway_config([small.target, other.target])).start()
    holders = []
    try:
        gw.wait_healthy(2)
        make_next_pick(gw, small.target, model_name)
        with WorkerClient(small.target, timeout=5) as direct:
            # one sequence running, then one waiting: the worker's queue is full. The second goes in only
            # once the first runs: sent together, the second would find the first still queued, and be refused.
            def hold(i: int) -> None:
                request = build_request(PROMPT, request_id=f"hold-{i}", max_tokens=900, ignore_eos=True)
                holders.append(direct.stub.Generate(request))

            hold(0)
            wait_for(lambda: direct.load().num_requests_running == 1, 30, "the first holder to run")
            hold(1)
            wait_for(lambda: direct.load().num_requests_waiting == 1, 30, "the second holder to wait")
            before, retried = gw.routed(), retries(gw)
            reply = gw.client().completions.create(model=model_name, prompt="one more", max_tokens=4)
            assert reply.choices[0].finish_reason in ("stop", "length")
            assert routed_delta(gw, before) == {small.target: 1, other.target: 1}  # refused there, served here
            after = retries(gw)
            assert after.get("worker_busy", 0) - retried.get("worker_busy", 0) == 1, after
            assert after.get("worker_failed", 0) == retried.get("worker_failed", 0), after
            assert healthy(gw, small.target) and ejections(gw, small.target) == {}  # busy is not broken
            assert direct.load().num_requests_running + direct.load().num_requests_waiting == 2
    finally:
        for call in holders:
            call.cancel()
        gw.stop()


def test_busy_marking_is_proportionate_to_the_refusals() -> None:
    """One refusal holds a worker back for BUSY_HOLD_S, not its whole retry hint; refusals in a row double the hold
    up to the hint; news of room from after the last refusal (an admitted call, an empty queue) ends the hold."""
    worker = WorkerHandle("w")
    worker.mark_busy(30.0, now=100.0)
    assert worker.queue_full(100.0) and not worker.queue_full(100.0 + BUSY_HOLD_S)
    holds = []
    for i in range(1, 12):
        now = 100.0 + 100 * i
        worker.mark_busy(30.0, now=now)
        holds.append(round(worker.busy_until - now, 3))
    assert holds == [0.2, 0.4, 0.8, 1.6, 3.2, 6.4, 12.8, 25.6, 30.0, 30.0, 30.0]  # BUSY_HOLD_S doubled, capped
    last = 100.0 + 1100
    worker.has_room(since=last - 0.01)  # news that began before the last refusal: it still holds
    assert worker.queue_full(last + 1)
    worker.has_room(since=last)
    assert not worker.queue_full(last + 0.001) and worker.busy_streak == 0
    worker.mark_busy(30.0, now=last + 1)
    assert worker.busy_until == last + 1 + BUSY_HOLD_S  # a new streak


def test_a_full_queue_holds_a_worker_back_in_proportion_and_room_ends_the_hold_at_once(
    spawn: Callable[..., WorkerProcess], model_name: str
) -> None:
    """A worker whose queue stays full is tried again at doubling intervals (a trickle, not every request, and not
    once per 30 s retry hint); once its queue empties, its next load report lets requests in again at once."""
    small = spawn("--max-num-seqs", "1", "--max-waiting", "1", "--debug-step-delay-s", "0.05", "--retry-after-ms",
                  "30000")  # fmt: skip
    gw = GatewayServer(gateway_config([small.target])).start()
    holders = []
    handle = gw.app.state.router.workers[small.target]
    try:
        gw.wait_healthy(1)
        with WorkerClient(small.target, timeout=5) as direct, httpx.Client(base_url=gw.url, timeout=30) as http:

            def hold(i: int) -> None:
                request = build_request(PROMPT, request_id=f"hold-{i}", max_tokens=900, ignore_eos=True)
                holders.append(direct.stub.Generate(request))

            hold(0)
            wait_for(lambda: direct.load().num_requests_running == 1, 30, "the first holder to run")
            hold(1)
            wait_for(lambda: direct.load().num_requests_waiting == 1, 30, "the second holder to wait")

            def complete() -> httpx.Response:
                body = {"model": model_name, "prompt": "one more", "max_tokens": 2}
                return http.post("/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"})

            before = gw.routed()[small.target]
            statuses, retry_afters = [], set()
            began = time.monotonic()
            while handle.busy_streak < 6:  # six refusals in a row: holds of 0.1, 0.2, 0.4, 0.8, 1.6 s, then 3.2 s
                assert time.monotonic() - began < 20, (handle.busy_streak, len(statuses))
                reply = complete()
                statuses.append(reply.status_code)
                if reply.status_code == 429:
                    retry_afters.add(int(reply.headers["retry-after"]))
                    assert reply.json()["error"]["type"] == "rate_limit_error"
                time.sleep(0.02)
            elapsed = time.monotonic() - began
            tried = gw.routed()[small.target] - before  # requests the router let through to the full worker
            assert set(statuses) == {429}, statuses
            assert tried == 6  # each refused once, and counted in the streak
            assert elapsed >= 0.9 * (0.1 + 0.2 + 0.4 + 0.8 + 1.6)  # tried again at doubling intervals, no sooner
            assert len(statuses) > 3 * tried  # the rest were held back without bothering the worker
            assert min(retry_afters) >= 1 and max(retry_afters) <= 30
            remaining_hold = handle.busy_until - time.monotonic()
            assert remaining_hold > 2.0, remaining_hold  # the sixth refusal's hold: 3.2 s

            for call in holders:
                call.cancel()
            wait_for(lambda: direct.load().num_requests_running + direct.load().num_requests_waiting == 0, 30,
                     "the worker's queue to empty")  # fmt: skip
            freed = time.monotonic()
            wait_for(lambda: complete().status_code == 200, remaining_hold, "a request served after the queue emptied")
            served_after = time.monotonic() - freed
            print(
                f"\nfull queue: {len(statuses)} requests in {elapsed:.1f} s, all 429, {tried} let through to the "
                f"worker; hold left {remaining_hold:.2f} s; served {served_after:.2f} s after the queue emptied"
            )
            assert served_after < min(1.0, remaining_hold)  # the load report ended the hold, not its timeout
            assert handle.busy_streak == 0 and not handle.queue_full()
            assert healthy(gw, small.target) and ejections(gw, small.target) == {}  # busy is not broken
    finally:
        for call in holders:
            call.cancel()
        gw.stop()


def test_a_request_no_worker_starts_within_the_start_timeout_gets_429_and_leaves_the_worker_s_queue(
    spawn: Callable[..., WorkerProcess], model_name: str
) -> None:
    """--start-timeout-s bounds the whole wait before a request starts, whatever holds it: here the queue of a worker
    with no queue-time bound of its own (--max-queue-time-s 0) whose only slot is taken. The request, streamed or
    not, gets 429 with Retry-After and the OpenAI body once the timeout has passed, no later, and its sequence leaves
    the worker's queue (the gateway cancels the call)."""
    small = spawn("--max-num-seqs", "1", "--max-waiting", "4", "--debug-step-delay-s", "0.05", "--max-queue-time-s",
                  "0")  # fmt: skip
    timeout = 1.0
    gw = GatewayServer(gateway_config([small.target], start_timeout_s=timeout)).start()
    holder = None
    try:
        gw.wait_healthy(1)
        with WorkerClient(small.target, timeout=5) as direct, httpx.Client(base_url=gw.url, timeout=30) as http:
            holder = direct.stub.Generate(build_request(PROMPT, request_id="hold", max_tokens=900, ignore_eos=True))
            wait_for(lambda: direct.load().num_requests_running == 1, 30, "the holder to run")
            headers = {"Authorization": f"Bearer {API_KEY}"}
            for stream in (False, True):
                body = {"model": model_name, "prompt": "one more", "max_tokens": 2, "stream": stream}
                replies: list[tuple[httpx.Response, float]] = []

                def send(body: dict = body, replies: list = replies) -> None:
                    began = time.monotonic()
                    replies.append((http.post("/v1/completions", json=body, headers=headers), time.monotonic() - began))

                sender = threading.Thread(target=send)
                sender.start()
                wait_for(lambda: direct.load().num_requests_waiting == 1, 10, "the request to wait in the queue")
                sender.join(timeout=30)
                reply, took = replies[0]
                assert reply.status_code == 429, reply.text
                assert int(reply.headers["retry-after"]) >= 1
                error = reply.json()["error"]
                assert set(error) == {"message", "type", "param", "code"}, error
                assert (error["type"], error["code"]) == ("rate_limit_error", "server_overloaded"), error
                assert f"within {timeout:g} s" in error["message"], error
                assert timeout <= took < timeout + 3.0, took  # it waited the bound, and not much more
                wait_for(lambda: direct.load().num_requests_waiting == 0, 10, "the refused request to leave the queue")
            assert sample(gw, "sfllm_gateway:requests_not_started_in_time_total") == 2
            holder.cancel()
            reply = http.post("/v1/completions", json={"model": model_name, "prompt": "after", "max_tokens": 2},
                              headers=headers)  # fmt: skip
            assert reply.status_code == 200, reply.text
    finally:
        if holder is not None:
            holder.cancel()
        gw.stop()


def test_a_draining_worker_is_retried_on_the_other_one(
    workers: list[WorkerProcess], spawn: Callable[..., WorkerProcess], model_name: str
) -> None:
    other = workers[0]
    draining = spawn("--debug-step-delay-s", "0.05", "--drain-timeout-s", "60")
    # health checks every 30 s: the gateway learns of the drain from the worker's refusal alone
    gw = GatewayServer(gateway_config([draining.target, other.target], health_interval_s=30)).start()
    hold = None
    try:
        gw.wait_healthy(2)
        make_next_pick(gw, draining.target, model_name)
        with WorkerClient(draining.target, timeout=5) as direct:
            # a long stream straight to the worker keeps it draining (not gone) for as long as the test needs
            hold = direct.stub.Generate(build_request(PROMPT, request_id="hold", max_tokens=900, ignore_eos=True))
            wait_for(lambda: direct.load().num_requests_running == 1, 30, "the holding stream to run")
            assert draining.proc is not None
            draining.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: "draining" in log_messages(draining), 30, "the worker to begin draining")
            assert healthy(gw, draining.target)  # the gateway does not know yet

            before, retried = gw.routed(), retries(gw)
            reply = gw.client().completions.create(model=model_name, prompt="one more", max_tokens=4)
            assert reply.choices[0].finish_reason in ("stop", "length")
            assert routed_delta(gw, before) == {draining.target: 1, other.target: 1}  # refused there, served here
            after = retries(gw)
            assert after.get("worker_draining", 0) - retried.get("worker_draining", 0) == 1, after
            assert after.get("worker_failed", 0) == retried.get("worker_failed", 0), after  # leaving is not failing
            assert after.get("worker_busy", 0) == retried.get("worker_busy", 0), after
            assert ejections(gw, draining.target) == {"draining": 1}
            assert not healthy(gw, draining.target)
            assert gw.app.state.router.workers[draining.target].breaker.consecutive_failures == 0
            hold.cancel()
        assert draining.proc.wait(30) == 0
    finally:
        if hold is not None:
            hold.cancel()
        gw.stop()


# ------------------------------------------------------------------------------------ gateway shutdown


def sse_lines(url: str, body: dict) -> Iterator[str]:
    with httpx.Client(timeout=60) as http, http.stream("POST", url + "/v1/completions", json=body) as response:
        assert response.status_code == 200, response.read()
        # SSE lines end at LF only; iter_lines would also split at U+2028 and the like, which a token's text may hold
        buffer = b""
        for chunk in response.iter_bytes():
            *lines, buffer = (buffer + chunk).split(b"\n")
            yield from (line.removesuffix(b"\r").decode() for line in lines if line.strip())
        if buffer.strip():
            yield buffer.decode()


def test_gateway_sigterm_lets_streams_in_flight_finish_and_exits_0(
    slow_worker: WorkerProcess, model_name: str, tmp_path: Path
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "gateway.log"
    command = [sys.executable, "-m", "gateway", "--workers", slow_worker.target, "--host", "127.0.0.1"]
    command += ["--port", str(port)]
    with open(log_path, "wb") as log:  # no SFLLM_API_KEY: no authentication
        proc = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env={"PATH": "/usr/bin:/bin"})
    try:

        def ready() -> bool:
            assert proc.poll() is None, log_path.read_text()
            with contextlib.suppress(httpx.TransportError):
                return httpx.get(url + "/health").status_code == 200
            return False

        wait_for(ready, 60, lambda: "the gateway to serve: " + log_path.read_text()[-2000:])
        max_tokens = 60  # at least 3 s at 0.05 s a step
        body = {
            "model": model_name,
            "prompt": PROMPT,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        streams = [Reader(lambda: sse_lines(url, body)) for _ in range(3)]
        wait_for(lambda: all(len(s.items) >= 2 for s in streams), 30, "every stream's first chunks")
        proc.send_signal(signal.SIGTERM)

        def new_connection_fails() -> bool:
            try:
                with httpx.Client(timeout=5) as http:  # a fresh connection each time
                    return http.get(url + "/health").status_code >= 500
            except httpx.TransportError:
                return True

        wait_for(new_connection_fails, 10, "new connections to be refused")
        assert any(s.is_alive() for s in streams), "the streams ended before shutdown began; the test proves nothing"

        for stream in streams:
            lines = stream.finish()
            assert lines[-1] == "data: [DONE]"
            chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
            choices = [c["choices"][0] for c in chunks if c["choices"]]
            assert [c["finish_reason"] for c in choices][-1] == "length"
            assert all(c["finish_reason"] is None for c in choices[:-1])
            assert "".join(c["text"] for c in choices)
            assert chunks[-1]["usage"]["completion_tokens"] == max_tokens  # every token reached the client
        returncode = proc.wait(30)  # uvicorn gives in-flight connections up to 30 s, then the gateway exits
        assert returncode == 0, (returncode, log_path.read_text()[-3000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------ stop strings


def stop_across_a_boundary(tokenizer: object, token_ids: list[int], text: str) -> tuple[str, int]:
    """A stop string made of the end of one token and the start of the next, first found at that boundary.

    Returns the stop string and where the text is to be cut (where the stop string begins). Greedy
    output of the random model repeats itself, so every split of the two tokens' text is tried.
    """

    def decode(ids: list[int]) -> str:
        return tokenizer.decode(ids, skip_special_tokens=True)  # type: ignore[attr-defined]

    for k in range(2, len(token_ids) - 1):
        a, b = decode([token_ids[k]]), decode([token_ids[k + 1]])
        if not (a and b and (a + b).isprintable() and (a + b).isascii()):
            continue
        boundary = len(decode(token_ids[: k + 1]))
        if text[boundary - len(a) : boundary + len(b)] != a + b:
            continue  # the two tokens' text is not where their decode says
        splits = [(i, j) for i in range(1, len(a) + 1) for j in range(1, len(b) + 1)]
        # best: a stop that starts inside one token and ends inside the next; then the longest
        splits.sort(key=lambda s: (s[0] == len(a) or s[1] == len(b), -sum(s)))
        for left, right in splits:
            stop = a[-left:] + b[:right]
            if stop.strip() and text.find(stop) == boundary - left:
                return stop, boundary - left
    raise AssertionError(f"no stop string spans a token boundary of {text!r}")


def test_a_stop_string_split_across_deltas_is_cut_on_a_stream(
    slow_worker: WorkerProcess, model_name: str, qwen3_path: Path
) -> None:
    gw = GatewayServer(gateway_config([slow_worker.target])).start()
    try:
        gw.wait_healthy(1)
        client = gw.client()
        tokenizer = transformers.AutoTokenizer.from_pretrained(qwen3_path)
        greedy = {"prompt": PROMPT, "max_tokens": 24, "temperature": 0}
        with WorkerClient(slow_worker.target, timeout=60) as direct:
            free = direct.generate(ignore_eos=True, **greedy)
        args = {"model": model_name, "extra_body": {"ignore_eos": True}, **greedy}
        text = client.completions.create(**args).choices[0].text  # type: ignore[call-overload]
        assert text == free.text
        stop, cut = stop_across_a_boundary(tokenizer, free.token_ids, text)
        expected = text[:cut]

        chunks = list(client.completions.create(stream=True, stop=[stop], **args))  # type: ignore[call-overload]
        pieces = [c.choices[0].text for c in chunks]
        assert "".join(pieces) == expected, (stop, pieces)
        streamed = ""
        for piece in pieces:  # nothing of the stop string ever goes out, not even for a while
            streamed += piece
            assert expected.startswith(streamed), (stop, pieces)
        assert len([p for p in pieces if p]) > 1  # a stream of many deltas, one token each
        assert chunks[-1].choices[0].finish_reason == "stop"
        assert all(c.choices[0].finish_reason is None for c in chunks[:-1])

        whole = client.completions.create(stop=[stop], **args)  # type: ignore[call-overload]
        assert whole.choices[0].text == expected
        assert whole.choices[0].finish_reason == "stop"
    finally:
        gw.stop()
