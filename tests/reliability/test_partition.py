"""A worker that goes silent rather than dying: cut off by a network partition (a veth pair into a network
namespace, where root may make one), or frozen by SIGSTOP (everywhere). The gateway ejects it by its health
checks, routes around it meanwhile, and admits it again once it answers; the streams it held leave it within
seconds, whichever comes first of its ejection (which evicts them) and the channel's keepalive (which fails them),
and go on from the other worker as if nothing had happened."""

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from gateway_harness import REPO, GatewayServer, WorkerProcess, gateway_config
from reliability_harness import (
    FAST_HEALTH,
    LOAD_INTERVAL_S,
    WORKER_ARGS,
    Outcome,
    completion_body,
    http_client,
    metric_sum,
    migrations_metric,
    stream_completion,
    wait_for,
)

from gateway.config import GatewayConfig
from gateway.workers import _UNHEALTHY_AFTER

# Ejection takes _UNHEALTHY_AFTER failed health checks. Each round of the worker's watcher waits out the check's
# timeout, then the check interval (it sleeps a load interval at a time); a GetLoad poll in flight when the silence
# began waits out one timeout more. Two loaded cores get two seconds more.
_ROUND_S = FAST_HEALTH["health_timeout_s"] + FAST_HEALTH["health_interval_s"] + LOAD_INTERVAL_S
EJECTION_BOUND_S = _UNHEALTHY_AFTER * _ROUND_S + FAST_HEALTH["health_timeout_s"] + 2.0
# Keepalive: a ping keepalive_time_s after the last data received, unanswered keepalive_timeout_s later, closes the
# connection and fails its calls (sooner when a flow-control ping was in flight as the silence began).
_DEFAULTS = GatewayConfig()  # the tests' gateways keep its keepalive settings (--keepalive-time-s and -timeout-s)
KEEPALIVE_BOUND_S = _DEFAULTS.keepalive_time_s + _DEFAULTS.keepalive_timeout_s + 2.0
# The calls in flight on a silent worker leave it at its ejection or its keepalive failure, whichever comes first.
RELEASE_BOUND_S = min(EJECTION_BOUND_S, KEEPALIVE_BOUND_S)
READMISSION_BOUND_S = 15.0  # TCP's retransmission backoff after a partition of seconds, then one passing check
STREAM_TOKENS = 80  # 0.8 s of steps at least: still mid-way when the worker falls silent, short after
REQUEST_TIMEOUT_S = 90.0
# Health checks that never come during a test: what frees the streams of a silent worker is keepalive alone.
NO_HEALTH_CHECKS = {"health_interval_s": 600.0, "health_timeout_s": 1.0}
# What an ejection for silence may say: a failed health check, or a call (or the channel) failed by keepalive.
SILENCE_REASONS = {"health_deadline_exceeded", "health_unavailable", "unavailable", "channel_transient_failure"}


class Namespace:
    """A network namespace joined to this one by a veth pair: 10.213.N.1 here, 10.213.N.2 there."""

    def __init__(self) -> None:
        tag = os.getpid() % 100_000
        self.name = f"sfllm-rel-{tag}"
        self.host_if, self.ns_if = f"sfr{tag}h", f"sfr{tag}n"
        self.host_ip, self.ns_ip = f"10.213.{tag % 250}.1", f"10.213.{tag % 250}.2"

    def create(self) -> None:
        """Make the namespace and its link; raises CalledProcessError where this is not allowed."""
        for command in (
            f"ip netns add {self.name}",
            f"ip link add {self.host_if} type veth peer name {self.ns_if}",
            f"ip link set {self.ns_if} netns {self.name}",
            f"ip addr add {self.host_ip}/30 dev {self.host_if}",
            f"ip link set {self.host_if} up",
            f"ip netns exec {self.name} ip addr add {self.ns_ip}/30 dev {self.ns_if}",
            f"ip netns exec {self.name} ip link set {self.ns_if} up",
            f"ip netns exec {self.name} ip link set lo up",
        ):
            subprocess.run(command.split(), check=True, capture_output=True, text=True)

    def partition(self) -> None:
        """Take the namespace's end of the link down: packets vanish both ways, nothing is refused or reset."""
        subprocess.run(f"ip netns exec {self.name} ip link set {self.ns_if} down".split(), check=True)

    def heal(self) -> None:
        subprocess.run(f"ip netns exec {self.name} ip link set {self.ns_if} up".split(), check=True)

    def delete(self) -> None:
        subprocess.run(f"ip link del {self.host_if}".split(), capture_output=True)
        subprocess.run(f"ip netns del {self.name}".split(), capture_output=True)


