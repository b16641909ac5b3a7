"""What the reliability tests share: their sizes, a streaming client that classifies how each request ended,
the gateway's request log, and waits on the workers' and the gateway's own load reports."""

import asyncio
import contextlib
import datetime
import json
import logging
import random
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from gateway_harness import API_KEY, GatewayServer, WorkerProcess

PROMPT = "Tell me a long story about a lighthouse keeper."
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass(frozen=True)
class Sizes:
    """How hard each test pushes. CI's sizes keep the suite within about three minutes on two cores."""

    kill_requests: int  # streams of the kill -9 test
    drain_requests: int  # streams of the SIGTERM test
    concurrency: int  # streams in flight at once: fewer than the 8 + 16 one worker holds, so a survivor has room
    rolling_concurrency: int  # client loops of the rolling restarts
    disconnects: int  # clients that leave early
    overload_burst: int  # requests sent at once at a gateway that holds 24 over workers that hold 8 + 16 each
    fuzz_examples: int  # schemathesis cases per operation and mode


CI = Sizes(
    kill_requests=80,
    drain_requests=60,
    concurrency=12,
    rolling_concurrency=6,
    disconnects=200,
    overload_burst=150,
    fuzz_examples=30,
)
FULL = Sizes(
    kill_requests=200,
    drain_requests=200,
    concurrency=12,
    rolling_concurrency=10,
    disconnects=1000,
    overload_burst=600,
    fuzz_examples=200,
)

# The shared workers: small queues (so overload is reachable), prefill in chunks of 64 tokens (so a long prompt is
# mid-prefill for several steps), a sleep before every step (streams last long enough to be cut, and the two cores
# stay free), and a drain of a few seconds, shorter than the long streams of the rolling restart.
MAX_NUM_SEQS = 8
MAX_WAITING = 16  # a prefill budget of 64 admits about two prompts a step: a burst of arrivals waits a little
STEP_DELAY_S = 0.01
DRAIN_TIMEOUT_S = 3.0
WORKER_ARGS = (
    "--max-num-seqs",
    str(MAX_NUM_SEQS),
    "--max-waiting",
    str(MAX_WAITING),
    "--max-context-length",
    "512",
    "--max-num-batched-tokens",
    "64",
    "--debug-step-delay-s",
    str(STEP_DELAY_S),
    "--drain-timeout-s",
    str(DRAIN_TIMEOUT_S),
)
# Health checks every 0.25 s, each given a second (two loaded cores answer slowly): a silent worker is out in about
# four seconds (two failed checks, each after a GetLoad poll that waits out the same timeout), a draining one at once.
FAST_HEALTH = {"health_interval_s": 0.25, "health_timeout_s": 1.0}
LOAD_INTERVAL_S = 0.1  # gateway_config's GetLoad interval


# ------------------------------------------------------------------------------------------- waiting


def wait_for(condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]) -> float:
    """Poll until `condition()`; returns the seconds it took, fails the test past `timeout`."""
    start = time.monotonic()
    while not condition():
        elapsed = time.monotonic() - start
        assert elapsed < timeout, f"timed out after {timeout}s waiting for: " + (what() if callable(what) else what)
        time.sleep(0.02)
    return time.monotonic() - start


def settled(workers: list[WorkerProcess], gateway: GatewayServer | None, kv_baseline: list[int]) -> str | None:
    """None once every worker runs and queues nothing and holds no more KV pages than at its baseline, and the
    gateway holds no request and no worker call; else what is still held."""
    held = []
    for worker, baseline in zip(workers, kv_baseline):
        load = worker.load()
        running, waiting, pages = load.num_requests_running, load.num_requests_waiting, load.kv_pages_used
        if running or waiting or pages > baseline:
            held.append(f"{worker.target}: running {running}, waiting {waiting}, kv pages {pages} (was {baseline})")
    if gateway is not None:
        for (name, labels), value in gateway.metrics().items():
            if name in ("sfllm_gateway:num_requests_running", "sfllm_gateway:worker_requests_in_flight") and value:
                held.append(f"gateway {name}{dict(labels)} = {value}")
    return "; ".join(held) or None


def wait_settled(
    workers: list[WorkerProcess], gateway: GatewayServer | None, kv_baseline: list[int], timeout: float = 30.0
) -> float:
    """Until nothing is held anywhere (see `settled`); the seconds it took."""
    last: list[str | None] = [None]

    def done() -> bool:
        last[0] = settled(workers, gateway, kv_baseline)
        return last[0] is None

    return wait_for(done, timeout, lambda: f"work left behind: {last[0]}")


# ------------------------------------------------------------------------------------- the gateway


def metric_sum(gateway: GatewayServer, name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include these."""
    return sum(
        value
        for (sample, sample_labels), value in gateway.metrics().items()
        if sample == name and labels.items() <= dict(sample_labels).items()
    )


def migrations_metric(gateway: GatewayServer) -> float:
    """Completions the gateway moved to another worker mid-stream, by its retries counter."""
    return metric_sum(gateway, "sfllm_gateway:request_retries_total", reason="migrated")


class GatewayRequestLog(logging.Handler):
    """The gateway's one log line per request (the "request" records of logger sfllm.gateway), by request id."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: dict[str, dict[str, Any]] = {}

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "fields", None)
        if record.getMessage() == "request" and isinstance(fields, dict):
            self.records[fields["request_id"]] = fields

    def workers_of(self, request_id: str | None) -> list[str]:
        return list(self.records.get(request_id or "", {}).get("workers", []))

    def migrations_of(self, request_id: str | None) -> int:
        return int(self.records.get(request_id or "", {}).get("migrations", 0))


