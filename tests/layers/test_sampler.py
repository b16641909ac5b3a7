"""Sampler behaviour on hand-made logits."""

import math

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from sfllm_core.engine.request_sequence import RequestSequence
from sfllm_core.layers.sampler import Sampler
from sfllm_core.sampling_params import SamplingParams


def _seq(prompt=(1, 2, 3), output=(), **params) -> RequestSequence:
    seq = RequestSequence("r", list(prompt), SamplingParams(**params))
    seq.token_ids += list(output)
    return seq


def _draws(params: dict, logits: torch.Tensor, n: int = 2000) -> torch.Tensor:
    sampler = Sampler(seed=0)
    seqs = [_seq(**params) for _ in range(n)]
    tokens, _ = sampler(logits.expand(n, -1).clone(), seqs)
    return torch.bincount(torch.tensor(tokens), minlength=logits.shape[-1]).float() / n


LOGITS = torch.tensor([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])


def test_greedy_is_argmax():
    tokens, _ = Sampler()(torch.randn(5, 50), [_seq(temperature=0.0) for _ in range(5)])
    assert len(tokens) == 5
    logits = torch.randn(5, 50)
    assert Sampler()(logits, [_seq(temperature=0.0) for _ in range(5)])[0] == logits.argmax(-1).tolist()


# Weissman et al. (2003): for n draws from a k-outcome distribution p, the empirical p_hat obeys
# P(||p_hat - p||_1 >= eps) <= (2^k - 2) exp(-n eps^2 / 2). Solving for a 1e-6 false-failure rate:
_DRAWS = 20000
_L1_BOUND = math.sqrt(2 * math.log((2 ** LOGITS.shape[-1] - 2) / 1e-6) / _DRAWS)  # ~0.042


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_sampling_follows_softmax_of_scaled_logits(temperature):
    expected = torch.softmax(LOGITS[0].double() / temperature, -1)
    # The bound separates this temperature from the others: sampling at a wrong one must fail.
    for other in {0.5, 1.0, 2.0} - {temperature}:
        assert (torch.softmax(LOGITS[0].double() / other, -1) - expected).abs().sum() > 4 * _L1_BOUND
    freq = _draws(dict(temperature=temperature), LOGITS, n=_DRAWS).double()
    distance = (freq - expected).abs().sum().item()
    assert distance < _L1_BOUND, f"T={temperature}: L1 {distance:.4f} from softmax(logits / T), {freq.tolist()}"


def test_top_k_top_p_min_p_restrict_the_support():
    assert set(_draws(dict(temperature=1.0, top_k=2), LOGITS).nonzero().flatten().tolist()) == {0, 1}
    # softmax(LOGITS) = [.41, .25, .15, .06, ...]: top_p 0.6 keeps the first two (0.41 < 0.6 <= 0.66).
    assert set(_draws(dict(temperature=1.0, top_p=0.6), LOGITS).nonzero().flatten().tolist()) == {0, 1}
    # min_p 0.3 keeps tokens with p >= 0.3 * 0.41: ids 0, 1, 2.
    assert set(_draws(dict(temperature=1.0, min_p=0.3), LOGITS).nonzero().flatten().tolist()) == {0, 1, 2}
    assert _draws(dict(temperature=1.0, top_k=1), LOGITS)[0] == 1.0


def test_seeded_requests_repeat_regardless_of_batch():
    logits = torch.randn(1, 100)
    alone_seq, batched_seq = _seq(temperature=1.0, seed=42), _seq(temperature=1.0, seed=42)
    alone_sampler, batched_sampler = Sampler(seed=1), Sampler(seed=7)
    alone, batched = [], []
    for step in range(6):
        alone.append(alone_sampler(logits.clone(), [alone_seq])[0][0])
        others = [_seq(temperature=1.0) for _ in range(step % 3)]
        batched.append(batched_sampler(logits.expand(1 + len(others), -1).clone(), others + [batched_seq])[0][-1])
        alone_seq.token_ids.append(alone[-1])  # as the engine appends each drawn token
        batched_seq.token_ids.append(batched[-1])
    assert alone == batched
    assert len(set(alone)) > 1  # it is sampling, not argmax


