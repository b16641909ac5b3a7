"""engine/ranks.py: the processes of a tensor-parallel engine (two gloo ranks on the CPU) start, refuse
what cannot shard before starting anyone, stop with the engine, and a dead rank fails steps instead of
hanging them. Only one tensor-parallel engine can live in a process at a time (its process group is the
process's default one), so these tests build theirs one after another.
"""

import os
import signal
import time

import msgspec
import numpy as np
import pytest
import torch
from checkpoints import make_qwen3_checkpoint, write_gguf

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.engine.memory_pool import MemoryPool
from sfllm_core.engine.ranks import StepBatch, shadow_batch, step_message
from sfllm_core.engine.request_sequence import PENDING_TOKEN, RequestSequence
from sfllm_core.engine.scheduler import ScheduledBatch
from sfllm_core.errors import InvalidRequestError
from sfllm_core.sampling_params import SamplingParams

SETTINGS = dict(device="cpu", dtype="float32", page_size=4, num_pages=32)
PROMPT = [1, 5, 9, 33, 7, 100]


def test_speculation_and_quantized_weights_are_refused_with_a_reason(qwen3_path, tmp_path):
    with pytest.raises(InvalidRequestError, match="speculative"):
        InferenceEngine(qwen3_path, tensor_parallel_size=2, speculative_algorithm="ngram", **SETTINGS)
    with pytest.raises(InvalidRequestError, match="tensor_parallel_size must be >= 1"):
        InferenceEngine(qwen3_path, tensor_parallel_size=0, **SETTINGS)
    # A GGUF on the CPU serves its quantized blocks by default: those are not split.
    gguf = write_gguf(make_qwen3_checkpoint(tmp_path / "ckpt"), tmp_path / "model.gguf", quantize=True)
    before = _children()
    with pytest.raises(InvalidRequestError, match="quantization 'gguf' is not supported with tensor_parallel_size"):
        InferenceEngine(str(gguf), tensor_parallel_size=2, load_tokenizer=False, **SETTINGS)
    assert _children() == before  # refused before any rank was started


def test_heads_that_do_not_split_are_refused_and_leave_no_process(qwen3_path):
    # 4 query heads do not split over 3 ranks: every rank refuses while building its model.
    before = _children()
    with pytest.raises(ValueError, match="num_attention_heads"):
        InferenceEngine(qwen3_path, tensor_parallel_size=3, **SETTINGS)
    _wait_gone(_children() - before)


def test_shutdown_stops_the_other_rank_and_a_second_engine_waits_for_it(qwen3_path):
    engine = InferenceEngine(qwen3_path, tensor_parallel_size=2, **SETTINGS)
    (proc,) = engine._followers._procs
    assert engine.generate([PROMPT], SamplingParams(max_tokens=2, ignore_eos=True))[0].token_ids
    with pytest.raises(RuntimeError, match="already holds a tensor-parallel engine"):
        InferenceEngine(qwen3_path, tensor_parallel_size=2, **SETTINGS)
    engine.shutdown()
    assert proc.poll() is not None


def test_a_dead_rank_ends_the_step_with_an_error_not_a_hang(qwen3_path):
    engine = InferenceEngine(qwen3_path, tensor_parallel_size=2, **SETTINGS)
    try:
        (proc,) = engine._followers._procs
        os.kill(proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while engine._followers.failure is None and time.monotonic() < deadline:  # rank 0 notices the death
            time.sleep(0.01)
        started = time.monotonic()
        (out,) = engine.generate([PROMPT], SamplingParams(max_tokens=4, ignore_eos=True))
        assert out.finish_reason == "error"
        assert time.monotonic() - started < 30
    finally:
        engine.shutdown()


def _children() -> set[int]:
    """Pids of this process's live children (Linux)."""
    pids = set()
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            pids.update(int(p) for p in f.read().split())
    return pids


def _wait_gone(pids: set[int], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = {p for p in pids if os.path.exists(f"/proc/{p}") and not _is_zombie(p)}
        time.sleep(0.1)
    assert not pids, f"processes left behind: {pids}"


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[-1].startswith("Z")
    except FileNotFoundError:
        return True


def test_a_step_batch_gives_a_follower_what_the_runner_reads_of_each_sequence():
    """Decoding sequences with a pending token, drafts and window pages: the follower's stand-ins
    read the same tokens, positions, page rows and draft ids as rank 0's sequences."""
    pool = MemoryPool(
        24, 4, 2, 1, 4, torch.float32, torch.device("cpu"), window=8, window_layers=frozenset({0}),
        num_window_pages=24, max_pages_per_seq=8,
    )  # fmt: skip
    seqs = [RequestSequence(f"r{i}", list(range(5 + 7 * i)), SamplingParams()) for i in range(3)]
    for seq in seqs:
        pool.grow(seq, seq.num_tokens + 1)
        seq.num_computed_tokens = seq.num_tokens - 1
    seqs[0].token_ids[-1] = PENDING_TOKEN
    seqs[2].draft_ids = [7, 8]
    batch = ScheduledBatch(seqs, [1, 1, 3])
    pending = torch.tensor([11, 12])
    msg = msgspec.msgpack.decode(msgspec.msgpack.encode(step_message(batch, pending, {id(seqs[0]): 1})), type=StepBatch)
    shadow, rows = shadow_batch(msg, pool.max_pages_per_seq, pool.scratch_page, pool.window_scratch_page)
    assert msg.pending_len == 2 and rows == {id(shadow.seqs[0]): 1}
    assert shadow.num_new_tokens == [1, 1, 3]
    for ours, theirs, n in zip(seqs, shadow.seqs, batch.num_new_tokens, strict=True):
        p = ours.num_computed_tokens
        assert (theirs.num_computed_tokens, theirs.num_tokens) == (p, ours.num_tokens)
        assert theirs.token_ids[p] == ours.token_ids[p] and theirs.token_ids[p : p + n] == ours.token_ids[p : p + n]
        assert theirs.draft_ids == ours.draft_ids and not theirs.needs_prompt_logits
        assert list(theirs.pages) == ours.pages
        assert np.array_equal(theirs.page_row, ours.page_row) and np.array_equal(theirs.window_row, ours.window_row)
