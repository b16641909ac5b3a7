"""Fault tests through real processes: two workers on the tiny Qwen3 checkpoint, shared by the package.

Each test runs at CI's size; its full size is the same test with id `full`, marked `reliability` and
skipped unless asked for: `pytest -m reliability tests/reliability`.
"""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from gateway_harness import WorkerProcess
from reliability_harness import CI, FULL, WORKER_ARGS

from worker.client import WorkerClient


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "sizes" in metafunc.fixturenames:
        metafunc.parametrize("sizes", [CI, pytest.param(FULL, marks=pytest.mark.reliability)], ids=["ci", "full"])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "reliability" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="full size: run with -m reliability")
    for item in items:
        if item.get_closest_marker("reliability") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="package")
def pair(qwen3_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    """Two workers (see WORKER_ARGS), started together; stopped once the package is done."""
    log_dir = tmp_path_factory.mktemp("reliability-logs")
    workers = [WorkerProcess(qwen3_path, log_dir, f"worker{i}", *WORKER_ARGS) for i in range(2)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.wait_serving()
        yield workers
    finally:
        for worker in workers:
            worker.stop()


@pytest.fixture
def workers(pair: list[WorkerProcess]) -> Iterator[list[WorkerProcess]]:
    """The shared pair, each running and serving again after the test (a killed or drained one restarted)."""
    yield pair
    for worker in pair:
        if worker.proc is not None and worker.proc.poll() is None and not _serving(worker):
            worker.proc.wait(60)  # draining (a test that failed before it ended): let it exit, then restart it
        if worker.proc is None or worker.proc.poll() is not None:
            worker.start()
    for worker in pair:
        worker.wait_serving()


def _serving(worker: WorkerProcess) -> bool:
    with WorkerClient(worker.target, timeout=2) as client, contextlib.suppress(Exception):
        return client.health() == "SERVING"
    return False


@pytest.fixture(scope="package")
def model_name(pair: list[WorkerProcess]) -> str:
    with WorkerClient(pair[0].target, timeout=5) as client:
        return client.model_info().served_model_name
