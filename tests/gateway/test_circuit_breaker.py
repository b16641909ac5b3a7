"""Circuit breakers, retry backoff and the retry budget (gateway/resilience.py): the state machines on
an injected clock, then through a real gateway over real workers made to fail and recover."""

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from gateway_harness import GatewayServer, WorkerProcess, gateway_config

from gateway.resilience import Backoff, BreakerSettings, BreakerState, CircuitBreaker, RetryBudget

PROMPT = "Tell me a long story about a lighthouse keeper."
CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(clock: Clock) -> tuple[CircuitBreaker, list[tuple[BreakerState, BreakerState]]]:
    moves: list[tuple[BreakerState, BreakerState]] = []
    b = CircuitBreaker(BreakerSettings(), clock, on_transition=lambda old, new: moves.append((old, new)))
    return b, moves


def fail(b: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        b.failed(b.acquire())


# ------------------------------------------------------------------------------- the state machines


def test_the_defaults_are_sglangs() -> None:
    assert BreakerSettings() == BreakerSettings(failure_threshold=5, success_threshold=2, open_timeout_s=30.0)


def test_five_consecutive_failures_open_a_breaker_and_a_success_starts_the_count_again() -> None:
    clock = Clock()
    b, moves = breaker(clock)
    fail(b, 4)
    b.succeeded(b.acquire())
    fail(b, 4)
    assert b.state is CLOSED and b.allows() and b.consecutive_failures == 4
    fail(b)
    assert b.state is OPEN and not b.allows()
    assert moves == [(CLOSED, OPEN)]


def test_an_open_breaker_turns_half_open_after_its_timeout_and_lets_two_trials_through_at_a_time() -> None:
    clock = Clock()
    b, moves = breaker(clock)
    fail(b, 5)
    clock.now += 29.9
    assert b.state is OPEN and not b.allows()
    clock.now += 0.1
    assert b.state is HALF_OPEN and b.allows()
    first, second = b.acquire(), b.acquire()
    assert not b.allows()  # both trials in flight: nobody else
    b.release(first)  # no verdict (the client left): its place is free again
    assert b.allows()
    b.succeeded(second)
    assert b.state is HALF_OPEN and b.allows()
    b.succeeded(b.acquire())
    assert b.state is CLOSED
    assert moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]


def test_a_failed_trial_opens_the_breaker_again_for_another_timeout() -> None:
    clock = Clock()
    b, moves = breaker(clock)
    fail(b, 5)
    clock.now += 30
    b.succeeded(b.acquire())
    fail(b)
    assert b.state is OPEN
    clock.now += 29
    assert not b.allows()
    clock.now += 1
    assert b.state is HALF_OPEN
    assert moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (OPEN, HALF_OPEN)]


def test_a_worker_the_health_checker_readmits_gets_its_trials_without_waiting_out_the_timeout() -> None:
    clock = Clock()
    b, moves = breaker(clock)
    fail(b, 5)
    clock.now += 1.0  # a restart, long before the 30 s are up
    b.readmitted()
    assert b.state is HALF_OPEN and b.allows()
    b.succeeded(b.acquire())
    b.succeeded(b.acquire())
    assert b.state is CLOSED and moves == [(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, CLOSED)]
    b.readmitted()  # a closed breaker stays closed
    assert b.state is CLOSED


def test_a_call_from_before_the_breaker_changed_has_no_say_and_a_ticket_counts_once() -> None:
    clock = Clock()
    b, _ = breaker(clock)
    slow = b.acquire()  # sent while closed, ends long after
    fail(b, 5)
    clock.now += 30
    assert b.state is HALF_OPEN
    b.succeeded(slow)
    b.failed(slow)
    assert b.state is HALF_OPEN  # neither closed nor opened it
    trial = b.acquire()
    b.succeeded(trial)
    b.succeeded(trial)  # counted once
    assert b.state is HALF_OPEN
    b.release(trial)  # settled already: frees no second place
    b.acquire()
    b.acquire()
    assert not b.allows()


def test_backoff_is_full_jitter_under_an_exponential_ceiling_and_a_cap() -> None:
    backoff = Backoff(base_s=0.05, cap_s=0.3)
    rng = random.Random(0)
    for retry, ceiling in ((1, 0.05), (2, 0.1), (3, 0.2), (4, 0.3), (30, 0.3), (10_000, 0.3)):
        delays = [backoff.delay_s(retry, rng) for _ in range(500)]
        assert 0 <= min(delays) < ceiling * 0.05  # full jitter: from nothing ...
        assert ceiling * 0.95 < max(delays) <= ceiling  # ... up to the ceiling


def test_the_retry_budget_allows_a_fraction_of_recent_requests_plus_a_floor() -> None:
    clock = Clock()
    budget = RetryBudget(ratio=0.2, min_per_s=0.0, window_s=10.0, clock=clock)
    assert not budget.try_retry()  # no requests, no floor: nothing to spend
    for _ in range(10):
        budget.record_request()
    assert budget.available() == 2.0
    assert [budget.try_retry() for _ in range(3)] == [True, True, False]
    assert budget.available() == 0.0
    for _ in range(5):
        budget.record_request()
    assert budget.try_retry()  # 15 requests: a third retry
    assert not budget.try_retry()
    clock.now += 10.0  # the window has slid past all of it
    assert not budget.try_retry()
    for _ in range(5):
        budget.record_request()
    assert budget.try_retry()

    floored = RetryBudget(ratio=0.0, min_per_s=0.5, window_s=10.0, clock=clock)
    assert sum(floored.try_retry() for _ in range(10)) == 5  # 0.5 a second over 10 s, with no requests at all
    clock.now += 5.0
    assert not floored.try_retry()  # the retries of the last 10 s still count
    clock.now += 5.0
    assert sum(floored.try_retry() for _ in range(10)) == 5


