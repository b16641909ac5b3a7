"""The real model: Gemma 3 270M from the GGUF package, our engine against transformers on the same weights."""

import pytest
import torch
import transformers

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.models.loader import load_model_config, load_weights
from sfllm_core.sampling_params import SamplingParams

PROMPTS = [
    "<bos>The capital of France is",
    "<bos>Once upon a time, in a small village,",
    "<bos>The three primary colors are",
    "<bos>Water boils at a temperature of",
]


@pytest.mark.slow
def test_greedy_32_tokens_equal_transformers(gemma270m_path):
    # The float32 dequantized path (the CPU default serves the GGUF's quantized blocks: tests/models/test_gguf.py).
    engine = InferenceEngine(model_path=gemma270m_path, dtype="float32", quantization="none")
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
    ours = engine.generate(PROMPTS, params)  # batched together, as a server would run them

    config = load_model_config(gemma270m_path)
    reference = transformers.Gemma3ForCausalLM(config).eval()
    reference.load_state_dict({n: t for n, t, _ in load_weights(gemma270m_path, torch.float32)}, strict=False)
    reference.tie_weights()
    for prompt, out in zip(PROMPTS, ours):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            expected = reference.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None)[0, ids.shape[1] :]
        print(f"{prompt!r} -> {out.text!r}")
        assert out.token_ids == expected.tolist()
    assert ours[0].prompt_token_ids[:2] == [2, 818]  # one <bos>, not two
    # Alone, the output projection takes the one-row route (split over the cores): same tokens.
    assert engine.generate(PROMPTS[:1], params)[0].token_ids == ours[0].token_ids
    assert engine.pool.num_used_pages == 0


COPY_PROMPT = (
    "<bos>The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick and "
    "polished the great lens until it shone.\n\nThe same text again:\nThe lighthouse keeper"
)


@pytest.mark.slow
def test_greedy_text_is_the_same_with_speculation(gemma270m_path, tmp_path):
    """The served default (the GGUF's quantized blocks): n-gram drafts (which a copying prompt feeds)
    and a random EAGLE-3 head (whose drafts are nearly all rejected) change no token, batched."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from checkpoints import make_eagle3_checkpoint

    target = tmp_path / "target"
    target.mkdir()
    load_model_config(gemma270m_path).to_json_file(target / "config.json")
    head = make_eagle3_checkpoint(tmp_path / "head", target, draft_vocab_size=512)
    prompts = [COPY_PROMPT, PROMPTS[1]]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    plain = InferenceEngine(model_path=gemma270m_path)
    want = plain.generate(prompts, params)
    del plain
    for setting in (
        dict(speculative_algorithm="ngram", speculative_adaptive=False),
        dict(speculative_algorithm="eagle3", speculative_draft_model=str(head), num_speculative_tokens=3),
    ):
        engine = InferenceEngine(model_path=gemma270m_path, **setting)
        got = engine.generate(prompts, params)
        assert [o.token_ids for o in got] == [o.token_ids for o in want], setting
        for a, b in zip(got, want):
            # A verify pass sends more rows through the quantized matmuls than a decode step, which then
            # take their multi-row route (other kernels, other rounding): logprobs agree to 2e-3 (n-gram)
            # and 1.1e-2 (EAGLE-3) as measured, the tokens exactly.
            worst = max(abs(x.logprob - y.logprob) for x, y in zip(a.logprobs, b.logprobs))
            assert worst < 5e-2, (setting, worst)
        assert engine.proposer.num_draft_tokens > 0 and engine.pool.num_used_pages == 0
        if setting["speculative_algorithm"] == "ngram":
            assert engine.proposer.num_accepted_tokens >= 8, engine.proposer.num_accepted_tokens  # it copies
        del engine
