"""Tensor parallelism on the CPU: two gloo ranks (rank 0 here, rank 1 a process it starts) serve the
tiny checkpoints exactly as one process does: same greedy tokens, logprobs within float32 rounding.

Each engine is built once per module (start-up is a second or two per rank); the tests then ask
for different batches of it. Prompts are longer than a prefill chunk and than Gemma3's window.
"""

from collections.abc import Iterator

import pytest

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.sampling_params import SamplingParams

# Small pages and chunks so that prefills take several steps and sequences several pages.
SETTINGS = dict(device="cpu", dtype="float32", page_size=4, num_pages=96, max_num_batched_tokens=16)
PROMPTS = [
    [1, 5, 9, 33, 7, 100],
    [3 + i % 200 for i in range(37)],  # over two chunks; past Gemma3's window of 8
    [250, 12],
]
GREEDY = SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=4)
# float32 sums in another order (each rank's half, then the all-reduce): the last bits differ.
LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def engines(request, qwen3_path, gemma3_path) -> Iterator[tuple[InferenceEngine, InferenceEngine]]:
    path = qwen3_path if request.param == "qwen3" else gemma3_path
    single = InferenceEngine(path, **SETTINGS)
    sharded = InferenceEngine(path, tensor_parallel_size=2, **SETTINGS)
    yield single, sharded
    sharded.shutdown()


def _assert_same(expected, got) -> None:
    for a, b in zip(expected, got, strict=True):
        assert b.token_ids == a.token_ids
        assert b.finish_reason == a.finish_reason == "length"
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert y.token_id == x.token_id
            assert abs(y.logprob - x.logprob) < LOGPROB_TOLERANCE
            assert [t for t, _ in y.top] == [t for t, _ in x.top]
            assert max(abs(p - q) for (_, p), (_, q) in zip(x.top, y.top)) < LOGPROB_TOLERANCE


def test_two_ranks_give_the_tokens_and_logprobs_of_one(engines):
    single, sharded = engines
    _assert_same(single.generate(PROMPTS, GREEDY), sharded.generate(PROMPTS, GREEDY))


def test_each_rank_holds_half_the_query_heads_and_its_kv_heads(engines):
    single, sharded = engines
    attn, whole = sharded.model.model.layers[0].self_attn, single.model.model.layers[0].self_attn
    assert attn.num_heads * 2 == whole.num_heads
    # Qwen3's 2 KV heads split one per rank; Gemma3's single KV head is replicated on both.
    assert attn.num_kv_heads == max(1, whole.num_kv_heads // 2)
    assert sharded.pool.kv_caches[0][0].shape[1] == attn.num_kv_heads
    down = [e.model.model.layers[0].mlp.down_proj.weight.shape for e in (sharded, single)]
    assert (down[0][0], down[0][1] * 2) == tuple(down[1])


def test_prompt_logprobs_and_sampling_with_a_seed_match_too(engines):
    single, sharded = engines
    params = [
        SamplingParams(max_tokens=6, temperature=0.8, top_p=0.9, seed=7, ignore_eos=True, prompt_logprobs=2),
        SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, repetition_penalty=1.3),
    ]
    expected, got = single.generate(PROMPTS[:2], params), sharded.generate(PROMPTS[:2], params)
    for a, b in zip(expected, got, strict=True):
        assert b.token_ids == a.token_ids
    for x, y in zip(expected[0].prompt_logprobs, got[0].prompt_logprobs, strict=True):
        assert y.token_id == x.token_id and abs(y.logprob - x.logprob) < LOGPROB_TOLERANCE
