"""On a GPU: n-gram speculation with verify steps replayed from CUDA graphs changes no token."""

import pytest
import torch

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

# Without the gate (its choices follow timings): these tests count verify steps.
NGRAM = dict(
    speculative_algorithm="ngram", num_speculative_tokens=4, ngram_max=3, ngram_min=1, speculative_adaptive=False
)
COMMON = dict(dtype="float32", device="cuda", kv_cache_memory_gb=0.5, max_num_seqs=16, cuda_graph_max_batch=16)


def _prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    return prompts + [prompts[0][:6] * 4, prompts[2][:9] * 3]


@pytest.mark.parametrize("which", ["qwen3", "gemma3"])
def test_verify_graphs_give_the_tokens_of_plain_decoding(which, qwen3_path, gemma3_path):
    path = str(qwen3_path if which == "qwen3" else gemma3_path)
    plain = InferenceEngine(model_path=path, attention_backend="triton", **COMMON)
    spec = InferenceEngine(model_path=path, attention_backend="triton", **COMMON, **NGRAM)
    assert spec.runner.verify is not None and spec.runner.verify.graphs
    prompts = _prompts(plain.vocab_size, [19, 5, 33, 12, 1, 27, 8, 40])
    for params in (
        SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=32, temperature=0.8, top_k=20, seed=5, ignore_eos=True, repetition_penalty=1.1),
    ):
        want, got = plain.generate(prompts, params), spec.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert spec.runner.verify.num_steps > 0 and spec.proposer.num_accepted_tokens > 0
    assert spec.pool.num_used_pages == 0 and spec.pool.num_used_window_pages == 0 and not spec.has_work()
    # Batch 1, as the benchmark runs: every verify step from a graph.
    before = spec.runner.verify.num_steps
    one = spec.generate([prompts[-1]], SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))[0]
    assert (
        one.token_ids
        == plain.generate([prompts[-1]], SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True))[0].token_ids
    )
    assert spec.runner.verify.num_steps > before


@pytest.mark.parametrize("which", ["qwen3", "gemma3"])
def test_verify_graphs_against_the_torch_path(which, qwen3_path, gemma3_path):
    """Triton extend attention over padded verify rows against the plain-PyTorch ragged path."""
    path = str(qwen3_path if which == "qwen3" else gemma3_path)
    spec = InferenceEngine(model_path=path, attention_backend="triton", **COMMON, **NGRAM)
    ref = InferenceEngine(model_path=path, attention_backend="torch", cuda_graphs=False, **COMMON, **NGRAM)
    prompts = _prompts(spec.vocab_size, [19, 5, 33, 12])
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in spec.generate(prompts, params)] == [o.token_ids for o in ref.generate(prompts, params)]