class NamespacedWorker(WorkerProcess):
    """A worker process run inside the namespace, listening on its end of the link."""

    def __init__(self, namespace: Namespace, model: Path, log_dir: Path, name: str, *extra: str) -> None:
        super().__init__(model, log_dir, name, *extra)
        self.namespace = namespace

    @property
    def target(self) -> str:
        return f"{self.namespace.ns_ip}:{self.port}"

    def start(self) -> None:
        args = ["ip", "netns", "exec", self.namespace.name, sys.executable, "-m", "worker", "--model", str(self.model)]
        args += ["--host", self.namespace.ns_ip, "--port", str(self.port), "--metrics-port", "0"]
        args += ["--dtype", "float32", "--device", "cpu", "--log-level", "info", *self.extra]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("network namespaces need root and iproute2")
    ns = Namespace()
    ns.delete()  # what a killed run of this process id may have left
    try:
        ns.create()
    except subprocess.CalledProcessError as exc:
        ns.delete()
        pytest.skip(f"network namespaces are not allowed here: {exc.stderr.strip()}")
    yield ns
    ns.delete()


class Streams(threading.Thread):
    """Some long greedy streams through the gateway, read on a thread of their own."""

    def __init__(self, gw: GatewayServer, model: str, count: int) -> None:
        super().__init__(daemon=True)
        self.gw, self.model, self.count = gw, model, count
        self.prompts = [f"a long stream ({i})" for i in range(count)]
        self.outcomes: list[Outcome] = []
        self.texts = [0] * count
        self.start()

    def run(self) -> None:
        async def main() -> list[Outcome]:
            async with http_client(self.count) as http:

                async def one(i: int) -> Outcome:
                    def seen(out: Outcome) -> None:
                        self.texts[i] = out.text_chunks

                    body = completion_body(self.model, STREAM_TOKENS, self.prompts[i], temperature=0)
                    return await stream_completion(http, self.gw.url, body, REQUEST_TIMEOUT_S, seen)

                return list(await asyncio.gather(*(one(i) for i in range(self.count))))

        self.outcomes = asyncio.run(main())

    def uninterrupted(self) -> list[str]:
        """What each stream should have been: the same greedy completion, asked for again, not streamed."""
        client = self.gw.client()
        return [
            client.completions.create(
                model=self.model, prompt=p, max_tokens=STREAM_TOKENS, temperature=0, extra_body={"ignore_eos": True}
            )
            .choices[0]
            .text
            for p in self.prompts
        ]


def _short_requests(gw: GatewayServer, model: str, count: int) -> dict[str, float]:
    """`count` short requests, each served; returns how many went to each worker."""
    before = gw.routed()
    client = gw.client()
    for _ in range(count):
        reply = client.completions.create(model=model, prompt="during", max_tokens=2)
        assert reply.choices[0].finish_reason in ("stop", "length")
    after = gw.routed()
    return {w: after[w] - before.get(w, 0) for w in after}


def _silent_worker_round(
    gw: GatewayServer,
    silent: WorkerProcess,
    other: WorkerProcess,
    model: str,
    mute: Callable[[], None],
    unmute: Callable[[], None],
) -> dict:
    """Streams on both workers; mute one; time its ejection and the release of its streams; route around it; let
    every stream end while it is still silent; unmute; time its re-admission; check round robin's share after."""
    handle = gw.app.state.router.workers[silent.target]
    streams = Streams(gw, model, 4)  # round robin: two on each worker
    wait_for(lambda: min(streams.texts) >= 2, 60, "every stream's first text")
    on_silent = handle.in_flight
    migrated_before = migrations_metric(gw)
    evicted_before = metric_sum(gw, "sfllm_gateway:worker_calls_evicted_total", worker=silent.target)
    lost_before = metric_sum(gw, "sfllm_gateway:worker_connections_lost_total", worker=silent.target)
    muted_at = time.monotonic()
    mute()
    try:
        marks: dict[str, float] = {}

        def ejected_and_released() -> bool:
            if "ejected" not in marks and not handle.healthy:
                marks["ejected"] = time.monotonic() - muted_at
            if "released" not in marks and handle.in_flight == 0:
                marks["released"] = time.monotonic() - muted_at
            return len(marks) == 2

        wait_for(ejected_and_released, 3 * EJECTION_BOUND_S, lambda: f"ejection and release of its calls: {marks}")
        reasons = {
            dict(labels)["reason"]
            for (name, labels), value in gw.metrics().items()
            if name == "sfllm_gateway:worker_ejections_total" and dict(labels)["worker"] == silent.target and value
        }
        routed = _short_requests(gw, model, 4)
        streams.join(REQUEST_TIMEOUT_S)  # every stream must end while the worker is still silent
        ended_while_silent = not streams.is_alive()
        silent_for = time.monotonic() - muted_at
    finally:
        unmute()
    readmitted_s = wait_for(lambda: handle.healthy, READMISSION_BOUND_S, "the worker's re-admission")
    streams.join(REQUEST_TIMEOUT_S + 10)
    assert not streams.is_alive()
    after = _short_requests(gw, model, 4)
    return {
        **marks,
        "reasons": reasons,
        "routed_while_silent": routed,
        "streams_on_silent": on_silent,
        "ended_while_silent": ended_while_silent,
        "silent_for_s": silent_for,
        "readmitted_s": readmitted_s,
        "routed_after": after,
        "outcomes": streams.outcomes,
        "equal_to_uninterrupted": [o.text == t for o, t in zip(streams.outcomes, streams.uninterrupted())],
        "migrated": migrations_metric(gw) - migrated_before,
        "evicted": metric_sum(gw, "sfllm_gateway:worker_calls_evicted_total", worker=silent.target) - evicted_before,
        "connections_lost": metric_sum(gw, "sfllm_gateway:worker_connections_lost_total", worker=silent.target)
        - lost_before,
    }