@contextlib.contextmanager
def gateway_request_log() -> Iterator[GatewayRequestLog]:
    """Collects the request lines of every gateway in this process while the block runs."""
    logger = logging.getLogger("sfllm.gateway")
    handler, level = GatewayRequestLog(), logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


# ------------------------------------------------------------------------------------- the workers


def log_records(worker: WorkerProcess) -> list[dict[str, Any]]:
    """Every JSON record of the worker's log so far (all its runs: the harness appends)."""
    records = []
    for line in worker.log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if isinstance(record, dict):
                records.append(record)
    return records


def log_time(record: dict[str, Any]) -> float:
    """A record's timestamp as seconds since the epoch."""
    return datetime.datetime.fromisoformat(record["ts"].replace("Z", "+00:00")).timestamp()


# ------------------------------------------------------------------------------------- the streams


@dataclass
class Outcome:
    """How one streamed request ended, as its client saw it."""

    kind: str = "lost"  # completed | errored (an error event) | refused (an HTTP error status) | hung | lost
    status: int = 0
    request_id: str | None = None
    tokens: int = 0  # completion tokens by the usage chunk
    text_chunks: int = 0
    text: str = ""  # every chunk's text, joined
    started: float = 0.0
    first_text_at: float | None = None
    ended: float = 0.0
    finish_reason: str | None = None
    error: dict[str, Any] | None = None
    retry_after: str | None = None


async def sse_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The lines of an SSE body, split where SSE splits them (LF, CRLF). Not httpx's aiter_lines: that splits at
    every line break str.splitlines knows, and a token's text in a JSON string may hold U+0085 or U+2028."""
    buffer = b""
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r").decode()
    if buffer:
        yield buffer.decode()


def completion_body(model: str, max_tokens: int, prompt: str | list[int] = PROMPT, **extra: Any) -> dict[str, Any]:
    """A streamed completion of exactly max_tokens tokens (ignore_eos), its usage counted in the last chunk."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(extra)
    return body


async def stream_completion(
    http: httpx.AsyncClient,
    url: str,
    body: dict[str, Any],
    timeout: float,
    on_text: Callable[[Outcome], Awaitable[None] | None] | None = None,
) -> Outcome:
    """POST a streamed completion and read it to its end, within `timeout` seconds (else: hung).

    Completed means a finish_reason, then [DONE], and every asked-for token in the usage count; an error
    event is errored; an HTTP error status is refused; anything else (a stream that just stops) is lost.
    """
    out = Outcome(started=time.monotonic())
    done = error_event = False
    try:
        async with asyncio.timeout(timeout):
            async with http.stream("POST", url + "/v1/completions", json=body, headers=AUTH) as response:
                out.status = response.status_code
                if response.status_code != 200:
                    out.kind = "refused"
                    out.retry_after = response.headers.get("retry-after")
                    with contextlib.suppress(ValueError):
                        out.error = json.loads(await response.aread()).get("error")
                    return out
                async for line in sse_lines(response):
                    if not line:
                        continue
                    if line == "data: [DONE]":
                        done = True
                        break
                    chunk = json.loads(line.removeprefix("data: "))
                    if "error" in chunk:
                        out.error, error_event = chunk["error"], True
                        continue
                    out.request_id = chunk.get("id", out.request_id)
                    if chunk.get("usage"):
                        out.tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk.get("choices", []):
                        out.finish_reason = choice.get("finish_reason") or out.finish_reason
                        if choice.get("text"):
                            out.text_chunks += 1
                            out.text += choice["text"]
                            if out.first_text_at is None:
                                out.first_text_at = time.monotonic()
                            if on_text is not None:
                                result = on_text(out)
                                if result is not None:
                                    await result
    except TimeoutError:
        out.kind = "hung"
    except httpx.HTTPError as exc:  # the connection broke with no error event: lost
        out.error = {"message": f"{type(exc).__name__}: {exc}"}
    out.ended = time.monotonic()
    if out.kind == "hung":
        return out
    if error_event:
        out.kind = "errored"
    elif done and out.finish_reason in ("stop", "length") and out.tokens == body["max_tokens"]:
        out.kind = "completed"
    return out


def http_client(concurrency: int) -> httpx.AsyncClient:
    return httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 8), timeout=httpx.Timeout(120.0))


def tally(outcomes: list[Outcome]) -> Counter:
    return Counter(o.kind for o in outcomes)


def random_ids(rng: random.Random, count: int) -> list[int]:
    """A prompt of token ids inside the tiny checkpoints' vocabulary (384), no special tokens."""
    return [rng.randrange(10, 300) for _ in range(count)]


@dataclass
class RssWatch:
    """The peak resident memory of some processes (and their children), sampled every 50 ms while it runs."""

    pids: dict[str, int]
    baseline: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)

    def rss(self) -> dict[str, int]:
        import psutil

        sizes = {}
        for name, pid in self.pids.items():
            total = 0
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                for p in [proc, *proc.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += p.memory_info().rss
            sizes[name] = total
        return sizes

    async def watch(self, stop: asyncio.Event) -> None:
        self.baseline = self.rss()
        self.peak = dict(self.baseline)
        while not stop.is_set():
            for name, size in (await asyncio.to_thread(self.rss)).items():
                self.peak[name] = max(self.peak[name], size)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.05)
