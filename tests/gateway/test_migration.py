"""Mid-stream migration through a real gateway over two real workers: the worker serving a stream is
killed (kill -9) or drains while it streams, and the client's stream goes on from the other worker as
one stream, with no error event, equal to the stream that was never interrupted.

The workers sleep before every engine step (--debug-step-delay-s), so a stream lasts long enough for
the kill to land mid-way; the kill follows the stream's own progress (after so many chunks), not a clock.
"""

import json
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from gateway_harness import API_KEY, GatewayServer, WorkerProcess, gateway_config

from gateway.config import GatewayConfig
from worker.client import WorkerClient, build_request

STEP_DELAY_S = 0.04
PROMPT = "Tell me a long story about a lighthouse keeper."
MIGRATED = ("sfllm_gateway:request_retries_total", (("reason", "migrated"),))


def start_workers(model: Path, log_dir: Path, names: list[str], *extra: str) -> list[WorkerProcess]:
    procs = [WorkerProcess(model, log_dir, name, "--debug-step-delay-s", str(STEP_DELAY_S), *extra) for name in names]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.wait_serving(timeout=300)
    return procs


@pytest.fixture(scope="module")
def pair(qwen3_path: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[WorkerProcess]]:
    """Two tiny-Qwen3 workers that step slowly and drain for half a second on SIGTERM."""
    procs = start_workers(Path(qwen3_path), tmp_path_factory.mktemp("migration-logs"), ["w0", "w1"],
                          "--drain-timeout-s", "0.5")  # fmt: skip
    yield procs
    for proc in procs:
        proc.stop()


@dataclass
class Stack:
    """A gateway over workers, and the means to kill the one serving the stream in flight."""

    gateway: GatewayServer
    workers: list[WorkerProcess]
    killed: list[WorkerProcess] = field(default_factory=list)

    @property
    def model(self) -> str:
        return next(iter(self.gateway.app.state.router.models()))

    def serving(self) -> WorkerProcess:
        """The worker running the calls in flight (one stream at a time, so one worker)."""
        router = self.gateway.app.state.router
        busy = [w for w in self.workers if router.workers[w.target].in_flight > 0]
        assert len(busy) == 1, [router.workers[w.target].in_flight for w in self.workers]
        return busy[0]

    def kill_serving(self) -> WorkerProcess:
        victim = self.serving()
        victim.kill()
        self.killed.append(victim)
        return victim

    def migrations(self) -> float:
        return self.gateway.metrics().get(MIGRATED, 0.0)

    def restart(self) -> None:
        """Every worker running and routed to again."""
        dead = [w for w in self.workers if w.proc is None or w.proc.poll() is not None]
        for worker in dead:
            worker.start()
        for worker in dead:
            worker.wait_serving(timeout=300)
        self.gateway.wait_healthy(len(self.workers))


@pytest.fixture(scope="module")
def pair_gateway(pair: list[WorkerProcess]) -> Iterator[GatewayServer]:
    server = GatewayServer(gateway_config([w.target for w in pair])).start()
    server.wait_healthy(2)
    yield server
    server.stop()


@pytest.fixture
def stack(pair: list[WorkerProcess], pair_gateway: GatewayServer) -> Iterator[Stack]:
    """The pair behind its gateway; workers a test killed are restarted after it."""
    stack = Stack(pair_gateway, pair)
    yield stack
    stack.restart()


@dataclass
class Streamed:
    """What a client gathered from a stream: each choice's text and finish reason, and the usage."""

    texts: dict[int, str] = field(default_factory=dict)
    finishes: dict[int, str] = field(default_factory=dict)
    usage: tuple[int, int, int] | None = None  # prompt, completion, total tokens


def stream(stack: Stack, kill_after: int | None = None, chat: bool = False, **body: Any) -> Streamed:
    """A streamed completion (or chat completion) read to its end through the OpenAI SDK; with kill_after,
    the worker serving it is killed once that many chunks with text have arrived."""
    client = stack.gateway.client()
    create = client.chat.completions.create if chat else client.completions.create
    out, seen = Streamed(), 0
    for chunk in create(model=stack.model, stream=True, stream_options={"include_usage": True}, **body):
        if chunk.usage is not None:
            out.usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.total_tokens)
        for choice in chunk.choices:
            text = (choice.delta.content or "") if chat else choice.text
            out.texts[choice.index] = out.texts.get(choice.index, "") + text
            seen += bool(text)
            if choice.finish_reason:
                out.finishes[choice.index] = choice.finish_reason
        if kill_after is not None and seen >= kill_after and not stack.killed:
            stack.kill_serving()
    return out


