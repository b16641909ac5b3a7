"""Serving through a rolling restart: bench/serve.py's streaming load at a steady rate, through a gateway over two
workers, while each worker in turn gets SIGTERM (it drains), exits, is restarted and is admitted again.

Every request is sent as bench/serve.py sends it (its `openai_request`, Poisson arrivals) with ignore_eos, so each
must end with exactly its output length. Each ends as one of:
  completed  every token, on one worker (or retried before its first token: the client cannot tell);
  migrated   every token, the stream moved to another worker mid-way (the gateway's request line says so);
  refused    an HTTP error status before the stream (429 when every queue is full);
  errored    an error event in the stream;
  hung       not ended within --request-timeout-s;
  lost       ended without an error, yet short of its tokens.
TTFT and ITL percentiles are given during the restarts (each from its SIGTERM to the gateway's admission of the
restarted worker: TTFT by when the request was sent, ITL by when the gap ended) and outside them. Exits 1 if any
request failed (refused, errored, hung or lost).

  python bench/reliability.py                  # the tiny random Qwen3 of the tests, on the CPU (about 2 minutes)
  python bench/reliability.py --model /models/Qwen3-0.6B --device cuda --dtype bfloat16 \\
      --request-rate 20 --output-len 64:1024 --worker-args="--drain-timeout-s 5" --json rolling.json
"""

import argparse
import asyncio
import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve  # noqa: E402  (bench/serve.py, the load generator)

