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


def _greedy_decode_logits(engine: InferenceEngine, token_ids: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decode through the engine's scheduler, runner and cache: the tokens, and the full logits
    [steps, vocab] each was picked from (the first from the prefill, the rest one-token decode steps)."""
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True)
    seq = RequestSequence("parity-decode", list(token_ids), params)
    engine.scheduler.add(seq)
    rows = []
    while len(seq.output_token_ids) < steps:
        batch = engine.scheduler.schedule()
        logits, sampled = engine.runner.execute(batch)
        engine.scheduler.commit(batch)
        if sampled:
            rows.append(logits[0])
            seq.token_ids.append(int(logits[0].argmax()))
    engine.scheduler.finish(seq, "length")
    return seq.output_token_ids, torch.stack(rows)


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_logits_match_transformers(case, tmp_path):
    make, kwargs = CASES[case]
    path = make(tmp_path / case, **kwargs)
    # Both sides on the CPU in float32, so the test compares like with like on a GPU machine too.
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to("cpu").eval()
    # A 4-token budget forces chunked prefill; 4-token pages make the page table non-trivial.
    engine = InferenceEngine(model_path=str(path), dtype="float32", device="cpu", page_size=4, max_num_batched_tokens=4)
    vocab = engine.vocab_size
    prompt = torch.randint(3, vocab, (37,), generator=torch.Generator().manual_seed(1)).tolist()

    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0]
    ours = _all_position_logits(engine, prompt)
    assert ours.device == expected.device == torch.device("cpu") and ours.shape == expected.shape
    prefill_diff = (ours - expected).abs().max().item()
    assert prefill_diff < TOL, f"{case}: prefill logits differ by up to {prefill_diff:.2e}"

    # Step-by-step decode, over the whole vocabulary: each step's log-distribution against the reference's.
    steps = 12
    tokens, decode_logits = _greedy_decode_logits(engine, prompt, steps)
    full = prompt + tokens
    with torch.no_grad():
        expected_logprobs = torch.log_softmax(reference(torch.tensor([full])).logits[0], -1)[len(prompt) - 1 : -1]
    assert decode_logits.shape == expected_logprobs.shape == (steps, vocab)
    decode_diff = (torch.log_softmax(decode_logits, -1) - expected_logprobs).abs().max().item()
    assert decode_diff < TOL, f"{case}: decode logprobs differ by up to {decode_diff:.2e} over the vocabulary"
    assert tokens == expected_logprobs.argmax(-1).tolist()

    # Through generate() and the sampler: the reported top-20 logprobs are the reference's top 20 (values
    # in rank order), and each reported id carries the reference's logprob.
    params = SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=20)
    out = engine.generate([prompt], params)[0]
    assert out.token_ids == tokens
    top_diff = 0.0
    for step, lp in enumerate(out.logprobs):
        ids = torch.tensor([tok for tok, _ in lp.top])
        values = torch.tensor([value for _, value in lp.top])
        want = expected_logprobs[step].topk(20).values
        top_diff = max(top_diff, (values - expected_logprobs[step, ids]).abs().max().item())
        top_diff = max(top_diff, (values - want).abs().max().item())
    print(f"{case}: max|diff| prefill {prefill_diff:.2e}, decode logprobs {decode_diff:.2e}, top-20 {top_diff:.2e}")
    assert top_diff < TOL, f"{case}: reported top-20 logprobs differ by up to {top_diff:.2e}"
    assert engine.pool.num_used_pages == 0
