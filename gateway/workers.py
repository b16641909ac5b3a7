"""The pool of workers: discovery (host:port lists and DNS names), gRPC health checks, load polling.

Each `--workers` entry is resolved to addresses; a name with many addresses (a Kubernetes headless
service) becomes many workers, and is re-resolved periodically. Each worker gets one watcher task
that polls `grpc.health.v1` and `GetLoad`. A worker is admitted to routing once it reports SERVING
and answers GetModelInfo; it is ejected after consecutive failed checks, at once when it answers
NOT_SERVING (a drain, a dead engine), when a request finds it dead or draining, or when its channel
cannot connect (TRANSIENT_FAILURE), and re-admitted when its health check passes again.

A worker can also go silent without closing anything (its process frozen, or cut off by a network
partition): then TCP stays open and no call fails by itself. Two things bound what that costs.
Each channel sends HTTP/2 keepalive pings, and a connection whose ping goes unanswered for
--keepalive-timeout-s is closed: its calls fail with UNAVAILABLE and are retried or migrated, within
--keepalive-time-s + --keepalive-timeout-s of the silence (whatever the health settings). And when the
health checks eject a worker as silent (failed checks, not NOT_SERVING), its calls that have received
nothing for a health timeout are evicted (cancelled) at once, and fail over the same way. A
NOT_SERVING or draining worker's calls are left alone: they finish there or the drain ends them.

Ejection is about whether a worker is up; each worker's circuit breaker (gateway/resilience.py),
fed by the requests' outcomes, is about whether its requests succeed. The pool owns both, and the
retry budget and backoff of the gateway process, but neither drives the other.
"""

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.config import GatewayConfig
from gateway.metrics import GatewayMetrics
from gateway.resilience import Backoff, BreakerSettings, BreakerState, CircuitBreaker, RetryBudget
from gateway.router import Router, WorkerHandle
from protos.sfllm.v1 import worker_pb2, worker_pb2_grpc

log = logging.getLogger("sfllm.gateway")


def channel_options(config: GatewayConfig) -> list[tuple[str, int]]:
    """The options of every worker channel, keepalive from the config.

    HTTP/2 keepalive: a connection that has received nothing for keepalive_time_s is pinged, and closed if the ping
    is not answered within keepalive_timeout_s. The worker answers pings from gRPC's own threads, whatever its Python
    side is busy with, so a loaded worker is not taken for a silent one. Workers permit a ping a second with no calls
    open (worker/server.py); more often, they answer with GOAWAY ("too_many_pings"), hence keepalive_time_s >= 1.
    """
    keepalive_time_ms = round(config.keepalive_time_s * 1000)
    keepalive_timeout_ms = round(config.keepalive_timeout_s * 1000)
    return [
        # a restarted worker should be reachable within about a second, not after gRPC's default backoff (up to 2 min)
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
        ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ("grpc.enable_retries", 0),  # the router retries, on another worker
        ("grpc.keepalive_time_ms", keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),  # between requests too: a silent worker is found before one comes
        ("grpc.http2.max_pings_without_data", 0),  # a server-streaming call sends no data after its request
        # Any ping, not only keepalive's: the flow-control (BDP) ping sent as data arrives may be the one in flight
        # when the worker goes silent, and with one ping in flight at most, keepalive's own waits behind it (1 min by
        # default).
        ("grpc.http2.ping_timeout_ms", keepalive_timeout_ms),
    ]


_UNHEALTHY_AFTER = 2  # consecutive failed health checks before an admitted worker is ejected
# Ejections that say the worker is up and knows it is leaving (NOT_SERVING, draining): its calls are left to end there.
_ALIVE_REASONS = ("health_not_serving", "draining")


class WorkerClient:
    """The gRPC channel to one worker and the stubs on it."""

    def __init__(self, address: str, options: list[tuple[str, int]]) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=options)
        self.worker = worker_pb2_grpc.WorkerStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    async def close(self) -> None:
        await self.channel.close(grace=None)


def split_host_port(entry: str) -> tuple[str, int]:
    """("host", port) from "host:port" or "[v6]:port"."""
    host, _, port = entry.rpartition(":")
    return host.strip("[]"), int(port)


def format_address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


async def resolve(entry: str) -> list[str]:
    """The addresses behind one host:port entry: an IP literal as is, a name through DNS.

    IPv4 addresses are preferred: "localhost" resolves to 127.0.0.1 and ::1, which are one server,
    not two.
    """
    host, port = split_host_port(entry)
    try:
        ipaddress.ip_address(host)
        return [format_address(host, port)]
    except ValueError:
        pass
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    v4 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET})
    v6 = sorted({info[4][0] for info in infos if info[0] == socket.AF_INET6})
    return [format_address(ip, port) for ip in (v4 or v6)]