REPO = Path(__file__).resolve().parents[1]
# The tiny model's workers: a sleep before each step (--debug-step-delay-s), so that on the CPU the longer streams
# outlast the drain and have to be migrated; queues deep enough for the survivor to take the whole load.
TINY_WORKER_ARGS = (
    "--max-num-seqs 16 --max-waiting 64 --max-context-length 512 --max-num-batched-tokens 256 "
    "--debug-step-delay-s 0.01 --drain-timeout-s 2"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class Worker:
    """`python -m worker` on a fixed loopback port, so that it can be stopped and started again there."""

    def __init__(self, args: argparse.Namespace, name: str, log_dir: Path) -> None:
        self.args, self.name = args, name
        self.port = free_port()
        self.log_path = log_dir / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        a = self.args
        cmd = [sys.executable, "-m", "worker", "--model", a.model, "--host", "127.0.0.1", "--port", str(self.port)]
        cmd += ["--metrics-port", "0", "--device", a.device, "--dtype", a.dtype, "--log-level", "info"]
        cmd += shlex.split(a.worker_args)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)

    def serving(self) -> bool:
        from worker.client import WorkerClient

        try:
            with WorkerClient(self.target, timeout=2) as client:
                return client.health() == "SERVING"
        except Exception:
            return False

    def wait_serving(self, timeout: float = 600.0) -> None:
        def up() -> bool:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.log_path.read_text()[-2000:]}")
            return self.serving()

        wait_until(up, timeout, f"{self.name} to serve")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class Gateway:
    """`python -m gateway` over the workers, logging its one line per request to a file."""

    def __init__(self, args: argparse.Namespace, workers: list[Worker], log_dir: Path) -> None:
        self.port = free_port()
        self.log_path = log_dir / "gateway.log"
        cmd = [sys.executable, "-m", "gateway", "--workers", ",".join(w.target for w in workers)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--log-level", "info", *shlex.split(args.gateway_args)]
        env = {**os.environ, "SFLLM_API_KEY": ""}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def metrics(self) -> dict[tuple[str, tuple], float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=5).text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def admitted(self, worker: Worker) -> bool:
        import httpx

        try:
            metrics = self.metrics()
        except httpx.TransportError:  # not listening yet
            return False
        return metrics.get(("sfllm_gateway:worker_healthy", (("worker", worker.target),)), 0.0) == 1.0

    def request_lines(self) -> list[dict]:
        lines = []
        for line in self.log_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("msg") == "request":
                lines.append(record)
        return lines

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@dataclass
class Restart:
    """One worker's turn: SIGTERM at `began`, exited (with `exit_code`) at `exited`, admitted again at `back`."""

    worker: str
    began: float = 0.0
    exited: float = 0.0
    back: float = 0.0
    exit_code: int | None = None


@dataclass
class Sent:
    """One request as bench/serve.py measured it, and whether it hung."""

    request: serve.Request
    result: serve.Result = field(default_factory=serve.Result)
    hung: bool = False


def roll(workers: list[Worker], gateway: Gateway, restarts: list[Restart], args: argparse.Namespace) -> None:
    """Each worker in turn: SIGTERM, wait for it to exit, start it again, wait until the gateway routes to it."""
    time.sleep(args.warmup_s)
    for i, worker in enumerate(workers):
        if i:
            time.sleep(args.gap_s)
        turn = Restart(worker.name, began=time.monotonic())
        restarts.append(turn)
        assert worker.proc is not None
        worker.proc.send_signal(signal.SIGTERM)
        turn.exit_code = worker.proc.wait(600)
        turn.exited = time.monotonic()
        worker.start()
        worker.wait_serving()
        wait_until(lambda w=worker: gateway.admitted(w), 120, f"the gateway to admit {worker.name} again")
        turn.back = time.monotonic()
    time.sleep(args.tail_s)


async def load(
    conf: dict, requests: list[serve.Request], stop: threading.Event, args: argparse.Namespace
) -> list[Sent]:
    """Poisson arrivals at --request-rate until `stop` (requests reused in turn), each through bench/serve.py."""
    rng = random.Random(args.seed)
    sent: list[Sent] = []
    tasks: list[asyncio.Task[None]] = []
    async with serve.openai_session() as http:

        async def one(item: Sent) -> None:
            try:  # item.result is filled in place: a hung request keeps what it got before the timeout
                await asyncio.wait_for(
                    serve.openai_request(http, conf, item.request, item.result), args.request_timeout_s
                )
            except TimeoutError:
                item.hung = True
                item.result.end = time.monotonic()

        n = 0
        while not stop.is_set():
            item = Sent(requests[n % len(requests)])
            n += 1
            sent.append(item)
            tasks.append(asyncio.create_task(one(item)))
            await asyncio.sleep(rng.expovariate(args.request_rate))
        await asyncio.gather(*tasks)
    return sent


def percentiles(values: list[float]) -> dict[str, float]:
    s = serve._stats(values)
    return {k: round(v, 1) for k, v in s.items()}


def figures(sent: list[Sent], restarts: list[Restart], migrated: int) -> dict:
    """Outcomes, and TTFT/ITL during the restarts (a request sent in a window; a gap ending in one) and outside."""
    windows = [(r.began, r.back) for r in restarts]

    def during(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    kinds: Counter = Counter()
    for item in sent:
        r = item.result
        if item.hung:
            kinds["hung"] += 1
        elif not r.ok:
            kinds["refused" if r.error.startswith("HTTP ") else "errored"] += 1
        elif r.output_tokens != item.request.output_len:
            kinds["lost"] += 1
        else:
            kinds["completed"] += 1
    hung = [i for i in sent if i.hung]
    refused = [i for i in sent if not i.hung and not i.result.ok and i.result.error.startswith("HTTP ")]
    ok = [i for i in sent if i.result.ok and not i.hung]
    split: dict[str, dict[str, list[float]]] = {"during": {"ttft": [], "itl": []}, "outside": {"ttft": [], "itl": []}}
    for item in ok:
        r = item.result
        split["during" if during(r.start) else "outside"]["ttft"].append(r.ttft)
        for a, b in zip(r.chunk_times, r.chunk_times[1:]):
            split["during" if during(b) else "outside"]["itl"].append(b - a)
    return {
        "requests": len(sent),
        "completed": kinds["completed"] - migrated,
        "migrated": migrated,
        "refused": kinds["refused"],
        "errored": kinds["errored"],
        "hung": kinds["hung"],
        "lost": kinds["lost"],
        "ttft_max_s": round(max((i.result.ttft for i in ok), default=0.0), 1),
        # where the hung ones were when the timeout came: still waiting to start, or streaming (after how long a wait)
        "hung_streaming": sum(1 for i in hung if i.result.chunk_times),
        "hung_waited_s": {
            k: round(v / 1000, 1)
            for k, v in percentiles(
                [i.result.chunk_times[0] - i.result.start for i in hung if i.result.chunk_times]
            ).items()
        },  # fmt: skip
        "refused_statuses": dict(Counter(i.result.error.split(":", 1)[0].removeprefix("HTTP ") for i in refused)),
        # how long a refused request waited for its refusal: shedding should be prompt
        "refusal_s": {k: round(v / 1000, 2) for k, v in percentiles([i.result.latency for i in refused]).items()}
        | {"max": round(max((i.result.latency for i in refused), default=0.0), 2)},
        "errors": sorted({i.result.error for i in sent if not i.result.ok and i.result.error})[:5],
        **{
            f"{name}_ms_{where}": percentiles(split[where][name]) | {"n": len(split[where][name])}
            for where in ("during", "outside")
            for name in ("ttft", "itl")
        },
    }


def tiny_model(root: Path) -> str:
    sys.path.insert(0, str(REPO / "tests"))
    from checkpoints import make_qwen3_checkpoint

    return str(make_qwen3_checkpoint(root / "qwen3-tiny"))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder or .gguf (default: the tests' tiny random Qwen3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--worker-args", default=None, help=f"more worker flags (default for the tiny model: "
                   f"{TINY_WORKER_ARGS!r})")  # fmt: skip
    p.add_argument("--gateway-args", default="", help="more gateway flags")
    p.add_argument("--request-rate", type=float, default=1.0, help="Poisson arrivals per second")
    p.add_argument("--input-len", type=serve.parse_range, default=(16, 96))
    p.add_argument("--output-len", type=serve.parse_range, default=(16, 320))
    p.add_argument("--id-range", type=int, default=300, help="prompt token ids from [0, id-range): inside the vocab")
    p.add_argument("--warmup-s", type=float, default=15.0, help="load before the first SIGTERM")
    p.add_argument("--gap-s", type=float, default=10.0, help="load between one worker's return and the next SIGTERM")
    p.add_argument("--tail-s", type=float, default=15.0, help="load after the last worker's return")
    p.add_argument("--request-timeout-s", type=float, default=120.0, help="a request not ended by then is hung")
    p.add_argument(
        "--accept-refusals",
        action="store_true",
        help="past capacity: a 429 is load shed, not a failure (exit 1 only for errored, hung or lost requests, "
        "or a refusal slower than --max-refusal-s)",
    )
    p.add_argument("--max-refusal-s", type=float, default=30.0, help="with --accept-refusals: the slowest 429 allowed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--log-dir", default=None, help="keep the workers' and the gateway's logs here (default: dropped)")
    return p


def run(args: argparse.Namespace, root: Path) -> dict:
    """Start two workers and a gateway, roll the workers under the load, stop everything; returns the figures."""
    workers = [Worker(args, f"worker{i}", root) for i in range(2)]
    gateway: Gateway | None = None
    try:
        for w in workers:
            w.start()
        for w in workers:
            w.wait_serving()
        gateway = Gateway(args, workers, root)
        wait_until(lambda: all(gateway.admitted(w) for w in workers), 120, "the gateway to admit both workers")
        base_url = gateway.url + "/v1"
        model = serve.default_model(argparse.Namespace(backend="openai", base_url=base_url, api_key=None))
        conf = {"backend": "openai", "base_url": base_url, "model": model, "api_key": None, "temperature": 0.0,
                "ignore_eos": True}  # fmt: skip
        requests = serve.random_requests(256, args.input_len, args.output_len, "ids", None, args.id_range, args.seed)
        restarts: list[Restart] = []
        stop = threading.Event()
        failure: list[BaseException] = []

        def roller() -> None:
            try:
                roll(workers, gateway, restarts, args)
            except BaseException as exc:  # raised below, once the load has ended
                failure.append(exc)
            finally:
                stop.set()

        thread = threading.Thread(target=roller, daemon=True)
        started = time.monotonic()
        thread.start()
        sent = asyncio.run(load(conf, requests, stop, args))
        thread.join()
        if failure:
            raise failure[0]
        lines = gateway.request_lines()
        migrated = sum(1 for r in lines if r.get("status") == 200 and r.get("migrations", 0) > 0)
        report = figures(sent, restarts, migrated)
        report["restarts"] = [
            {
                "worker": r.worker,
                "sigterm_s": round(r.began - started, 1),
                "drained_in_s": round(r.exited - r.began, 1),
                "exit_code": r.exit_code,
                "back_after_s": round(r.back - r.began, 1),
            }
            for r in restarts
        ]
        report["gateway_statuses"] = dict(Counter(str(r.get("status")) for r in lines))
        report["duration_s"] = round(time.monotonic() - started, 1)
        report["config"] = {k: v for k, v in vars(args).items() if k != "json"}
        return report
    finally:
        if gateway is not None:
            gateway.stop()
        for w in workers:
            w.stop()


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sfllm-rolling-") as tmp:
        if args.model is None:
            args.model = tiny_model(Path(tmp))
            args.worker_args = TINY_WORKER_ARGS if args.worker_args is None else args.worker_args
        args.worker_args = args.worker_args or ""
        logs = Path(args.log_dir) if args.log_dir else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        report = run(args, logs)
    print_report(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 1 if failed(report, args) else 0


def failed(report: dict, args: argparse.Namespace) -> bool:
    """Any request errored, hung or lost; or refused, unless refusals are accepted (each a prompt 429)."""
    if report["errored"] or report["hung"] or report["lost"]:
        return True
    if not args.accept_refusals:
        return report["refused"] > 0
    slow = report["refused"] and report["refusal_s"]["max"] > args.max_refusal_s
    return bool(slow or set(report["refused_statuses"]) - {"429"})


def print_report(report: dict) -> None:
    print(f"\n{'=' * 20} rolling restart of 2 workers under a steady streaming load {'=' * 20}")
    print(
        f"{report['requests']} requests in {report['duration_s']} s: completed {report['completed']}, migrated "
        f"{report['migrated']}, refused {report['refused']}, errored {report['errored']}, hung {report['hung']}, "
        f"lost {report['lost']}"
    )
    print(f"  TTFT at most {report['ttft_max_s']} s")
    if report["hung"]:
        w = report["hung_waited_s"]
        print(
            f"  hung: {report['hung_streaming']} of {report['hung']} had begun to stream (after waiting s: median "
            f"{w['median']}, p90 {w['p90']}), the others never started"
        )
    if report["refused"]:
        r = report["refusal_s"]
        print(
            f"  refused: statuses {report['refused_statuses']}, after (s) median {r['median']}, p90 {r['p90']}, "
            f"max {r['max']}"
        )
    for r in report["restarts"]:
        print(
            f"  {r['worker']}: SIGTERM at {r['sigterm_s']} s, drained and exited {r['exit_code']} after "
            f"{r['drained_in_s']} s, admitted again {r['back_after_s']} s after the SIGTERM"
        )
    for name in ("ttft", "itl"):
        for where in ("during", "outside"):
            s = report[f"{name}_ms_{where}"]
            print(
                f"  {name.upper()} {where:<7} the restarts (ms): median {s['median']}, p90 {s['p90']}, "
                f"p99 {s['p99']} (n {s['n']})"
            )
    for error in report["errors"]:
        print(f"  error: {error}")


if __name__ == "__main__":
    sys.exit(main())
