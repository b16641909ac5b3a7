"""Prefill chunks padded to a captured length (the buffers CUDA graphs replay): tokens as the ragged path's."""

import pytest
import torch

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.engine.prefill_graphs import prefill_lengths
from sfllm_core.sampling_params import SamplingParams


def _prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def test_prefill_lengths_double_up_to_the_cap():
    assert prefill_lengths(128) == [16, 32, 64, 128]
    assert prefill_lengths(100) == [16, 32, 64, 100]
    assert prefill_lengths(16) == [16]


@pytest.mark.parametrize(
    "which, setting",
    [("qwen3", dict()), ("gemma3", dict()), ("gemma3", dict(max_num_batched_tokens=24)), ("qwen3", dict(num_pages=16))],
    ids=["qwen3", "gemma3-window", "gemma3-chunked", "qwen3-preemption"],
)
def test_padded_prefill_changes_no_token(which, setting, qwen3_path, gemma3_path):
    """One request at a time (each prefill alone, so padded) and then all at once (batched, ragged):
    greedy tokens and logprobs as the plain engine's, prefix-cache hits and windows included."""
    path = str(qwen3_path if which == "qwen3" else gemma3_path)
    common = dict(model_path=path, dtype="float32", page_size=4, max_context_length=128, **setting)
    plain = InferenceEngine(**common)
    padded = InferenceEngine(**common)
    padded.runner.enable_prefill_graphs(32)
    # Lengths across the padded sizes 16 and 32, one past them (eager), and a shared prefix (a cache hit).
    prompts = _prompts(plain.vocab_size, [3, 16, 17, 29, 40])
    prompts.append(prompts[3][:20] + prompts[1][:7])
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    want = plain.generate(prompts, params)
    alone = [padded.generate([p], params)[0] for p in prompts]
    together = padded.generate(prompts, params)
    for got in (alone, together):
        assert [o.token_ids for o in got] == [o.token_ids for o in want]
        for a, b in zip(got, want):
            assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a.logprobs, b.logprobs))
    assert padded.runner.prefill.num_replays >= 4
    assert padded.pool.num_used_pages == 0 and padded.pool.num_used_window_pages == 0, "pages leaked"


def test_prompt_logprobs_chunks_are_not_padded(qwen3_path):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32", enable_prefix_caching=False)
    engine.runner.enable_prefill_graphs(32)
    plain = InferenceEngine(model_path=str(qwen3_path), dtype="float32", enable_prefix_caching=False)
    prompt = _prompts(engine.vocab_size, [20])
    params = SamplingParams(max_tokens=2, temperature=0.0, prompt_logprobs=1)
    got, want = engine.generate(prompt, params)[0], plain.generate(prompt, params)[0]
    assert engine.runner.prefill.num_replays == 0
    assert [p.logprob for p in got.prompt_logprobs[1:]] == pytest.approx([p.logprob for p in want.prompt_logprobs[1:]])
