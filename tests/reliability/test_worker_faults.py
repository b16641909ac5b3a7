"""Workers that die or drain under a streaming load: nothing hangs, nothing ends silently, a drain takes no new work,
and a rolling restart fails no request."""

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest
from gateway_harness import GatewayServer, WorkerProcess, gateway_config
from reliability_harness import (
    DRAIN_TIMEOUT_S,
    FAST_HEALTH,
    PROMPT,
    STEP_DELAY_S,
    GatewayRequestLog,
    Outcome,
    Sizes,
    completion_body,
    gateway_request_log,
    http_client,
    log_records,
    log_time,
    migrations_metric,
    stream_completion,
    tally,
    wait_for,
    wait_settled,
)

MAX_TOKENS = 24  # well under a second a stream at 0.01 s a step: well inside the drain
REQUEST_TIMEOUT_S = 60.0  # a stream not ended by then is hung


@pytest.fixture
def gateway(workers: list[WorkerProcess]) -> Iterator[GatewayServer]:
    """A gateway of the test's own over the pair, with fast health checks."""
    gw = GatewayServer(gateway_config([w.target for w in workers], **FAST_HEALTH)).start()
    try:
        gw.wait_healthy(2)
        yield gw
    finally:
        gw.stop()


async def _streams(
    gw: GatewayServer, model: str, count: int, concurrency: int, fault: Callable[[list], Awaitable[dict]]
) -> tuple[list[Outcome], dict]:
    """`count` streams, `concurrency` at a time; `fault(tasks)` runs beside them and returns what it saw."""
    gate = asyncio.Semaphore(concurrency)
    async with http_client(concurrency) as http:

        async def one(i: int) -> Outcome:
            async with gate:
                body = completion_body(model, MAX_TOKENS, f"{PROMPT} ({i})")
                return await stream_completion(http, gw.url, body, REQUEST_TIMEOUT_S)

        tasks = [asyncio.create_task(one(i)) for i in range(count)]
        seen = await fault(tasks)
        return list(await asyncio.gather(*tasks)), seen


async def _when_a_third_done_and_busy(gw: GatewayServer, victim: WorkerProcess, tasks: list) -> int:
    """Wait until a third of the streams have ended and the victim has streams open; returns how many."""
    handle = gw.app.state.router.workers[victim.target]
    deadline = time.monotonic() + 60
    while sum(t.done() for t in tasks) < len(tasks) // 3 or handle.in_flight < 2:
        assert time.monotonic() < deadline, "the load never reached the victim"
        await asyncio.sleep(0.005)
    return handle.in_flight


def _report(name: str, outcomes: list[Outcome], migrated: int, **extra: object) -> dict[str, int]:
    counts = tally(outcomes)
    figures = {
        "completed": counts["completed"] - migrated,
        "migrated": migrated,
        "errored": counts["errored"],
        "refused": counts["refused"],
        "hung": counts["hung"],
        "lost": counts["lost"],
    }
    line = ", ".join(f"{k} {v}" for k, v in {**figures, **extra}.items())
    print(f"\n{name}: {len(outcomes)} requests, {line}")
    return figures


def _routing_state(gw: GatewayServer) -> dict:
    """The gateway's ejections, retries and breaker states: what a refusal's assertion message needs."""
    words = ("eject", "retr", "circuit", "healthy")
    return {name + str(dict(labels)): v for (name, labels), v in gw.metrics().items() if any(w in name for w in words)}


def _migrated(outcomes: list[Outcome], log: GatewayRequestLog) -> int:
    """Completed streams that the gateway moved to another worker mid-stream (its request line says how often)."""
    return sum(1 for o in outcomes if o.kind == "completed" and log.migrations_of(o.request_id) > 0)