# ------------------------------------------------------------------------ through the real gateway


@dataclass
class FlakyWorker:
    """A real worker whose every Generate call fails (FINISH_REASON_ERROR) while its file exists."""

    process: WorkerProcess
    fail_file: Path

    @property
    def target(self) -> str:
        return self.process.target

    def fail(self) -> None:
        self.fail_file.touch()

    def recover(self) -> None:
        self.fail_file.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def flaky(qwen3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[FlakyWorker]]:
    tmp = tmp_path_factory.mktemp("flaky")
    workers = []
    for i in range(2):
        fail_file = tmp / f"fail{i}"
        workers.append(
            FlakyWorker(WorkerProcess(qwen3_path, tmp, f"flaky{i}", "--debug-fail-file", str(fail_file)), fail_file)
        )
    for w in workers:
        w.process.start()
    try:
        for w in workers:
            w.process.wait_serving()
        yield workers
    finally:
        for w in workers:
            w.process.stop()


@pytest.fixture
def healthy_again(flaky: list[FlakyWorker]) -> Iterator[list[FlakyWorker]]:
    yield flaky
    for w in flaky:
        w.recover()


def sample(gw: GatewayServer, name: str, **labels: str) -> float:
    return gw.metrics().get((name, tuple(sorted(labels.items()))), 0.0)


def circuit(gw: GatewayServer, worker: str) -> float:
    return sample(gw, "sfllm_gateway:worker_circuit_state", worker=worker)


def transitions(gw: GatewayServer, worker: str) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["from_state"], dict(labels)["to_state"]): value
        for (name, labels), value in gw.metrics().items()
        if name == "sfllm_gateway:worker_circuit_transitions_total" and dict(labels)["worker"] == worker
    }


def wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.02)


def complete(gw: GatewayServer, model: str) -> None:
    reply = gw.client().completions.create(model=model, prompt=PROMPT, max_tokens=2)
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_failing_worker_is_cut_off_by_its_breaker_and_let_back_after_two_good_trials(
    healthy_again: list[FlakyWorker], model_name: str
) -> None:
    bad, good = healthy_again
    gw = GatewayServer(gateway_config([bad.target, good.target], breaker_open_timeout_s=1.0)).start()
    try:
        gw.wait_healthy(2)
        bad.fail()
        requests = 0
        while circuit(gw, bad.target) != OPEN:  # round robin tries the failing worker first nearly every time
            complete(gw, model_name)
            requests += 1
            assert requests <= 6
        routed = gw.routed()
        assert routed[bad.target] == 5  # five consecutive failures, each retried on the good worker unseen
        assert routed[good.target] == requests
        assert sample(gw, "sfllm_gateway:request_retries_total", reason="worker_failed") == 5
        assert gw.app.state.router.workers[bad.target].healthy  # its health checks pass: the breaker alone cuts it off
        assert transitions(gw, bad.target) == {("closed", "open"): 1}

        for _ in range(4):
            complete(gw, model_name)
        assert gw.routed()[bad.target] == 5  # open: sent nothing

        bad.recover()
        wait_for(lambda: circuit(gw, bad.target) == HALF_OPEN, 10)  # a second after it opened, with no traffic
        before = gw.routed()
        for _ in range(8):
            if circuit(gw, bad.target) == CLOSED:
                break
            complete(gw, model_name)
        assert gw.routed()[bad.target] - before[bad.target] == 2  # two trials, both good
        assert transitions(gw, bad.target) == {
            ("closed", "open"): 1,
            ("open", "half_open"): 1,
            ("half_open", "closed"): 1,
        }
        assert circuit(gw, good.target) == CLOSED and transitions(gw, good.target) == {}
    finally:
        gw.stop()


def test_the_retry_budget_caps_retries_when_every_worker_fails(
    healthy_again: list[FlakyWorker], model_name: str
) -> None:
    settings = {"retry_budget_ratio": 0.25, "retry_budget_min_per_s": 0.0, "breaker_failure_threshold": 1000}
    gw = GatewayServer(gateway_config([w.target for w in healthy_again], **settings)).start()
    try:
        gw.wait_healthy(2)
        for w in healthy_again:
            w.fail()
        client = gw.client()
        messages = []
        for _ in range(20):
            with pytest.raises(openai.APIStatusError) as info:
                client.completions.create(model=model_name, prompt=PROMPT, max_tokens=2)
            assert info.value.status_code == 503
            messages.append(info.value.message)
        # Without a budget, 40 calls: each request on both workers. With a quarter of the requests: 5 retries.
        assert sum(gw.routed().values()) == 20 + 5
        assert sample(gw, "sfllm_gateway:request_retries_total", reason="worker_failed") == 5
        assert sample(gw, "sfllm_gateway:retries_refused_by_budget_total") == 15
        assert sum("retry budget exhausted" in m for m in messages) == 15
        assert sample(gw, "sfllm_gateway:retry_backoff_seconds_count") == 5
        assert sample(gw, "sfllm_gateway:retry_budget_available") == 0  # spent: 0.25 x 20 requests, all 5 retried
    finally:
        gw.stop()
