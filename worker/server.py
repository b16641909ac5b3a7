"""The worker process: a grpc.aio server (Worker, health, reflection) and a metrics endpoint around one engine."""

import asyncio
import concurrent.futures
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from protos.sfllm.v1 import worker_pb2, worker_pb2_grpc
from sfllm_core.errors import InvalidRequestError
from worker.config import WorkerConfig
from worker.logs import configure_logging
from worker.metrics import WorkerMetrics
from worker.service import WorkerService

if TYPE_CHECKING:
    from sfllm_core.engine.inference_engine import InferenceEngine

log = logging.getLogger("sfllm.worker")

SERVICE_NAME = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name  # "sfllm.v1.Worker"


def _load_engine(config: WorkerConfig) -> "InferenceEngine":
    from sfllm_core.engine.inference_engine import InferenceEngine  # heavy: torch and the model code

    return InferenceEngine(config=config.engine_config())


class WorkerServer:
    """One worker: start() binds and reports NOT_SERVING, load() brings the engine up, drain() and stop() end it."""

    def __init__(self, config: WorkerConfig, engine_factory: Callable[[], "InferenceEngine"] | None = None) -> None:
        self.config = config
        self._engine_factory = engine_factory or (lambda: _load_engine(config))
        self.metrics = WorkerMetrics()
        self.service = WorkerService(config, self.metrics)
        self.health = health.aio.HealthServicer()
        self.engine: InferenceEngine | None = None
        self.port = 0
        self.metrics_port = 0
        # SO_REUSEPORT off: a second worker on a taken port must fail, not silently share its traffic.
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
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
        """Build the engine off the event loop, then report SERVING."""
        engine = await asyncio.to_thread(self._engine_factory)
        self.engine = engine
        self.service.attach(engine)
        self.metrics.bind_engine(engine.model_name, engine.get_load)
        await self._set_health(health_pb2.HealthCheckResponse.SERVING)
        log.info(
            "serving",
            extra={
                "fields": {
                    "model": engine.model_name,
                    "max_context_length": engine.max_context_length,
                    "port": self.port,
                }
            },
        )

    async def drain(self, timeout: float) -> None:
        """Stop taking work, let in-flight streams finish for up to `timeout` seconds, then abort the rest."""
        await self.health.enter_graceful_shutdown()  # NOT_SERVING for good: routers stop sending work
        self.service.begin_drain()
        log.info("draining", extra={"fields": {"timeout_s": timeout}})
        if not await self.service.wait_idle(timeout):
            log.warning("drain timed out; aborting the remaining requests")
            self.service.abort_all()
            await self.service.wait_idle(5.0)

    async def stop(self, grace: float = 1.0) -> None:
        """Close the gRPC server, the engine and the metrics endpoint."""
        await self._server.stop(grace)
        if self.engine is not None:
            await asyncio.to_thread(self.engine.shutdown)
        self.metrics.close()
        log.info("stopped")


async def serve(config: WorkerConfig) -> int:
    """Run a worker until SIGTERM or SIGINT, then drain and exit; returns the process exit code."""
    server = WorkerServer(config)
    await server.start()
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    load = asyncio.create_task(server.load())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({load, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if load.done() and load.exception() is not None:
        log.error("the model failed to load", exc_info=load.exception())
        stopping.cancel()
        await server.stop(0)
        return 1
    await stopping
    if not load.done():  # a signal while loading: nothing is in flight, so just wait the load out
        await asyncio.gather(load, return_exceptions=True)
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
    """A worker on its own event-loop thread, for tests and for embedding in another program."""

    def __init__(self, config: WorkerConfig, engine_factory: Callable[[], "InferenceEngine"] | None = None) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sfllm-worker", daemon=True)
        self._thread.start()
        self.server = self._call(self._create(config, engine_factory))

    async def _create(
        self, config: WorkerConfig, engine_factory: Callable[[], "InferenceEngine"] | None
    ) -> WorkerServer:
        server = WorkerServer(config, engine_factory)
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
        """Stop the server and its loop thread."""
        self._call(self.server.stop(0))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


if __name__ == "__main__":
    main()