def test_kill_9_of_one_worker_under_streaming_load(
    workers: list[WorkerProcess], gateway: GatewayServer, model_name: str, sizes: Sizes
) -> None:
    victim, survivor = workers

    async def kill(tasks: list) -> dict:
        streams = await _when_a_third_done_and_busy(gateway, victim, tasks)
        await asyncio.to_thread(victim.kill)
        return {"streams_on_victim": streams}

    with gateway_request_log() as log:
        outcomes, seen = asyncio.run(_streams(gateway, model_name, sizes.kill_requests, sizes.concurrency, kill))
        migrated = _migrated(outcomes, log)
        figures = _report(
            "kill -9 under load",
            outcomes,
            migrated,
            streams_on_victim_at_kill=seen["streams_on_victim"],
            migrations_metric=migrations_metric(gateway),
        )
        errored = [o for o in outcomes if o.kind == "errored"]
        assert figures["hung"] == 0 and figures["lost"] == 0, [o for o in outcomes if o.kind in ("hung", "lost")]
        # the survivor had room for every stream: none may be refused
        assert figures["refused"] == 0, (_routing_state(gateway), [o.error for o in outcomes if o.kind == "refused"])
        # only streams cut on the victim end in an error, each with an OpenAI error event
        assert len(errored) <= seen["streams_on_victim"]
        for o in errored:
            assert victim.target in log.workers_of(o.request_id), o
            assert o.error is not None and {"message", "type", "param", "code"} <= set(o.error), o.error
    assert not gateway.app.state.router.workers[victim.target].healthy
    wait_settled([survivor], gateway, [0])  # no call, request or sequence left behind, on either worker's gauge


def test_sigterm_of_one_worker_under_streaming_load(
    workers: list[WorkerProcess], gateway: GatewayServer, model_name: str, sizes: Sizes
) -> None:
    victim, survivor = workers
    assert victim.proc is not None
    handle = gateway.app.state.router.workers[victim.target]
    marks: dict[str, float] = {}

    async def terminate(tasks: list) -> dict:
        streams = await _when_a_third_done_and_busy(gateway, victim, tasks)
        marks["at"], marks["wall"] = time.monotonic(), time.time()
        victim.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        while handle.healthy:  # the gateway sees NOT_SERVING (or a refusal) and takes it out of routing
            assert time.monotonic() - marks["at"] < 30, "the draining worker was never taken out of routing"
            await asyncio.sleep(0.005)
        marks["ejected_after_s"] = time.monotonic() - marks["at"]
        routed = await asyncio.to_thread(gateway.routed)
        return {"streams_on_victim": streams, "routed_at_ejection": routed[victim.target]}

    with gateway_request_log() as log:
        outcomes, seen = asyncio.run(_streams(gateway, model_name, sizes.drain_requests, sizes.concurrency, terminate))
        migrated = _migrated(outcomes, log)
        returncode = victim.proc.wait(DRAIN_TIMEOUT_S + 30)

    # What the worker admitted after it began draining: its request lines that started after its "draining" line.
    records = [r for r in log_records(victim) if log_time(r) >= marks["wall"] - 1.0]
    drain_began = min(log_time(r) for r in records if r.get("msg") == "draining")
    served = [r for r in records if r.get("msg") == "generate" and r.get("status") != "UNAVAILABLE"]
    admitted_after = [r for r in served if log_time(r) - r["latency_s"] > drain_began + 0.01]
    routed_after = gateway.routed()[victim.target] - seen["routed_at_ejection"]
    figures = _report(
        "SIGTERM under load",
        outcomes,
        migrated,
        streams_on_victim_at_sigterm=seen["streams_on_victim"],
        ejected_after_s=round(marks["ejected_after_s"], 2),
        admitted_after_not_serving=len(admitted_after),
        routed_after_ejection=int(routed_after),
        exit_code=returncode,
    )
    assert figures["hung"] == 0 and figures["lost"] == 0, [o for o in outcomes if o.kind in ("hung", "lost")]
    assert figures["refused"] == 0, (_routing_state(gateway), [o.error for o in outcomes if o.kind == "refused"])
    for o in outcomes:  # finished (here or migrated), or an explicit error event
        assert o.kind in ("completed", "errored"), o
    assert admitted_after == [], admitted_after
    assert routed_after == 0
    assert returncode == 0  # drained, then exited cleanly
    wait_settled([survivor], gateway, [0])


