"""--kv-cache-dtype fp8: K and V stored as float8_e4m3fn, more tokens in the same memory, the same greedy text
up to where rounding can part it (a near tie of the reference)."""

import pytest
import torch

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.errors import InvalidRequestError
from sfllm_core.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=5)


def _prompts(n: int = 4) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(3, 384, (length,), generator=gen).tolist() for length in (9, 3, 30, 17)[:n]]


def _agree_until_a_near_tie(ours, ref, gap: float) -> int:
    """Where the greedy texts part, ours took a token the reference ranks within gap of its own top one."""
    agree = next((i for i, (x, y) in enumerate(zip(ours.token_ids, ref.token_ids)) if x != y), len(ref.token_ids))
    if agree < len(ref.token_ids):
        top = dict(ref.logprobs[agree].top)
        best = max(top.values())
        taken = ours.token_ids[agree]
        assert taken in top and best - top[taken] <= gap, (agree, taken, top)
    return agree


def test_fp8_kv_cache_holds_more_tokens_in_the_same_memory(qwen3_path):
    kw = dict(model_path=qwen3_path, dtype="float32", device="cpu", kv_cache_memory_gb=0.0005, max_num_seqs=4)
    wide, narrow = InferenceEngine(**kw), InferenceEngine(**kw, kv_cache_dtype="fp8")
    assert narrow.pool.kv_caches[0][0].dtype == torch.float8_e4m3fn
    assert narrow.pool.num_pages == 4 * wide.pool.num_pages  # 1 byte per element against float32's 4


@pytest.mark.parametrize("which", ["qwen3", "gemma3"])  # gemma3: the sliding-window pool is float8 too
def test_fp8_kv_cache_keeps_greedy_text(which, qwen3_path, gemma3_path):
    path = qwen3_path if which == "qwen3" else gemma3_path
    ref = InferenceEngine(model_path=path, dtype="float32", device="cpu")
    fp8 = InferenceEngine(model_path=path, dtype="float32", device="cpu", kv_cache_dtype="fp8")
    assert all(k.dtype == torch.float8_e4m3fn for k, _ in fp8.pool.kv_caches)
    parted = [
        _agree_until_a_near_tie(o, r, 0.5)
        for o, r in zip(fp8.generate(_prompts(), PARAMS), ref.generate(_prompts(), PARAMS))
    ]
    # The tiny random models' attention is sharp and their near ties many: measured 5-16 tokens
    # before the first parting (Qwen3), each at a tie; a wrong cache read parts at once, off the top.
    assert sum(parted) >= 4 * len(parted), parted
    # A prefix-cache hit reads float8 pages written by an earlier request: the same tokens again.
    again = fp8.generate(_prompts(), PARAMS)
    assert [o.token_ids for o in again] == [o.token_ids for o in fp8.generate(_prompts(), PARAMS)]


def test_unknown_kv_cache_dtype_is_refused(qwen3_path):
    with pytest.raises(InvalidRequestError, match="kv_cache_dtype must be auto or fp8"):
        InferenceEngine(model_path=qwen3_path, device="cpu", kv_cache_dtype="int8")


@pytest.mark.gpu
@pytest.mark.parametrize("quantization", ["none", "fp8"])
def test_fp8_kv_cache_on_gpu_keeps_greedy_text(qwen3_path, quantization):
    """Triton attention (the float8 loads and stores), decode graphs; with FP8 weights too."""
    kw = dict(model_path=qwen3_path, dtype="float32", device="cuda", max_num_seqs=8, cuda_graph_max_batch=8)
    ref = InferenceEngine(**kw, quantization=quantization)
    fp8 = InferenceEngine(**kw, quantization=quantization, kv_cache_dtype="fp8")
    assert fp8.runner.graphs is not None
    parted = [
        _agree_until_a_near_tie(o, r, 0.5)
        for o, r in zip(fp8.generate(_prompts(), PARAMS), ref.generate(_prompts(), PARAMS))
    ]
    assert sum(parted) >= 4 * len(parted), parted
