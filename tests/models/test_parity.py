"""Our Qwen3 and Gemma3 forward passes equal transformers' on the same tiny random weights."""

import pytest
import torch
import transformers
from checkpoints import make_gemma3_checkpoint, make_qwen3_checkpoint

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.engine.request_sequence import RequestSequence
from sfllm_core.models.common import ForwardContext
from sfllm_core.sampling_params import SamplingParams

TOL = 1e-4

CASES = {
    "qwen3-tied-gqa2": (
        make_qwen3_checkpoint,
        dict(tie_word_embeddings=True, num_attention_heads=4, num_key_value_heads=2),
    ),
    "qwen3-untied-mha": (
        make_qwen3_checkpoint,
        dict(tie_word_embeddings=False, num_attention_heads=4, num_key_value_heads=4),
    ),
    "qwen3-gqa4": (make_qwen3_checkpoint, dict(num_attention_heads=8, num_key_value_heads=2)),
    "gemma3-window8-gqa4": (
        make_gemma3_checkpoint,
        dict(sliding_window=8, num_attention_heads=4, num_key_value_heads=1),
    ),
    "gemma3-window16-gqa2": (
        make_gemma3_checkpoint,
        dict(sliding_window=16, num_attention_heads=4, num_key_value_heads=2),
    ),
}


def _all_position_logits(engine: InferenceEngine, token_ids: list[int]) -> torch.Tensor:
    """Prefill token_ids through the engine's own scheduler, runner and cache; logits at every position."""
    seq = RequestSequence("parity", token_ids, SamplingParams(max_tokens=1))
    engine.scheduler.add(seq)
    chunks = []
    while seq.num_computed_tokens < len(token_ids):
        batch = engine.scheduler.schedule()
        input_ids, meta, _ = engine.runner.prepare(batch)
        engine.runner.backend.prepare(meta)
        with torch.inference_mode():
            hidden = engine.model(
                input_ids, meta.positions, ForwardContext(engine.runner.backend, meta, engine.pool.kv_caches)
            )
            chunks.append(engine.model.compute_logits(hidden))
        engine.scheduler.commit(batch)
    engine.scheduler.finish(seq, "stop")
    return torch.cat(chunks)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_logits_match_transformers(case, tmp_path):
    make, kwargs = CASES[case]
    path = make(tmp_path / case, **kwargs)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    # A 4-token budget forces chunked prefill; 4-token pages make the page table non-trivial.
    engine = InferenceEngine(model_path=str(path), dtype="float32", page_size=4, max_num_batched_tokens=4)
    vocab = engine.vocab_size
    prompt = torch.randint(3, vocab, (37,), generator=torch.Generator().manual_seed(1)).tolist()

    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    ours = _all_position_logits(engine, prompt)
    prefill_diff = (ours - expected).abs().max().item()

    # Step-by-step decode through generate(): each step's logprobs (top 20) against the reference's.
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=20)
    out = engine.generate([prompt], params)[0]
    full = prompt + out.token_ids
    with torch.no_grad():
        expected_logprobs = torch.log_softmax(reference(torch.tensor([full])).logits[0], -1)[len(prompt) - 1 : -1]
    assert out.token_ids == expected_logprobs.argmax(-1).tolist()
    decode_diff = 0.0
    for step, lp in enumerate(out.logprobs):
        ids = torch.tensor([tok for tok, _ in lp.top])
        values = torch.tensor([value for _, value in lp.top])
        decode_diff = max(decode_diff, (values - expected_logprobs[step, ids]).abs().max().item())
    print(f"{case}: prefill max|diff|={prefill_diff:.2e} decode (logprob) max|diff|={decode_diff:.2e}")
    assert prefill_diff < TOL
    assert decode_diff < TOL
    assert engine.pool.num_used_pages == 0
