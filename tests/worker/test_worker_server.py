"""The worker process: health while loading and draining, reflection, queue bounds, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from protos.sfllm.v1 import worker_pb2 as pb
from protos.sfllm.v1.wire import DRAINED_ERROR, DRAINING_KEY
from sfllm_core.sampling_params import SamplingParams
from worker.client import WorkerClient

ROOT = Path(__file__).resolve().parents[2]
PROMPT = "hello world, this is"


def _wait_health(client: WorkerClient, status: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while client.health() != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        time.sleep(0.01)


def test_not_serving_while_loading_then_serving(make_worker, reference_engine):
    worker = make_worker(load=False)
    with WorkerClient(worker.target, timeout=30) as client:
        assert client.health() == "NOT_SERVING"
        assert client.health("sfllm.v1.Worker") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            client.generate(PROMPT, max_tokens=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
        worker.load(timeout=120)
        assert client.health() == "SERVING" and client.health("sfllm.v1.Worker") == "SERVING"
        params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        expected = reference_engine.generate([reference_engine.encode(PROMPT)], params)[0].token_ids
        served = client.generate(PROMPT, max_tokens=4, temperature=0, ignore_eos=True)
        assert (served.finish_reason, served.token_ids) == ("length", expected)


def test_reflection_lists_and_describes_the_services(worker):
    with grpc.insecure_channel(worker.target) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"sfllm.v1.Worker", "grpc.health.v1.Health"} <= services
        service = DescriptorPool(db).FindServiceByName("sfllm.v1.Worker")
        assert [m.name for m in service.methods] == ["Generate", "Abort", "GetModelInfo", "GetLoad"]


def test_drain_keeps_streams_going_and_refuses_new_work(make_worker):
    worker = make_worker(pace=0.02)
    with WorkerClient(worker.target, timeout=30) as client:
        streams = [client.stream(PROMPT, max_tokens=30, temperature=0, ignore_eos=True) for _ in range(2)]
        firsts = [next(stream) for stream in streams]
        assert all(first.HasField("prompt") for first in firsts)
        drained = worker.drain(timeout=30)
        # Whenever the drain completes, no engine request of the streams may still be in flight. The
        # callback runs on the worker's loop as the drain completes (or here, at once, if it already has).
        in_flight_when_drained: list[int] = []
        drained.add_done_callback(lambda _: in_flight_when_drained.append(worker.server.engine.num_in_flight))
        _wait_health(client, "NOT_SERVING")
        assert client.health("sfllm.v1.Worker") == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            client.generate(PROMPT, max_tokens=2)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "draining" in info.value.details()
        assert DRAINING_KEY in dict(info.value.trailing_metadata())  # callers tell a drain from a failure
        for first, stream in zip(firsts, streams, strict=True):
            whole = [first, *stream]
            assert whole[-1].finished.finish_reason == pb.FINISH_REASON_LENGTH
            assert sum(len(r.delta.token_ids) for r in whole) == 30
        drained.result(timeout=10)
        assert in_flight_when_drained == [0], "the drain completed while streams were still in flight"


def test_drain_that_runs_out_of_time_aborts_the_rest(make_worker):
    worker = make_worker(pace=0.02)
    with WorkerClient(worker.target, timeout=30) as client:
        stream = client.stream(PROMPT, max_tokens=400, temperature=0, ignore_eos=True)
        next(stream)
        worker.drain(timeout=0.2).result(timeout=10)
        finished = list(stream)[-1].finished
        assert finished.finish_reason == pb.FINISH_REASON_ABORT
        assert finished.error == DRAINED_ERROR == "worker drained"  # not failed: a router may resume it elsewhere


def test_a_full_queue_is_resource_exhausted_with_a_retry_hint(make_worker):
    worker = make_worker(pace=0.01, max_num_seqs=1, max_waiting=1, retry_after_ms=250)
    with WorkerClient(worker.target, timeout=30) as client:
        running = client.stream(PROMPT, max_tokens=400, temperature=0, ignore_eos=True, request_id="running")
        next(running)
        waiting: list = []
        waiter = threading.Thread(target=lambda: waiting.append(client.generate(PROMPT, max_tokens=2)))
        waiter.start()
        deadline = time.monotonic() + 10
        while client.load().num_requests_waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(grpc.RpcError) as info:
            client.generate(PROMPT, max_tokens=2)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(info.value.trailing_metadata())["retry-after-ms"] == "250"
        client.abort(["running"])
        waiter.join(timeout=10)
        assert waiting[0].finish_reason == "length"
        assert list(running)[-1].finished.finish_reason == pb.FINISH_REASON_ABORT


def _refusal(client: WorkerClient, prompt: str | None = PROMPT, **kwargs: object) -> tuple[grpc.RpcError | None, float]:
    """Generate to the end: the error it got (None if it was served) and how long it took."""
    started = time.monotonic()
    try:
        client.generate(prompt, max_tokens=2, **kwargs)
    except grpc.RpcError as exc:
        return exc, time.monotonic() - started
    return None, time.monotonic() - started


def test_a_request_not_admitted_within_the_queue_time_bound_is_refused_and_a_standing_queue_refuses_at_once(
    make_worker,
):
    """--max-queue-time-s: a request waiting unadmitted past it is refused RESOURCE_EXHAUSTED with the retry hint,
    and leaves nothing behind; once the oldest waiting one has waited half of it in a queue that admits nothing, a
    new request is refused at once. A continuation (a migrated stream, its client mid-stream) still queues, and
    waits for its turn however long."""
    bound = 3.0
    worker = make_worker(pace=0.01, max_num_seqs=1, max_waiting=8, retry_after_ms=250, max_queue_time_s=bound)
    with WorkerClient(worker.target, timeout=30) as client:
        pages = client.load().kv_pages_used
        # 400 steps of 0.01 s at least: it holds the only slot past every bound below
        running = client.stream(PROMPT, max_tokens=400, temperature=0, ignore_eos=True, request_id="running")
        next(running)
        outcomes: dict[str, tuple[grpc.RpcError | None, float]] = {}
        waiter = threading.Thread(target=lambda: outcomes.update(waiting=_refusal(client)))
        waiter.start()
        deadline = time.monotonic() + 10
        while client.load().num_requests_waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        queued_at = time.monotonic()  # it has waited since before now, and not much longer (a load poll's delay)
        time.sleep(bound / 2 + 0.2)
        standing, took = _refusal(client)  # the queue is standing: refused at once, not after the bound
        assert standing is not None and standing.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, standing
        assert "too long" in standing.details() and took < 1.0, (standing.details(), took)
        continuation = threading.Thread(
            target=lambda: outcomes.update(
                continuation=_refusal(client, None, token_ids=[11, 12, 13], continuation=[14])
            )
        )
        continuation.start()
        while client.load().num_requests_waiting < 2:  # it queued behind the first, standing queue or not
            assert time.monotonic() < deadline + 10, outcomes
            time.sleep(0.01)
        waiter.join(timeout=30)
        refused, waited = outcomes["waiting"]
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        assert "--max-queue-time-s" in refused.details()
        assert dict(refused.trailing_metadata())["retry-after-ms"] == "250"  # as for a full queue: callers retry
        # refused past the bound, within the check's interval (and a loaded machine's slack) of it
        assert bound <= waited and time.monotonic() - queued_at < bound + 2.0, waited
        time.sleep(max(0.0, queued_at + bound + 0.5 - time.monotonic()))
        assert client.load().num_requests_waiting == 1 and "continuation" not in outcomes  # past the bound: waiting
        client.abort(["running"])
        assert list(running)[-1].finished.finish_reason == pb.FINISH_REASON_ABORT
        continuation.join(timeout=30)
        assert outcomes["continuation"][0] is None  # served once the slot was free
        deadline = time.monotonic() + 10
        while (load := client.load()).num_requests_running or load.num_requests_waiting or load.kv_pages_used > pages:
            assert time.monotonic() < deadline, load
            time.sleep(0.01)
        served = client.generate(PROMPT, max_tokens=2)  # and it serves again at once
        assert served.finish_reason == "length"


def _read_log(path: Path) -> list[dict]:
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # not ours (a library printing to stderr)
    return lines


def test_sigterm_drains_in_flight_streams_then_exits(qwen3_path, tmp_path):
    log_path = tmp_path / "worker.log"
    command = [sys.executable, "-m", "worker", "--model", str(qwen3_path), "--host", "127.0.0.1", "--port", "0"]
    command += [
        "--metrics-host",
        "127.0.0.1",
        "--metrics-port",
        "0",
        "--dtype",
        "float32",
        "--device",
        "cpu",
        "--max-context-length",
        "256",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stderr=log_file, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not any(line.get("msg") == "serving" for line in _read_log(log_path)):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "worker did not start"
            time.sleep(0.1)
        port = next(line["port"] for line in _read_log(log_path) if line.get("msg") == "serving")
        with WorkerClient(f"127.0.0.1:{port}", timeout=30) as client:
            room = client.model_info().max_context_length - 16
            streams = [
                client.stream(token_ids=[7] * 8, max_tokens=room, temperature=0, ignore_eos=True) for _ in range(4)
            ]
            firsts = [next(stream) for stream in streams]  # each one's PromptInfo and first token
            proc.send_signal(signal.SIGTERM)
            # Health turns NOT_SERVING once the signal is handled (the port may close first if the
            # streams finish before this look, as they keep arriving from the client's buffer).
            deadline = time.monotonic() + 10
            status = "SERVING"
            while status == "SERVING" and time.monotonic() < deadline:
                try:
                    status = client.health()
                except grpc.RpcError as exc:
                    status = exc.code().name
            assert status in ("NOT_SERVING", "UNAVAILABLE")
            for first, stream in zip(firsts, streams, strict=True):
                whole = [first, *stream]
                assert whole[-1].finished.finish_reason == pb.FINISH_REASON_LENGTH
                assert sum(len(r.delta.token_ids) for r in whole) == room
        assert proc.wait(timeout=60) == 0
        messages = [line.get("msg") for line in _read_log(log_path)]
        assert messages.index("draining") < messages.index("stopped")
        requests = [line for line in _read_log(log_path) if line.get("msg") == "generate"]
        assert len(requests) == 4 and all(r["status"] == "OK" for r in requests)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