def _check_round(
    name: str, result: dict, silent: WorkerProcess, other: WorkerProcess, bound_s: tuple[float, float]
) -> None:
    """The guarantees of a silent worker's round: ejected in time and routed around, its streams moved off it in
    time and each completed, token for token the stream it would have been, before the worker answered again.
    `bound_s`: the bounds of its ejection and of its streams' release."""
    ejection_bound_s, release_bound_s = bound_s
    outcomes = result["outcomes"]
    lost_tokens = sum(STREAM_TOKENS - o.tokens for o in outcomes) + sum(not e for e in result["equal_to_uninterrupted"])
    print(
        f"\n{name}: ejected after {result['ejected']:.2f} s ({', '.join(sorted(result['reasons']))}; "
        f"bound {ejection_bound_s:.1f} s), requests meanwhile {result['routed_while_silent'][other.target]:.0f} to "
        f"the other worker and {result['routed_while_silent'][silent.target]:.0f} to it; streams: "
        f"{result['streams_on_silent']} on it when it fell silent, moved off it after {result['released']:.2f} s "
        f"(bound {release_bound_s:.1f} s; calls evicted {result['evicted']:.0f}, connections lost "
        f"{result['connections_lost']:.0f}), migrated {result['migrated']:.0f}; all four ended "
        f"{'while it was silent' if result['ended_while_silent'] else 'after it answered again'}: "
        f"{', '.join(o.kind for o in outcomes)}, equal to an uninterrupted run "
        f"{sum(result['equal_to_uninterrupted'])}/4, tokens lost {lost_tokens}; re-admitted "
        f"{result['readmitted_s']:.2f} s after it answered again (silent {result['silent_for_s']:.1f} s)"
    )
    assert result["streams_on_silent"] > 0  # the silence caught streams mid-way
    assert result["ejected"] < ejection_bound_s
    assert result["reasons"] and result["reasons"] <= SILENCE_REASONS, result["reasons"]
    assert result["routed_while_silent"] == {silent.target: 0, other.target: 4}
    assert result["routed_after"] == {silent.target: 2, other.target: 2}  # back in round robin's turn
    assert result["released"] < release_bound_s
    assert result["migrated"] >= result["streams_on_silent"]  # each moved on from the other worker
    assert result["ended_while_silent"]  # none waited for the worker to answer again
    assert all(o.kind == "completed" for o in outcomes), outcomes
    assert all(result["equal_to_uninterrupted"]) and lost_tokens == 0


def _freezer(worker: WorkerProcess) -> tuple[Callable[[], None], Callable[[], None]]:
    """SIGSTOP and SIGCONT of the worker's front process: alive, its port open, answering nothing."""
    assert worker.proc is not None
    proc = worker.proc
    return (lambda: proc.send_signal(signal.SIGSTOP)), (lambda: proc.send_signal(signal.SIGCONT))


def test_a_partitioned_worker_is_ejected_then_readmitted_once_it_heals(
    namespace: Namespace, workers: list[WorkerProcess], qwen3_path: Path, tmp_path: Path, model_name: str
) -> None:
    other = workers[1]
    cut_off = NamespacedWorker(namespace, Path(qwen3_path), tmp_path, "partitioned", *WORKER_ARGS)
    cut_off.start()
    try:
        cut_off.wait_serving()
        gw = GatewayServer(gateway_config([cut_off.target, other.target], **FAST_HEALTH)).start()
        try:
            gw.wait_healthy(2)
            result = _silent_worker_round(gw, cut_off, other, model_name, namespace.partition, namespace.heal)
            _check_round("network partition", result, cut_off, other, (EJECTION_BOUND_S, RELEASE_BOUND_S))
            assert metric_sum(gw, "sfllm_gateway:worker_ejections_total", worker=other.target) == 0
        finally:
            gw.stop()
    finally:
        cut_off.stop()


def test_a_frozen_worker_is_found_by_keepalive_alone_then_readmitted_once_it_thaws(
    workers: list[WorkerProcess], model_name: str
) -> None:
    """As the partition test, everywhere, with no health check due: the channel's keepalive pings find the frozen
    worker, its connection is closed, its calls fail, and its streams go on from the other worker within the
    keepalive bound. (A health check's ejection evicts them just as well: tests/gateway/test_resilience.py.)"""
    frozen, other = workers
    gw = GatewayServer(gateway_config([frozen.target, other.target], **NO_HEALTH_CHECKS)).start()
    try:
        gw.wait_healthy(2)
        result = _silent_worker_round(gw, frozen, other, model_name, *_freezer(frozen))
        _check_round("SIGSTOP (a frozen worker), keepalive alone", result, frozen, other, (KEEPALIVE_BOUND_S,) * 2)
        assert result["connections_lost"] >= 1  # keepalive closed the connection; no health check failed
        assert not any(r.startswith("health_") for r in result["reasons"]), result["reasons"]
    finally:
        gw.stop()
