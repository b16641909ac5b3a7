"""The worker: a grpc.aio front (Worker, health, reflection, metrics) and its engine and detokenizer processes.

The front process tokenizes and validates, streams responses and serves /metrics; the engine
process (worker/engine_server.py) owns the device and steps; the detokenizer process
(worker/detokenizer_process.py) turns tokens into text. See worker/messages.py for what crosses.
"""

import asyncio
import concurrent.futures
import logging
import signal
import sys
import threading
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.sfllm.logs import configure_logging
from protos.sfllm.v1 import worker_pb2, worker_pb2_grpc
from protos.sfllm.v1.wire import DRAINED_ERROR
from sfllm_core.errors import InvalidRequestError
from worker.children import settle_heap
from worker.config import WorkerConfig
from worker.engine_client import EngineClient
from worker.metrics import WorkerMetrics
from worker.service import WorkerService

log = logging.getLogger("sfllm.worker")

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name  # "sfllm.v1.Worker"
# Health stays NOT_SERVING this long after a child process died, so that routers see why before the port closes.
FAILED_GRACE_S = 1.0


class WorkerServer:
    """One worker: start() binds and reports NOT_SERVING, load() brings the engine up, drain() and stop() end it."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.metrics = WorkerMetrics()
        self.service = WorkerService(config, self.metrics)
        self.health = health.aio.HealthServicer()
        self.engine: EngineClient | None = None
        self.failed = asyncio.Event()  # set when a child process died: the worker should exit non-zero
        self.port = 0
        self.metrics_port = 0
        # SO_REUSEPORT off: a second worker on a taken port must fail, not silently share its traffic.
        self._server = grpc.aio.server(
            options=[
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                # Gateways ping every 2 s of silence, calls open or not (gateway/workers.py), to find a frozen or
                # cut-off worker in seconds. gRPC's default answers pings that come more often than every 5
                # minutes without calls with GOAWAY ("too_many_pings"): permit one a second.
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 1000),
            ]
        )
        worker_pb2_grpc.add_WorkerServicer_to_server(self.service, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection((SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def start(self) -> None:
        """Bind the gRPC and metrics ports; health says NOT_SERVING until load() finishes."""
        await self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        self.port = self._server.add_insecure_port(f"{self.config.host}:{self.config.port}")
        await self._server.start()
        self.metrics_port = self.metrics.serve(self.config.metrics_host, self.config.metrics_port)
        log.info("listening", extra={"fields": {"port": self.port, "metrics_port": self.metrics_port}})

    async def load(self) -> None:
        """Start the engine and detokenizer processes and load the tokenizer beside them, then report SERVING."""
        from sfllm_core.models.loader import load_tokenizer, resolve_model_path, served_model_name

        config = self.config
        path = await asyncio.to_thread(resolve_model_path, config.model)
        name = config.served_model_name or served_model_name(config.model, path)
        engine = self.engine = EngineClient(config)
        engine.on_failure = self._on_engine_failure
        try:
            engine.start_engine(path, name)
            tokenizer = await asyncio.to_thread(load_tokenizer, path)
            engine.start_detokenizer(tokenizer)
            info = await engine.ready()
        except BaseException:
            await engine.stop()
            raise
        self.service.attach(engine, tokenizer, path)
        settle_heap("front")
        self.metrics.bind_engine(info.served_model_name, lambda: engine.load)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={
                "fields": {
                    "model": info.served_model_name,
                    "max_context_length": info.limits.max_context_length,
                    "port": self.port,
                    "pids": engine.pids,
                }
            },
        )

    def _on_engine_failure(self, message: str) -> None:
        log.error("NOT_SERVING: a worker process died", extra={"fields": {"error": message}})
        asyncio.ensure_future(self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        self.failed.set()

    async def drain(self, timeout: float) -> None:
        """Stop taking work, let in-flight streams finish for up to `timeout` seconds, then abort the rest.

        The aborted streams end with FINISH_REASON_ABORT and error DRAINED_ERROR, which tells a router
        that the worker left rather than failed them, so that it may resume them elsewhere.
        """
        await self.health.enter_graceful_shutdown()  # NOT_SERVING for good: routers stop sending work
        self.service.begin_drain()
        log.info("draining", extra={"fields": {"timeout_s": timeout}})
        if not await self.service.wait_idle(timeout):
            log.warning("drain timed out; aborting the remaining requests")
            self.service.abort_all(DRAINED_ERROR)
            await self.service.wait_idle(5.0)

    async def stop(self, grace: float = 1.0) -> None:
        """Close the gRPC server, the engine's processes and the metrics endpoint."""
        await self._server.stop(grace)
        if self.engine is not None:
            await self.engine.stop()
        self.metrics.close()
        log.info("stopped")


async def serve(config: WorkerConfig) -> int:
    """Run a worker until SIGTERM or SIGINT, then drain and exit; returns the process exit code.

    If the engine or detokenizer process dies, the worker reports NOT_SERVING, ends every stream
    with an error, and exits with 1.
    """
    server = WorkerServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    load = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    failed = asyncio.create_task(server.failed.wait())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if load.done() and load.exception() is not None:
        log.error("the model failed to load", exc_info=load.exception())
        stopping.cancel()
        failed.cancel()
        await server.stop(0)
        return 1
    if not load.done():  # a signal while loading: nothing is in flight, so just wait the load out
        await asyncio.gather(load, return_exceptions=True)
    await asyncio.wait({stopping, failed}, return_when=asyncio.FIRST_COMPLETED)
    if failed.done():
        stopping.cancel()
        await asyncio.sleep(FAILED_GRACE_S)
        await server.stop(0)
        return 1
    failed.cancel()
    await server.drain(config.drain_timeout_s)
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """The `sfllm-worker` command."""
    config = WorkerConfig.from_cli(argv)
    configure_logging(config.log_level)
    try:
        config.engine_config().validate()
    except InvalidRequestError as exc:
        print(f"sfllm-worker: {exc}", file=sys.stderr)
        sys.exit(2)
    sys.exit(asyncio.run(serve(config)))


class BackgroundWorker:
    """A worker whose front runs on its own event-loop thread, for tests and for embedding in another program."""

    def __init__(self, config: WorkerConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sfllm-worker", daemon=True)
        self._thread.start()
        self.server = self._call(self._create(config))

    async def _create(self, config: WorkerConfig) -> WorkerServer:
        server = WorkerServer(config)
        await server.start()
        return server

    def _call(self, coro: object, timeout: float | None = None) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)  # type: ignore[arg-type]

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def load(self, timeout: float | None = None) -> None:
        """Load the engine; returns once health says SERVING."""
        self._call(self.server.load(), timeout)

    def drain(self, timeout: float) -> "concurrent.futures.Future[None]":
        """Begin draining; the returned future completes when drained."""
        return asyncio.run_coroutine_threadsafe(self.server.drain(timeout), self._loop)

    def stop(self) -> None:
        """Stop the server, its processes and its loop thread."""
        self._call(self.server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


if __name__ == "__main__":
    main()