def generate_stream(stack: Stack, body: dict[str, Any], kill_after: int | None = None) -> dict[str, Any]:
    """A streamed SGLang-native /generate's last chunk (the whole completion: text, output_ids, meta_info)."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    last: dict[str, Any] = {}
    with httpx.stream("POST", stack.gateway.url + "/generate", json={**body, "stream": True}, headers=headers,
                      timeout=120) as response:  # fmt: skip
        assert response.status_code == 200
        for count, line in enumerate((x for x in response.iter_lines() if x.startswith("data: {")), start=1):
            last = json.loads(line.removeprefix("data: "))
            assert "error" not in last, last
            if count == kill_after:
                stack.kill_serving()
    return last


def last_continuation(worker: WorkerProcess) -> int:
    """How many tokens the worker's latest Generate call continued from."""
    return worker.request_records()[-1].get("continuation_tokens", 0)


def check_greedy_migration_is_invisible(stack: Stack, text: str, max_tokens: int, kill_after: int) -> None:
    body = {"text": text, "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
    whole = generate_stream(stack, body)
    before = stack.migrations()
    migrated = generate_stream(stack, body, kill_after=kill_after)
    assert stack.migrations() - before == 1
    (victim,) = stack.killed
    (survivor,) = [w for w in stack.workers if w is not victim]
    assert last_continuation(survivor) >= kill_after - 1  # it went on from what the client had seen
    assert migrated["text"] == whole["text"]
    assert migrated["output_ids"] == whole["output_ids"] and len(whole["output_ids"]) == max_tokens
    info = ("finish_reason", "prompt_tokens", "completion_tokens")
    assert [migrated["meta_info"][k] for k in info] == [whole["meta_info"][k] for k in info]
    assert whole["meta_info"]["completion_tokens"] == max_tokens  # max_tokens counts the whole completion


# --------------------------------------------------------------------------------------------- tests


def test_a_greedy_stream_through_a_kill_equals_the_uninterrupted_one(stack: Stack) -> None:
    check_greedy_migration_is_invisible(stack, PROMPT, max_tokens=40, kill_after=12)


def test_a_seeded_chat_stream_migrated_mid_way_equals_the_uninterrupted_one(stack: Stack) -> None:
    """A chat prompt moves as the token ids its template made; a seed's noise follows the token's index."""
    body = dict(messages=[{"role": "user", "content": PROMPT}], max_tokens=40, temperature=1.0, seed=7,
                extra_body={"ignore_eos": True})  # fmt: skip
    whole = stream(stack, chat=True, **body)
    assert stream(stack, chat=True, **body) == whole  # seeded: the same every time
    migrated = stream(stack, chat=True, kill_after=10, **body)
    assert stack.killed and migrated == whole
    assert whole.finishes == {0: "length"} and whole.usage[1] == 40  # type: ignore[index]


def test_a_stop_string_spanning_the_migration_point_still_stops(stack: Stack) -> None:
    free = stream(stack, prompt=PROMPT, max_tokens=60, temperature=0, extra_body={"ignore_eos": True}).texts[0]
    stop = free[20:44]  # long: the kill lands while the worker holds back its first part
    body = dict(prompt=PROMPT, max_tokens=60, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    whole = stream(stack, **body)
    assert whole.texts[0] == free[: free.index(stop)] and whole.finishes == {0: "stop"}

    client = stack.gateway.client()
    shown = ""
    chunks = client.completions.create(model=stack.model, stream=True, stream_options={"include_usage": True}, **body)
    usage = finish = None
    for chunk in chunks:
        if chunk.usage is not None:
            usage = (chunk.usage.prompt_tokens, chunk.usage.completion_tokens, chunk.usage.total_tokens)
        for choice in chunk.choices:
            shown += choice.text
            finish = choice.finish_reason or finish
        if not stack.killed and len(shown) >= free.index(stop):
            time.sleep(2.5 * STEP_DELAY_S)  # the stop string's first tokens are generated, and held back
            stack.kill_serving()
    assert stack.killed
    assert (shown, finish, usage) == (whole.texts[0], "stop", whole.usage)


def test_both_choices_of_an_n2_stream_complete_when_their_worker_dies(stack: Stack) -> None:
    body = dict(prompt=PROMPT, n=2, max_tokens=32, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    whole = stream(stack, **body)
    assert whole.texts[0] != whole.texts[1]
    before = stack.migrations()
    migrated = stream(stack, kill_after=12, **body)  # about six tokens of each
    assert stack.migrations() - before == 2  # each choice moved as a call of its own
    assert migrated == whole
    assert whole.finishes == {0: "length", 1: "length"} and whole.usage[1] == 64  # type: ignore[index]


def test_a_draining_worker_that_aborts_a_stream_hands_it_over(stack: Stack) -> None:
    """SIGTERM: the worker's drain timeout (0.5 s here) ends the stream with FINISH_REASON_ABORT, and it migrates."""
    body = dict(prompt=PROMPT, max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
    whole = stream(stack, **body)
    client = stack.gateway.client()
    out, before = Streamed(), stack.migrations()
    for chunk in client.completions.create(model=stack.model, stream=True, **body):
        for choice in chunk.choices:
            out.texts[0] = out.texts.get(0, "") + choice.text
            out.finishes.update({0: choice.finish_reason} if choice.finish_reason else {})
        if not stack.killed and len(out.texts.get(0, "")) > 10:
            victim = stack.serving()
            victim.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            stack.killed.append(victim)
    assert stack.migrations() - before == 1
    assert (out.texts, out.finishes) == (whole.texts, whole.finishes)
    stack.killed[0].proc.wait(30)  # type: ignore[union-attr]


def test_with_no_worker_left_the_stream_ends_with_an_error_event(stack: Stack) -> None:
    client = stack.gateway.client(timeout=30)
    chunks = client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=200, stream=True,
                                       extra_body={"ignore_eos": True})  # fmt: skip
    started = time.monotonic()
    with pytest.raises(openai.APIError) as info:
        for seen, _ in enumerate(chunks):
            if seen == 5:
                for worker in stack.workers:
                    worker.kill()
                    stack.killed.append(worker)
    assert "no healthy worker" in info.value.message or "mid-stream" in info.value.message, info.value.message
    assert time.monotonic() - started < 20  # ended, not hung


def test_past_its_migration_cap_a_stream_ends_with_an_error_event(pair: list[WorkerProcess]) -> None:
    """With max_migrations 1, a stream that lost its second worker fails though a worker is up again."""
    gateway = GatewayServer(gateway_config([w.target for w in pair], max_migrations=1)).start()
    stack = Stack(gateway, pair)
    try:
        gateway.wait_healthy(2)
        client = gateway.client(timeout=60)
        chunks = client.completions.create(model=stack.model, prompt=PROMPT, max_tokens=900, stream=True,
                                           extra_body={"ignore_eos": True})  # fmt: skip
        router = gateway.app.state.router
        first, routed = None, 0.0
        with pytest.raises(openai.APIError) as info:
            for seen, _ in enumerate(chunks):
                if seen == 5:
                    first = stack.kill_serving()
                    first.start()  # back while its stream runs on the other worker
                elif first is not None and len(stack.killed) == 1 and router.workers[first.target].healthy:
                    routed = gateway.routed()[first.target]
                    stack.kill_serving()  # the second worker, serving the migrated stream
        assert "mid-stream" in info.value.message, info.value.message
        assert len(stack.killed) == 2 and stack.killed[1] is not first
        assert gateway.routed()[first.target] == routed  # the worker back up was not given a second migration
    finally:
        stack.restart()
        gateway.stop()


def test_a_migration_that_finds_every_queue_full_waits_for_room(
    qwen3_path: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """The stream's worker dies while the only other one has its queue full: the stream stalls until that queue
    has room, then goes on as one stream, instead of ending with an error event."""
    log_dir = tmp_path_factory.mktemp("full-queue-logs")
    (streaming,) = start_workers(Path(qwen3_path), log_dir, ["streaming"])
    (small,) = start_workers(Path(qwen3_path), log_dir, ["small"], "--max-num-seqs", "1", "--max-waiting", "1")
    gateway = GatewayServer(gateway_config([streaming.target, small.target])).start()
    stack = Stack(gateway, [streaming, small])
    holders: list = []
    try:
        gateway.wait_healthy(2)
        body = dict(prompt=PROMPT, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
        whole = stream(stack, **body)
        with WorkerClient(small.target, timeout=5) as direct:
            for i in range(2):  # one running, then one waiting: the queue is full
                request = build_request(PROMPT, request_id=f"hold-{i}", max_tokens=900, ignore_eos=True)
                holders.append(direct.stub.Generate(request))
                wait_for_load(direct, running=1, waiting=i)
            client = gateway.client(timeout=60)
            out, stalled = Streamed(), 0.0
            chunks = client.completions.create(model=stack.model, stream=True, **body)
            last = time.monotonic()
            for chunk in chunks:
                now = time.monotonic()
                stalled, last = max(stalled, now - last), now
                for choice in chunk.choices:
                    out.texts[0] = out.texts.get(0, "") + choice.text
                    out.finishes.update({0: choice.finish_reason} if choice.finish_reason else {})
                if not stack.killed and len(out.texts.get(0, "")) > 10:
                    assert stack.serving() is streaming  # the small worker had no room for it
                    stack.kill_serving()
                    threading.Timer(1.5, lambda: [call.cancel() for call in holders]).start()  # room, later
        assert (out.texts, out.finishes) == (whole.texts, whole.finishes)
        assert stack.migrations() == 1
        assert stalled >= 1.0  # it waited for the room
    finally:
        for call in holders:
            call.cancel()
        gateway.stop()
        for worker in (streaming, small):
            worker.stop()


def wait_for_load(client: WorkerClient, running: int, waiting: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        load = client.load()
        if (load.num_requests_running, load.num_requests_waiting) == (running, waiting):
            return
        assert time.monotonic() < deadline, load
        time.sleep(0.02)


def test_max_migrations_is_a_flag_and_may_be_zero() -> None:
    assert GatewayConfig.from_args(["--workers", "a:1"], {}).max_migrations == 2
    assert GatewayConfig.from_args(["--workers", "a:1", "--max-migrations", "0"], {}).max_migrations == 0
    assert GatewayConfig.from_args(["--workers", "a:1"], {"SFLLM_GATEWAY_MAX_MIGRATIONS": "5"}).max_migrations == 5
    with pytest.raises(SystemExit):
        GatewayConfig.from_args(["--workers", "a:1", "--max-migrations", "-1"], {})


def check_on_a_fresh_pair(model: str, log_dir: Path, text: str, max_tokens: int, kill_after: int, *extra: str) -> None:
    """check_greedy_migration_is_invisible on two new workers of this model, stopped after."""
    workers = start_workers(Path(model), log_dir, ["a", "b"], *extra)
    gateway = GatewayServer(gateway_config([w.target for w in workers])).start()
    try:
        gateway.wait_healthy(2)
        check_greedy_migration_is_invisible(Stack(gateway, workers), text, max_tokens, kill_after)
    finally:
        gateway.stop()
        for worker in workers:
            worker.stop()


def test_a_tiny_gemma3_stream_migrates_invisibly_across_its_sliding_window(
    gemma3_path: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Its window is 8 tokens: the new worker's prefill of prompt and continuation crosses several."""
    check_on_a_fresh_pair(gemma3_path, tmp_path_factory.mktemp("gemma3-logs"), PROMPT, 40, 20)


@pytest.mark.slow
def test_the_real_gemma_270m_migrates_a_greedy_stream_invisibly(
    gemma270m_path: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    log_dir = tmp_path_factory.mktemp("gemma270m-logs")
    check_on_a_fresh_pair(gemma270m_path, log_dir, "<bos>Once upon a time", 24, 8, "--max-context-length", "256")