def _rolling_restart(gw: GatewayServer, workers: list[WorkerProcess], model: str, loops: dict[int, int]) -> dict:
    """SIGTERM each worker in turn under a steady load, restart it, and wait until the gateway routes to it again
    before the next. `loops` maps a stream length to how many client loops keep streams of it going."""
    stop = asyncio.Event()
    back: dict[str, float] = {}
    routed_when_back: dict[str, float] = {}

    def roll() -> None:
        time.sleep(0.5)  # the load first
        for worker in workers:
            assert worker.proc is not None
            began = time.monotonic()
            worker.proc.send_signal(signal.SIGTERM)
            assert worker.proc.wait(DRAIN_TIMEOUT_S + 30) == 0
            worker.start()
            worker.wait_serving()
            wait_for(lambda w=worker: gw.app.state.router.workers[w.target].healthy, 30, "re-admission")
            back[worker.target] = round(time.monotonic() - began, 1)
            routed_when_back[worker.target] = gw.routed()[worker.target]
        time.sleep(1.0)  # the last one restarted takes load too

    async def main() -> dict[int, list[Outcome]]:
        outcomes: dict[int, list[Outcome]] = {length: [] for length in loops}
        async with http_client(sum(loops.values())) as http:

            async def loop(length: int, i: int) -> None:
                n = 0
                while not stop.is_set():
                    body = completion_body(model, length, f"{PROMPT} ({length}-{i}-{n})")
                    outcomes[length].append(await stream_completion(http, gw.url, body, REQUEST_TIMEOUT_S))
                    n += 1

            tasks = [asyncio.create_task(loop(length, i)) for length, count in loops.items() for i in range(count)]
            try:
                await asyncio.to_thread(roll)
            finally:
                stop.set()
                await asyncio.gather(*tasks)
        return outcomes

    outcomes = asyncio.run(main())
    routed = gw.routed()
    took_load = {w.target: routed[w.target] > routed_when_back[w.target] for w in workers}
    return {"outcomes": outcomes, "back": back, "took_load_after_restart": took_load}


# At 0.01 s a step at least, these outlast the 3 s drain by far.
LONG_STREAM_TOKENS = 460  # with a prompt of about 45 tokens, inside the context of 512
assert LONG_STREAM_TOKENS * STEP_DELAY_S > 1.5 * DRAIN_TIMEOUT_S
LONG_STREAM_LOOPS = 2


def test_rolling_restart_under_load_fails_no_request(
    workers: list[WorkerProcess], gateway: GatewayServer, model_name: str, sizes: Sizes
) -> None:
    """Both workers drained and restarted in turn under a steady load. Streams shorter than the drain finish on
    their draining worker while new ones go to the other: none may fail. Streams longer than the drain are cut by
    it and must go on from another worker (mid-stream migration), as one stream: none may fail either."""
    loops = {MAX_TOKENS: sizes.rolling_concurrency, LONG_STREAM_TOKENS: LONG_STREAM_LOOPS}
    with gateway_request_log() as log:
        result = _rolling_restart(gateway, workers, model_name, loops)
    back = {f"{w.target} back after s": result["back"][w.target] for w in workers}
    short, long = result["outcomes"][MAX_TOKENS], result["outcomes"][LONG_STREAM_TOKENS]
    _report(f"rolling restart, streams of {MAX_TOKENS} tokens (shorter than the drain)", short, _migrated(short, log))
    long_figures = _report(
        f"rolling restart, streams of {LONG_STREAM_TOKENS} tokens (longer than the drain)",
        long,
        _migrated(long, log),
        **back,
    )
    assert all(result["took_load_after_restart"].values()), result["took_load_after_restart"]
    for outcomes in (short, long):
        assert not [o for o in outcomes if o.kind in ("hung", "lost")]
    failed = [o for o in short if o.kind != "completed"]
    assert failed == [], [(o.kind, o.status, o.error) for o in failed]
    failed_long = [o for o in long if o.kind != "completed"]
    assert failed_long == [], [(o.kind, o.status, o.error) for o in failed_long]
    assert long_figures["migrated"] > 0  # the drains cut them: they went on from the other worker
