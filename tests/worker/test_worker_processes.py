"""The worker's three processes: coalesced responses carry exactly the uncoalesced output, and a dead child is loud."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from protos.sfllm.v1 import worker_pb2 as pb
from worker.client import Completion, WorkerClient

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "hello world, this is"

REQUESTS = [
    dict(max_tokens=40, temperature=0, ignore_eos=True, logprobs=True, top_logprobs=3),
    dict(max_tokens=33, temperature=1.0, seed=5, n=2, ignore_eos=True),
    dict(max_tokens=40, temperature=1.0, seed=9, ignore_eos=True, stop=["e", "\x00\x00"]),
    dict(max_tokens=24, temperature=0, logprobs=True),
]


def _shape(completion: Completion) -> list[tuple]:
    """Everything a client can see of each choice, logprobs to the last digit included."""
    return [
        (
            c.index,
            c.text,
            c.token_ids,
            c.finish_reason,
            c.stop,
            c.usage.completion_tokens if c.usage else None,
            [(lp.token_id, lp.token, lp.logprob, [(t.token_id, t.token, t.logprob) for t in lp.top_logprobs])
             for lp in c.logprobs],
        )
        for c in completion.choices
    ]  # fmt: skip


@pytest.mark.parametrize("request_", REQUESTS, ids=["greedy-logprobs", "seeded-n2", "stop-string", "eos"])
def test_coalesced_responses_carry_exactly_the_uncoalesced_output(make_worker, client, request_):
    coalescing = make_worker(stream_interval=7)
    with WorkerClient(coalescing.target, timeout=60) as other:
        responses = list(other.stream(PROMPT, **request_))
        together = Completion()
        for response in responses:
            together.add(response)
    one_by_one = client.generate(PROMPT, **request_)
    assert _shape(together) == _shape(one_by_one)
    # Each choice's first delta goes out at once (its first token); every later one but its last
    # carries at least the interval's worth of tokens.
    for index in range(len(together.choices)):
        deltas = [len(r.delta.token_ids) for r in responses if r.index == index and r.HasField("delta")]
        assert all(n >= 7 for n in deltas[1:-1]) and sum(deltas) == len(together.choices[index].token_ids)
        assert len(deltas) <= -(-(sum(deltas) - deltas[0]) // 7) + 2


def _read_log(path: Path) -> list[dict]:
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # not ours
    return records


def _start_worker(qwen3_path: Path, log_path: Path) -> tuple[subprocess.Popen, int, dict]:
    command = [sys.executable, "-m", "worker", "--model", str(qwen3_path), "--host", "127.0.0.1", "--port", "0"]
    command += ["--metrics-port", "0", "--dtype", "float32", "--device", "cpu", "--debug-step-delay-s", "0.02"]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, cwd=ROOT, stderr=log_file, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        serving = [r for r in _read_log(log_path) if r.get("msg") == "serving"]
        if serving:
            return proc, serving[0]["port"], serving[0]["pids"]
        assert proc.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, "worker did not start"
        time.sleep(0.1)


@pytest.mark.parametrize("child", ["engine", "detokenizer"])
def test_a_killed_child_process_ends_streams_reports_not_serving_and_exits_nonzero(qwen3_path, tmp_path, child):
    log_path = tmp_path / "worker.log"
    proc, port, pids = _start_worker(qwen3_path, log_path)
    try:
        with WorkerClient(f"127.0.0.1:{port}", timeout=30) as client:
            stream = client.stream(PROMPT, max_tokens=500, temperature=0, ignore_eos=True)
            assert next(stream).HasField("prompt")
            os.kill(pids[child], signal.SIGKILL)
            ends = [r for r in stream if r.HasField("finished")]
            assert len(ends) == 1 and ends[0].finished.finish_reason == pb.FINISH_REASON_ERROR
            assert f"the {child} process exited" in ends[0].finished.error
            statuses = set()
            while proc.poll() is None:
                try:
                    statuses.add(client.health())
                except grpc.RpcError as exc:
                    statuses.add(exc.code().name)
                time.sleep(0.02)
            assert "NOT_SERVING" in statuses  # said so while it lasted, then went away
        assert proc.wait(timeout=30) == 1
        assert any(r.get("msg") == "NOT_SERVING: a worker process died" for r in _read_log(log_path))
        others = [pid for name, pid in pids.items() if name not in (child, "front")]
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in others):  # the surviving child follows the front out
            assert time.monotonic() < deadline, "a child outlived the worker"
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for every purpose but its process table entry.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ")[-1].split()[0] != "Z"


def test_children_die_with_a_killed_front(qwen3_path, tmp_path):
    proc, _, pids = _start_worker(qwen3_path, tmp_path / "worker.log")
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(_alive(pids[name]) for name in ("engine", "detokenizer")):
        assert time.monotonic() < deadline, "a child outlived its front"
        time.sleep(0.05)
