"""Test harness: worker processes and an in-process gateway on loopback (used by conftest and the tests)."""

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.config import GatewayConfig
from worker.client import WorkerClient

REPO = Path(__file__).resolve().parents[1]
API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WorkerProcess:
    """`python -m worker` as a subprocess on a fixed loopback port, so it can be killed and restarted there."""

    def __init__(self, model: Path, log_dir: Path, name: str, *extra: str) -> None:
        self.model = model
        self.port = free_port()
        self.extra = list(extra)
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [sys.executable, "-m", "worker", "--model", str(self.model), "--host", "127.0.0.1"]
        args += ["--port", str(self.port), "--metrics-port", "0", "--dtype", "float32", "--device", "cpu"]
        # Info: the one line per request, which tests read back (request_records).
        args += ["--log-level", "info", *self.extra]
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(args, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
        log.close()

    def wait_serving(self, timeout: float = 120.0) -> None:
        with WorkerClient(self.target, timeout=5) as client:
            deadline = time.monotonic() + timeout
            while True:
                assert self.proc is not None and self.proc.poll() is None, self.log_path.read_text()[-3000:]
                with contextlib.suppress(Exception):
                    if client.health() == "SERVING":
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {self.target} not serving: {self.log_path.read_text()[-3000:]}")
                time.sleep(0.1)

    def request_records(self) -> list[dict]:
        """The worker's per-request log records so far (JSON lines whose msg is "generate")."""
        records = []
        for line in self.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("msg") == "generate":
                    records.append(record)
        return records

    def kill(self) -> None:
        """SIGKILL: the abrupt death of a worker (its sockets close, nothing drains)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def load(self) -> object:
        with WorkerClient(self.target, timeout=5) as client:
            return client.load()


class GatewayServer:
    """The gateway app under uvicorn on a loopback port, on a background thread of this process."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.app = create_app(config)
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=config.port, log_level="warning", access_log=False)
        )
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config.port}"

    def start(self) -> "GatewayServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def client(self, **kwargs: object) -> openai.OpenAI:
        """The official SDK pointed at this gateway; no SDK retries, so statuses are seen as sent."""
        settings: dict = {"base_url": self.url + "/v1", "api_key": API_KEY, "max_retries": 0, "timeout": 60.0}
        settings.update(kwargs)
        return openai.OpenAI(**settings)

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics, keyed by (name, sorted labels)."""
        text = httpx.get(self.url + "/metrics").text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def routed(self) -> dict[str, float]:
        """Worker calls routed so far, by worker address (0 for workers never chosen)."""
        counts = dict.fromkeys(self.app.state.router.workers, 0.0)
        for (name, labels), value in self.metrics().items():
            if name == "sfllm_gateway:routed_requests_total":
                counts[dict(labels)["worker"]] = value
        return counts

    def wait_healthy(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.app.state.router.healthy_workers()) < count:
            assert time.monotonic() < deadline, f"fewer than {count} healthy workers after {timeout}s"
            time.sleep(0.05)


@contextlib.contextmanager
def worker_behind_gateway(
    model: Path, log_dir: Path, name: str, *worker_args: str
) -> Iterator[tuple[WorkerProcess, GatewayServer]]:
    """One worker process with these flags and a gateway of its own over it, both serving; stopped after."""
    worker = WorkerProcess(model, log_dir, name, *worker_args)
    worker.start()
    try:
        worker.wait_serving()
        gateway = GatewayServer(gateway_config([worker.target])).start()
        try:
            gateway.wait_healthy(1)
            yield worker, gateway
        finally:
            gateway.stop()
    finally:
        worker.stop()


def gateway_config(workers: list[str], **overrides: object) -> GatewayConfig:
    settings: dict = {"workers": workers, "port": free_port(), "api_keys": [API_KEY], "load_interval_s": 0.1}
    settings.update(overrides)
    config = GatewayConfig(**settings)
    config.validate()
    return config
