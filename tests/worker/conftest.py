"""Real workers on loopback around tiny random-weight checkpoints (the qwen3_path fixture of tests/conftest.py).

Each worker's front runs on a thread of the test process; its engine and detokenizer are real
child processes, as in production.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sfllm_core.engine.inference_engine import InferenceEngine
from worker.client import WorkerClient
from worker.config import WorkerConfig
from worker.server import BackgroundWorker


def worker_config(model: Path, **overrides: object) -> WorkerConfig:
    """A worker on ephemeral loopback ports, float32 on the CPU."""
    settings: dict = dict(model=str(model), host="127.0.0.1", port=0, metrics_host="127.0.0.1", metrics_port=0)
    settings.update(dtype="float32", device="cpu", log_level="info")
    settings.update(overrides)
    return WorkerConfig(**settings)


@pytest.fixture
def make_worker(qwen3_path: Path) -> Iterator[Callable[..., BackgroundWorker]]:
    """Start workers with special settings (pace: seconds each engine step sleeps); stopped after the test."""
    started: list[BackgroundWorker] = []

    def make(pace: float = 0.0, load: bool = True, **overrides: object) -> BackgroundWorker:
        config = worker_config(qwen3_path, debug_step_delay_s=pace, **overrides)
        worker = BackgroundWorker(config)
        started.append(worker)
        if load:
            worker.load(timeout=120)
        return worker

    yield make
    for worker in started:
        worker.stop()


@pytest.fixture(scope="session")
def worker(qwen3_path: Path) -> Iterator[BackgroundWorker]:
    """One worker shared by the tests that need no special settings."""
    w = BackgroundWorker(worker_config(qwen3_path))
    w.load(timeout=120)
    yield w
    w.stop()


@pytest.fixture
def client(worker: BackgroundWorker) -> Iterator[WorkerClient]:
    with WorkerClient(worker.target, timeout=60) as c:
        yield c


@pytest.fixture(scope="session")
def reference_engine(qwen3_path: Path) -> InferenceEngine:
    """The same checkpoint in a plain offline engine: what the worker's tokens must match."""
    return InferenceEngine(model_path=str(qwen3_path), dtype="float32", device="cpu")
