"""Prompt logprobs: each prompt token's logprob given the ones before it, computed during prefill.

The engine's values are transformers' log_softmax on the same weights (float32, CPU), however the
prefill is chunked, batched or preempted; they come once, with a request's first output.
"""

import pytest
import torch
import transformers

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.sampling_params import SamplingParams

TOL = 1e-4
K = 5
PARAMS = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=K)


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def model_path(request, qwen3_path, gemma3_path):
    return str(qwen3_path if request.param == "qwen3" else gemma3_path)


@pytest.fixture(scope="module")
def reference(model_path):
    """log_softmax of transformers' logits at every position of a prompt, on the same weights."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).to("cpu").eval()

    def logprobs(prompt: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)

    return logprobs


def _assert_match(entries, prompt: list[int], expected: torch.Tensor, k: int) -> None:
    """entries[i] is prompt token i + 1 at position i: its logprob and the top k there."""
    assert [e.token_id for e in entries] == prompt[1:]
    got = torch.tensor([e.logprob for e in entries])
    want = expected[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
    assert (got - want).abs().max().item() < TOL
    for i, e in enumerate(entries):
        assert len(e.top) == k
        if not k:
            continue
        # The reference's top k values in rank order, each id at its reference value (ids of a
        # near tie may swap places).
        ids = torch.tensor([t for t, _ in e.top])
        values = torch.tensor([v for _, v in e.top])
        assert (values - expected[i].topk(k).values).abs().max().item() < TOL
        assert (values - expected[i, ids]).abs().max().item() < TOL


@pytest.mark.parametrize(
    "setting",
    [
        dict(),
        dict(max_num_batched_tokens=4, page_size=4),  # chunked prefill: 4 prompt positions a step
        dict(num_pages=12, page_size=4, max_num_batched_tokens=8),  # preemption by recompute, mid-prefill
    ],
    ids=["batched", "chunked-prefill", "preemption"],
)
def test_prompt_logprobs_equal_transformers_log_softmax(model_path, reference, setting):
    engine = InferenceEngine(model_path=model_path, dtype="float32", device="cpu", **setting)
    prompts = _prompts(engine.vocab_size, [19, 5, 33, 12, 2, 27, 8, 40])
    outputs = engine.generate(prompts, PARAMS)
    if "num_pages" in setting:
        assert engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outputs):
        _assert_match(out.prompt_logprobs, prompt, reference(prompt), K)
    assert engine.pool.num_used_pages == 0


def test_a_batch_mixes_sequences_with_and_without(model_path, reference):
    engine = InferenceEngine(model_path=model_path, dtype="float32", device="cpu", max_num_batched_tokens=16)
    prompts = _prompts(engine.vocab_size, [21, 13, 30, 9], seed=3)
    plain = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    expected_tokens = [o.token_ids for o in engine.generate(prompts, plain)]

    ks = [None, 0, None, 3]
    params = [SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=k) for k in ks]
    outputs = engine.generate(prompts, params)
    assert [o.token_ids for o in outputs] == expected_tokens  # asking changes nothing else
    for prompt, k, out in zip(prompts, ks, outputs):
        if k is None:
            assert out.prompt_logprobs is None
        else:
            _assert_match(out.prompt_logprobs, prompt, reference(prompt), k)


def test_alternatives_are_sorted_and_hold_the_prompt_token_at_its_own_value(qwen3_path):
    engine = InferenceEngine(model_path=qwen3_path, dtype="float32", device="cpu")
    prompt = _prompts(engine.vocab_size, [24], seed=5)[0]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=20)
    entries = engine.generate([prompt], params)[0].prompt_logprobs
    assert len(entries) == len(prompt) - 1
    for e in entries:
        values = [v for _, v in e.top]
        assert len(values) == 20 and values == sorted(values, reverse=True)
        assert len({t for t, _ in e.top}) == 20
        assert all(v <= 0.0 for v in values) and e.logprob <= values[0]
        listed = dict(e.top)
        if e.token_id in listed:
            assert listed[e.token_id] == e.logprob
        else:
            assert e.logprob <= values[-1]


def test_they_come_once_with_the_first_output(qwen3_path):
    engine = InferenceEngine(model_path=qwen3_path, dtype="float32", device="cpu", max_num_batched_tokens=5)
    long_prompt, one_token = _prompts(engine.vocab_size, [17, 1], seed=7)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, prompt_logprobs=2)
    engine.add_request("long", long_prompt, params)
    engine.add_request("one", one_token, params)
    outputs = {"long": [], "one": []}
    while engine.has_work():
        for out in engine.step():
            outputs[out.request_id].append(out)
    for rid, prompt in (("long", long_prompt), ("one", one_token)):
        first, *rest = outputs[rid]
        assert first.token_ids and len(first.prompt_logprobs) == len(prompt) - 1
        assert all(out.prompt_logprobs is None for out in rest)


def test_the_prefix_cache_is_skipped_for_them_and_kept_for_others(qwen3_path):
    engine = InferenceEngine(model_path=qwen3_path, dtype="float32", device="cpu", page_size=4)
    prompt = _prompts(engine.vocab_size, [26], seed=9)[0]
    plain = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    first = engine.generate([prompt], PARAMS)[0]  # computed in full; its pages are cached for others

    def first_output(rid: str, params: SamplingParams):
        engine.add_request(rid, prompt, params)
        while True:
            for out in engine.step():
                if out.request_id == rid:
                    engine.abort(rid)
                    engine.step()
                    return out

    cached = first_output("plain", plain)
    assert cached.num_cached_tokens == 24
    again = first_output("again", PARAMS)
    assert again.num_cached_tokens == 0
    assert again.prompt_logprobs == first.prompt_logprobs
    assert engine.pool.num_used_pages == 0