def test_seeded_noise_depends_on_the_output_position_only():
    """A sequence continuing another's output (a migrated request) draws what the original would have next."""
    logits = torch.randn(1, 100)
    original = _seq(temperature=1.0, seed=9)
    drawn = []
    for _ in range(8):
        drawn.append(Sampler(seed=1)(logits.clone(), [original])[0][0])
        original.token_ids.append(drawn[-1])
    for cut in (1, 5):
        continued = RequestSequence("c", [1, 2, 3], SamplingParams(temperature=1.0, seed=9), drawn[:cut])
        again = []
        for _ in range(8 - cut):
            again.append(Sampler(seed=2)(logits.clone(), [continued])[0][0])
            continued.token_ids.append(again[-1])
        assert again == drawn[cut:]
    assert len(set(drawn)) > 1
    # The same output so far under another seed draws other tokens.
    other = [Sampler()(logits.clone(), [_seq(output=drawn[:k], temperature=1.0, seed=10)])[0][0] for k in range(8)]
    assert other != drawn


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(1, 20)
    seq = _seq(prompt=(1, 5, 7), output=(7, 9), repetition_penalty=1.3)
    expected = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([seq.token_ids]), logits.clone())
    assert torch.allclose(Sampler()._apply_penalties(logits, [seq]), expected)


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    logits = torch.zeros(1, 10)
    seq = _seq(prompt=(1, 2), output=(3, 3, 4), presence_penalty=0.5, frequency_penalty=0.25)
    out = Sampler()._apply_penalties(logits, [seq])[0]
    assert out[3].item() == -(0.5 + 2 * 0.25)
    assert out[4].item() == -(0.5 + 0.25)
    assert out[1].item() == 0.0 and out[2].item() == 0.0


def test_logprobs_are_the_raw_distribution():
    logits = torch.randn(2, 30)
    seqs = [_seq(temperature=0.0, logprobs=True, top_logprobs=3), _seq(temperature=0.0)]
    tokens, logprobs = Sampler()(logits, seqs)
    expected = torch.log_softmax(logits[0], -1)
    assert logprobs[1] is None
    assert abs(logprobs[0].logprob - expected[tokens[0]].item()) < 1e-6
    assert [t for t, _ in logprobs[0].top] == expected.topk(3).indices.tolist()


def test_logit_bias_steers_greedy_rows_and_bans_tokens():
    logits = torch.randn(3, 40)
    favoured = int(logits[0].argmin())
    best = int(logits[2].argmax())
    seqs = [
        _seq(temperature=0.0, logit_bias={favoured: 100.0}),
        _seq(temperature=0.0),  # unbiased rows in the same batch are left alone
        _seq(temperature=0.0, logit_bias={best: -100.0}),
    ]
    tokens, _ = Sampler()(logits.clone(), seqs)
    assert tokens[0] == favoured
    assert tokens[1] == int(logits[1].argmax())
    assert tokens[2] == int(logits[2].topk(2).indices[1])


def test_a_token_biased_by_minus_100_is_never_sampled():
    freq = _draws(dict(temperature=1.0, logit_bias={0: -100.0, 3: 2.0}), LOGITS)
    assert freq[0] == 0.0
    # +2 on token 3 makes it as likely as token 0 was (logit 0 + 2 = 2).
    expected = torch.softmax(torch.tensor([-98.0, 1.5, 1.0, 2.0, -1.0, -3.0]), -1)
    assert (freq - expected).abs().sum() < 0.1


def test_logit_bias_leaves_logprobs_raw_and_overlap_allowed():
    logits = torch.randn(1, 20)
    seq = _seq(temperature=0.0, logprobs=True, logit_bias={5: 100.0})
    tokens, logprobs = Sampler()(logits.clone(), [seq])
    assert tokens == [5]
    assert abs(logprobs[0].logprob - torch.log_softmax(logits[0], -1)[5].item()) < 1e-6
    assert not Sampler.needs_host(seq)  # a bias reads no history: its steps may still overlap


@pytest.mark.parametrize("vocab,k", [(151936, 5), (1024, 20), (1000, 3), (256, 3)])
def test_two_stage_topk_matches_torch_topk(vocab, k):
    from sfllm_core.layers.sampler import _topk

    gen = torch.Generator().manual_seed(vocab)
    # A permutation of distinct values: no ties, so the order is unique.
    x = torch.stack([torch.randperm(vocab, generator=gen).float() for _ in range(3)])
    values, ids = _topk(x, k)
    want_values, want_ids = x.topk(k, dim=-1)
    assert torch.equal(values, want_values) and torch.equal(ids, want_ids)