class WorkerPool:
    """Keeps the router's set of workers in step with DNS and with each worker's health."""

    def __init__(self, config: GatewayConfig, router: Router, metrics: GatewayMetrics) -> None:
        self.config = config
        self.router = router
        self.metrics = metrics
        self._watchers: dict[str, asyncio.Task[None]] = {}
        self._entry_addresses: dict[str, list[str]] = {}
        self._resolver: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()
        self.breaker_settings = BreakerSettings(
            config.breaker_failure_threshold, config.breaker_success_threshold, config.breaker_open_timeout_s
        )
        self.backoff = Backoff(config.retry_backoff_base_s, config.retry_backoff_cap_s)
        self.retry_budget = RetryBudget(
            config.retry_budget_ratio, config.retry_budget_min_per_s, config.retry_budget_window_s
        )

    async def start(self) -> None:
        """Resolve the workers and check each once, so a gateway that starts next to live workers is ready."""
        await self.resolve_all()
        await asyncio.gather(*(self.check(w) for w in list(self.router.workers.values())))
        for worker in list(self.router.workers.values()):
            self._watch(worker)
        self._resolver = asyncio.create_task(self._resolve_loop())

    async def stop(self) -> None:
        tasks = [t for t in (self._resolver, *self._watchers.values(), *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._watchers.clear()
        for worker in list(self.router.workers.values()):
            await worker.client.close()

    async def resolve_all(self) -> None:
        """Re-resolve every entry; add new addresses, drop vanished ones. A failed lookup keeps the old set."""
        for entry in self.config.workers:
            try:
                self._entry_addresses[entry] = await resolve(entry)
            except OSError as exc:
                log.warning("worker lookup failed", extra={"fields": {"entry": entry, "error": str(exc)}})
        wanted = {a for addresses in self._entry_addresses.values() for a in addresses}
        for address in wanted - set(self.router.workers):
            breaker = CircuitBreaker(self.breaker_settings, on_transition=self._breaker_moved(address))
            client = WorkerClient(address, channel_options(self.config))
            worker = WorkerHandle(address=address, client=client, breaker=breaker)
            self.router.add(worker)
            self.metrics.worker_healthy.labels(address).set(0)
            self.metrics.worker_circuit_state.labels(address).set(BreakerState.CLOSED)
            log.info("worker added", extra={"fields": {"worker": address}})
            if self._resolver is not None:  # after start(): watch it now
                self._watch(worker)
        for address in set(self.router.workers) - wanted:
            self._retire(address)

    def _retire(self, address: str) -> None:
        worker = self.router.remove(address)
        task = self._watchers.pop(address, None)
        if task is not None:
            task.cancel()
        self.metrics.forget_worker(address)
        log.info("worker removed", extra={"fields": {"worker": address}})
        if worker is not None:
            # in-flight streams keep the channel until they end; close it once they have
            self._spawn(self._close_when_idle(worker))

    def _breaker_moved(self, address: str) -> Callable[[BreakerState, BreakerState], None]:
        def moved(old: BreakerState, new: BreakerState) -> None:
            self.metrics.worker_circuit_state.labels(address).set(new)
            self.metrics.worker_circuit_transitions.labels(address, old.name.lower(), new.name.lower()).inc()
            level = logging.WARNING if new is BreakerState.OPEN else logging.INFO
            log.log(level, "circuit breaker " + new.name.lower(), extra={"fields": {"worker": address}})

        return moved

    async def _close_when_idle(self, worker: WorkerHandle) -> None:
        while worker.in_flight > 0:
            await asyncio.sleep(1.0)
        await worker.client.close()

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _watch(self, worker: WorkerHandle) -> None:
        if worker.address not in self._watchers:
            self._watchers[worker.address] = asyncio.create_task(self._watch_loop(worker))
            self._spawn(self._watch_channel(worker))

    async def _resolve_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.resolve_interval_s)
            await self.resolve_all()

    async def _watch_loop(self, worker: WorkerHandle) -> None:
        last_health = time.monotonic()
        while True:
            # an ejected worker is probed at the load interval, so a restarted one rejoins quickly
            if not worker.healthy or time.monotonic() - last_health >= self.config.health_interval_s:
                await self.check(worker)
                last_health = time.monotonic()
            # No load poll after a failed check: it would wait out a second timeout before the next check.
            if worker.healthy and worker.failed_checks == 0:
                await self.poll_load(worker)
            worker.breaker.state  # noqa: B018 (an open breaker past its timeout turns half-open, and says so)
            await asyncio.sleep(self.config.load_interval_s)

    async def check(self, worker: WorkerHandle) -> bool:
        """One health check; admits or ejects the worker accordingly. Returns the new health."""
        timeout = self.config.health_timeout_s
        try:
            reply = await worker.client.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            serving = reply.status == health_pb2.HealthCheckResponse.SERVING
            reason = "not_serving"
        except grpc.aio.AioRpcError as exc:
            serving, reason = False, exc.code().name.lower()
        if serving and not worker.healthy:
            try:
                info = await worker.client.worker.GetModelInfo(worker_pb2.GetModelInfoRequest(), timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                log.warning(
                    "GetModelInfo failed", extra={"fields": {"worker": worker.address, "code": exc.code().name}}
                )
                return False
            worker.model = info.served_model_name
            worker.max_context_length = info.max_context_length or None
            worker.info = info
            worker.failed_checks = 0
            worker.healthy = True
            worker.admitted_at = time.monotonic()
            if worker.breaker is not None:
                worker.breaker.readmitted()
            self.metrics.worker_healthy.labels(worker.address).set(1)
            log.info("worker admitted", extra={"fields": {"worker": worker.address, "model": worker.model}})
        elif serving:
            worker.failed_checks = 0
        elif worker.healthy:
            worker.failed_checks += 1
            # NOT_SERVING is the worker's own word (draining, or its engine died): no second check needed
            if worker.failed_checks >= _UNHEALTHY_AFTER or reason == "not_serving":
                self.eject(worker, f"health_{reason}")
        return worker.healthy

    async def poll_load(self, worker: WorkerHandle) -> None:
        """Refresh the worker's load report; a failed poll leaves the old numbers (health decides ejection)."""
        asked_at = time.monotonic()
        try:
            load = await worker.client.worker.GetLoad(worker_pb2.GetLoadRequest(), timeout=self.config.health_timeout_s)
        except grpc.aio.AioRpcError:
            return
        worker.load.num_running = load.num_requests_running
        worker.load.num_waiting = load.num_requests_waiting
        worker.load.kv_cache_usage = load.kv_cache_usage
        if load.num_requests_waiting == 0:
            worker.has_room(asked_at)  # an empty queue has room, whatever it refused before this poll

    async def _watch_channel(self, worker: WorkerHandle) -> None:
        """Count the worker's lost connections, and eject it when its channel fails to connect (TRANSIENT_FAILURE):
        between health checks, a refused or reset connection takes it out of routing at once."""
        channel = worker.client.channel
        state = channel.get_state(try_to_connect=False)
        while True:
            await channel.wait_for_state_change(state)
            old, state = state, channel.get_state(try_to_connect=False)
            if old is grpc.ChannelConnectivity.READY:
                self.metrics.worker_connections_lost.labels(worker.address).inc()
                log.info(
                    "worker connection lost",
                    extra={"fields": {"worker": worker.address, "state": state.name.lower()}},
                )
            if state is grpc.ChannelConnectivity.TRANSIENT_FAILURE:
                self.eject(worker, "channel_transient_failure")
            elif state is grpc.ChannelConnectivity.SHUTDOWN:
                return

    def eject(self, worker: WorkerHandle, reason: str) -> None:
        """Take a worker out of routing until a health check passes again; a silent one's silent calls are evicted."""
        if not worker.healthy:
            return
        worker.healthy = False
        worker.failed_checks = 0
        self.metrics.worker_healthy.labels(worker.address).set(0)
        self.metrics.worker_ejections.labels(worker.address, reason).inc()
        log.warning("worker ejected", extra={"fields": {"worker": worker.address, "reason": reason}})
        if reason not in _ALIVE_REASONS:
            self.evict_silent_calls(worker, reason)

    def evict_silent_calls(self, worker: WorkerHandle, reason: str) -> int:
        """Cancel the worker's calls that have received nothing for a health timeout, so that they are retried or
        migrated now instead of waiting on the worker; calls still receiving are left to go on. Returns how many."""
        now = time.monotonic()
        silent = [a for a in worker.open_calls if now - a.last_message_at >= self.config.health_timeout_s]
        for attempt in silent:
            attempt.evict(reason)
        if silent:
            self.metrics.worker_calls_evicted.labels(worker.address).inc(len(silent))
            log.warning(
                "evicting calls from a silent worker",
                extra={"fields": {"worker": worker.address, "reason": reason, "calls": len(silent)}},
            )
        return len(silent)

    async def abort(self, worker: WorkerHandle, request_ids: list[str]) -> None:
        """Best-effort Abort; the cancelled call already tells the worker, this makes sure of it."""
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.TimeoutError):
            await worker.client.worker.Abort(worker_pb2.AbortRequest(request_ids=request_ids), timeout=2.0)

    def abort_in_background(self, worker: WorkerHandle, request_ids: list[str]) -> None:
        self._spawn(self.abort(worker, request_ids))
