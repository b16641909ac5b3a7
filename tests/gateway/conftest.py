"""A real gateway in front of two real worker processes on loopback, serving the tiny Qwen3 checkpoint."""

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from gateway_harness import GatewayServer, WorkerProcess, gateway_config

from worker.client import WorkerClient


@pytest.fixture(scope="package")
def workers(qwen3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    """Two worker processes on the tiny checkpoint, started together; stopped once tests/gateway is done."""
    log_dir = tmp_path_factory.mktemp("worker-logs")
    procs = [WorkerProcess(qwen3_path, log_dir, f"worker{i}") for i in range(2)]
    for proc in procs:
        proc.start()
    try:
        for proc in procs:
            proc.wait_serving()
        yield procs
    finally:
        for proc in procs:
            proc.stop()


@pytest.fixture(scope="package")
def model_name(workers: list[WorkerProcess]) -> str:
    with WorkerClient(workers[0].target, timeout=5) as client:
        return client.model_info().served_model_name


@pytest.fixture(scope="package")
def gateway(workers: list[WorkerProcess]) -> Iterator[GatewayServer]:
    """The round-robin gateway most tests share."""
    server = GatewayServer(gateway_config([w.target for w in workers])).start()
    server.wait_healthy(2)
    yield server
    server.stop()


@pytest.fixture
def client(gateway: GatewayServer) -> openai.OpenAI:
    return gateway.client()
