"""On two GPUs: a 2-way tensor-parallel engine (NCCL, all-reduces captured in the decode and prefill
graphs, overlapped decode steps) gives one GPU's greedy tokens. Run with NCCL_NVLS_ENABLE=0 on the lent
machines. On one GPU these tests skip."""

import os

import pytest
import torch

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs"),
]
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


@pytest.mark.parametrize("which", ["qwen3", "gemma3"])
def test_two_gpus_give_one_gpus_tokens_with_graphs_and_overlap(which, qwen3_path, gemma3_path):
    path = str(qwen3_path if which == "qwen3" else gemma3_path)
    settings = dict(dtype="float32", device="cuda", kv_cache_memory_gb=0.5, max_num_seqs=16, cuda_graph_max_batch=16)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 384, (n,), generator=g).tolist() for n in (19, 5, 33, 12, 1, 27, 8, 40, 64, 3)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    single = InferenceEngine(path, **settings)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_k=20, seed=3, ignore_eos=True)
    expected = [o.token_ids for o in single.generate(prompts, params)]
    expected_seeded = [o.token_ids for o in single.generate(prompts[:4], seeded)]
    sharded = InferenceEngine(path, tensor_parallel_size=2, **settings)
    try:
        assert sharded.runner.graphs is not None and sharded.device == torch.device("cuda", 0)
        assert [o.token_ids for o in sharded.generate(prompts, params)] == expected
        assert sharded.num_overlapped_steps > 0  # tokens fed back on the GPU reached rank 1 by broadcast
        assert [o.token_ids for o in sharded.generate(prompts[:4], seeded)] == expected_seeded
        assert sharded.pool.num_used_pages == 0
    finally:
        sharded.shutdown()
