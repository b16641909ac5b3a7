"""A worker whose engine is two tensor-parallel ranks (gloo, on the CPU) serves over gRPC what a
single-process engine computes, and leaves no rank behind when it stops. To the front nothing changes:
the engine process is rank 0 and starts rank 1 itself."""

import os
import time

from conftest import worker_config

from sfllm_core.sampling_params import SamplingParams
from worker.client import WorkerClient
from worker.server import BackgroundWorker

PROMPTS = ["hello world, this is", "a b c d e f g h i j k l m n o p q r s t u v w x y z"]


def test_a_two_rank_worker_streams_the_single_engine_tokens_and_stops_its_ranks(qwen3_path, reference_engine):
    worker = BackgroundWorker(worker_config(qwen3_path, tensor_parallel_size=2))
    try:
        worker.load(timeout=120)
        ranks = _ranks_below(os.getpid())
        assert len(ranks) == 1  # rank 1, a child of the engine process
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
        with WorkerClient(worker.target, timeout=60) as client:
            for prompt in PROMPTS:
                expected = reference_engine.generate([reference_engine.encode(prompt)], params)[0].token_ids
                served = client.generate(prompt, max_tokens=12, temperature=0, ignore_eos=True)
                assert (served.finish_reason, served.token_ids) == ("length", expected)
    finally:
        worker.stop()
    deadline = time.monotonic() + 15
    while _ranks_below(os.getpid()):
        assert time.monotonic() < deadline, "a tensor-parallel rank outlived its worker"
        time.sleep(0.1)


def _ranks_below(pid: int) -> list[int]:
    """Live descendants of pid running a follower rank (engine/ranks.py)."""
    found, stack = [], [pid]
    while stack:
        parent = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except FileNotFoundError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as f:
                    children = [int(p) for p in f.read().split()]
            except FileNotFoundError:
                continue
            for child in children:
                stack.append(child)
                try:
                    with open(f"/proc/{child}/cmdline", "rb") as f:
                        cmdline = f.read()
                    with open(f"/proc/{child}/stat") as f:
                        zombie = f.read().split(") ")[-1].startswith("Z")
                except FileNotFoundError:
                    continue
                if b"sfllm_core.engine.ranks" in cmdline and not zombie:
                    found.append(child)
    return found
