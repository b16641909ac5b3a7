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
