"""Speculative decoding with n-gram drafts: outputs as without it, exactly (greedy and seeded) or in distribution."""

import random

import pytest
import torch
from same_outputs import assert_same_greedy

from sfllm_core.config import EngineConfig
from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.engine.ngram import NgramProposer
from sfllm_core.engine.request_sequence import RequestSequence
from sfllm_core.engine.speculative import SpeculationGate, accepted_length, sample_rows
from sfllm_core.errors import InvalidRequestError
from sfllm_core.layers.sampler import Sampler
from sfllm_core.sampling_params import SamplingParams

# Without the gate, whose choices follow timings: these tests count drafts and rejections.
NGRAM = dict(
    speculative_algorithm="ngram", num_speculative_tokens=4, ngram_max=3, ngram_min=1, speculative_adaptive=False
)


def _prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    # And two that repeat themselves, as copying work does: their drafts are often right.
    return prompts + [prompts[0][:6] * 4, prompts[2][:9] * 3]


def _assert_clean(engine: InferenceEngine) -> None:
    assert engine.pool.num_used_pages == 0 and engine.pool.num_used_window_pages == 0, "pages leaked"
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine._seqs


def _assert_drafts_were_kept(engine: InferenceEngine) -> None:
    # Random weights fall into loops that n-gram lookup catches; without kept drafts nothing was tested.
    assert engine.proposer.num_accepted_tokens > 0, engine.proposer.num_draft_tokens


@pytest.fixture(scope="module", params=["qwen3", "gemma3"])
def model_path(request, qwen3_path, gemma3_path):
    return str(qwen3_path if request.param == "qwen3" else gemma3_path)


@pytest.mark.parametrize(
    "which, setting",
    [
        ("qwen3", dict()),
        ("gemma3", dict()),
        ("gemma3", dict(max_num_batched_tokens=6)),
        ("qwen3", dict(num_pages=20)),
        ("gemma3", dict(num_pages=20)),
    ],
    ids=["qwen3-batched", "gemma3-batched", "gemma3-chunked-prefill", "qwen3-preemption", "gemma3-preemption"],
)
def test_greedy_outputs_are_identical_with_drafts(which, setting, qwen3_path, gemma3_path):
    """Greedy tokens and their logprobs as without speculation, sliding-window layers (gemma3) included."""
    path = str(qwen3_path if which == "qwen3" else gemma3_path)
    common = dict(model_path=path, dtype="float32", page_size=4, **setting)
    plain = InferenceEngine(**common)
    spec = InferenceEngine(**common, **NGRAM)
    prompts = _prompts(plain.vocab_size, [19, 5, 33])
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    assert_same_greedy(got, want, 24)
    _assert_drafts_were_kept(spec)
    if "num_pages" in setting:
        assert spec.scheduler.num_preemptions > 0
    _assert_clean(spec)


def test_the_gate_changes_no_token(qwen3_path):
    """With the gate on (the default), whatever it measures: greedy tokens as without speculation."""
    common = dict(model_path=str(qwen3_path), dtype="float32", page_size=4)
    plain = InferenceEngine(**common)
    gated = InferenceEngine(**common, **{**NGRAM, "speculative_adaptive": True})
    prompts = _prompts(plain.vocab_size, [19, 5, 33])
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    for _ in range(2):  # the second run starts from the first one's measurements
        assert [o.token_ids for o in gated.generate(prompts, params)] == want
    assert gated.gate.cost(len(prompts), True) is not None
    _assert_clean(gated)


def test_stops_and_lengths_land_on_the_same_token_inside_a_multi_token_step(qwen3_path):
    """A stop token or max_tokens reached among accepted drafts ends the output right there."""
    common = dict(model_path=str(qwen3_path), dtype="float32", page_size=4)
    plain, spec = InferenceEngine(**common), InferenceEngine(**common, **NGRAM)
    prompts = _prompts(plain.vocab_size, [19, 5, 33, 12, 27])
    free = plain.generate(prompts, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    params = []
    for i, out in enumerate(free):
        if i % 2:
            params.append(SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[out.token_ids[5 + i]]))
        else:
            params.append(SamplingParams(max_tokens=3 + 5 * i, temperature=0.0, ignore_eos=True))
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in want]
    assert any(o.finish_reason == "stop" for o in got) and any(o.finish_reason == "length" for o in got)
    _assert_drafts_were_kept(spec)
    _assert_clean(spec)


def test_streamed_steps_carry_several_tokens_and_add_up_to_the_output(qwen3_path):
    spec = InferenceEngine(model_path=str(qwen3_path), dtype="float32", **NGRAM)
    prompt = _prompts(spec.vocab_size, [12, 5, 10])[-1]
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, logprobs=True)
    whole = InferenceEngine(model_path=str(qwen3_path), dtype="float32").generate([prompt], params)[0]
    spec.add_request("r", prompt, params)
    outputs = []
    while spec.has_work():
        outputs += spec.step()
    assert [t for o in outputs for t in o.token_ids] == whole.token_ids
    assert all(len(o.logprobs) == len(o.token_ids) for o in outputs if o.token_ids)
    assert max(len(o.token_ids) for o in outputs) > 1
    assert outputs[-1].finished and outputs[-1].finish_reason == "length"
    _assert_clean(spec)


@pytest.mark.parametrize(
    "which, sampling",
    [
        ("qwen3", dict(temperature=0.7, seed=11)),
        ("qwen3", dict(temperature=1.0, top_k=5, top_p=0.9, min_p=0.05, seed=3)),
        ("gemma3", dict(temperature=0.8, seed=7, repetition_penalty=1.2, presence_penalty=0.3, frequency_penalty=0.2)),
        ("gemma3", dict(temperature=0.0, logit_bias={7: 3.0, 9: -2.0}, repetition_penalty=1.1)),
    ],
    ids=["temperature", "top-k-p-min-p", "penalties", "greedy-bias-penalty"],
)
def test_seeded_requests_draw_the_same_tokens_with_drafts(which, sampling, qwen3_path, gemma3_path):
    """Each row of a verify step is sampled as that position would be without drafts (its history
    for penalties, its output index for the seed's noise), so a seeded request's tokens are identical."""
    path = str(qwen3_path if which == "qwen3" else gemma3_path)
    plain = InferenceEngine(model_path=path, dtype="float32")
    spec = InferenceEngine(model_path=path, dtype="float32", **NGRAM)
    prompts = _prompts(plain.vocab_size, [19, 5, 33])[1:]
    params = SamplingParams(max_tokens=40, ignore_eos=True, **sampling)
    assert [o.token_ids for o in spec.generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]
    assert spec.proposer.num_draft_tokens > 0
    _assert_clean(spec)


def test_rejection_keeps_the_target_distribution():
    """Unseeded rows: the first token kept has the row's distribution whatever the draft, and the
    second (when the first draft was kept) the next row's. Tiny vocabulary, many samples."""
    vocab, n = 6, 20000
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(3, vocab, generator=generator) * 1.5  # logits of rows 0, 1, 2
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.95, max_tokens=8)
    seqs = [RequestSequence(str(i), [1, 2, 3], params) for i in range(n)]
    draft = int(rows[0].topk(2).indices[1])  # the second likeliest: kept now and then, rejected more often
    for seq in seqs:
        seq.draft_ids = [draft, 4]
    logits = rows.repeat(n, 1)
    sampler = Sampler(seed=1)
    tokens, _ = sampler(logits, sample_rows(seqs))
    first, second = [], []
    for i, seq in enumerate(seqs):
        got = tokens[3 * i : 3 * i + 3]
        kept = got[: accepted_length(seq.draft_ids, got) + 1]
        first.append(kept[0])
        if len(kept) > 1:
            second.append(kept[1])
    # The references: the same rows sampled without drafts.
    for seq in seqs:
        seq.draft_ids = []
    ref0, _ = sampler(rows[0].repeat(n, 1), seqs)
    ref1, _ = sampler(rows[1].repeat(n, 1), seqs)

    def total_variation(a: list[int], b: list[int]) -> float:
        pa = torch.bincount(torch.tensor(a), minlength=vocab) / len(a)
        pb = torch.bincount(torch.tensor(b), minlength=vocab) / len(b)
        return float((pa - pb).abs().sum() / 2)

    assert total_variation(first, ref0) < 0.02
    assert len(second) > 500 and total_variation(second, ref1) < 0.05
    # The bound is tight enough to fail: keeping every first draft would be this far off.
    assert total_variation([draft] * n, ref0) > 0.5


def test_pages_go_back_after_rejections_finishes_and_aborts(model_path):
    engine = InferenceEngine(model_path=model_path, dtype="float32", page_size=4, **NGRAM)
    prompts = _prompts(engine.vocab_size, [19, 5, 33])
    params = SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    for _ in range(12):
        engine.step()
        for seq in engine.scheduler.running:
            # Rolled back: no page beyond the one the next token needs, in both groups.
            assert -(-seq.num_computed_tokens // 4) <= len(seq.pages) <= -(-seq.num_tokens // 4), seq
            if engine.pool.window:
                assert seq.window_pages == engine.pool.window_page_row(seq.pages, seq.window_start)
    assert engine.proposer.num_draft_tokens > engine.proposer.num_accepted_tokens > 0
    engine.abort("r0")
    engine.abort("r4")
    while engine.has_work():
        engine.step()
    _assert_clean(engine)
    assert engine.pool.ref_counts == [0] * engine.pool.num_pages


def test_speculation_stands_aside_for_large_batches(qwen3_path):
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32", speculative_max_batch=2, **NGRAM)
    prompts = _prompts(engine.vocab_size, [9, 9, 9])
    engine.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert engine.proposer.num_draft_tokens == 0
    _assert_clean(engine)


def test_ngram_lookup_finds_the_latest_longest_match_incrementally():
    proposer = NgramProposer(num_speculative_tokens=3, ngram_max=3, ngram_min=1)
    seq = RequestSequence("s", [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 6, 7], SamplingParams())
    # The suffix 6 7 occurred twice; 5 6 7 is not a suffix. Latest earlier 6 7 is followed by 1 2 6.
    assert proposer.draft(seq, 3) == [1, 2, 6]
    seq.token_ids += [8]  # suffix 6 7 8: once before, followed by 9 5 6
    assert proposer.draft(seq, 3) == [9, 5, 6]
    seq.token_ids += [4]  # 4 never occurred before
    assert proposer.draft(seq, 3) == []
    seq.token_ids += [6]
    assert proposer.draft(seq, 2) == [7, 8]  # only 6 matches: its latest earlier place, at most limit
    # A loop's draft stops at the end of what is known.
    loop = RequestSequence("l", [3, 4, 3, 4, 3], SamplingParams())
    assert proposer.draft(loop, 3) == [4, 3]


def test_ngram_index_agrees_with_a_search_of_the_whole_sequence():
    rng = random.Random(0)
    proposer = NgramProposer(num_speculative_tokens=4, ngram_max=4, ngram_min=2)
    seq = RequestSequence("s", [rng.randrange(4) for _ in range(5)], SamplingParams())
    for _ in range(200):
        tokens = seq.token_ids
        expected: list[int] = []
        for n in range(4, 1, -1):
            suffix = tokens[-n:]
            ends = [e for e in range(n, len(tokens)) if tokens[e - n : e] == suffix]
            if len(tokens) >= n and ends:
                e = ends[-1]
                expected = tokens[e : min(e + 4, len(tokens))]
                break
        assert proposer.draft(seq, 4) == expected
        seq.token_ids += [rng.randrange(4) for _ in range(rng.randrange(1, 3))]


def test_drafts_per_step_default_to_the_algorithms(qwen3_path):
    # Given as keyword arguments (applied to a default config with dataclasses.replace) or in a config.
    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32", speculative_algorithm="ngram")
    assert engine.proposer.k == 8
    assert EngineConfig(speculative_algorithm="eagle3").resolved_num_speculative_tokens() == 4
    assert EngineConfig(speculative_algorithm="ngram", num_speculative_tokens=3).resolved_num_speculative_tokens() == 3


@pytest.mark.parametrize(
    "setting, field",
    [
        (dict(speculative_algorithm="medusa"), "speculative_algorithm"),
        (dict(speculative_algorithm="ngram", num_speculative_tokens=0), "num_speculative_tokens"),
        (dict(speculative_algorithm="ngram", ngram_max=1, ngram_min=2), "ngram_max"),
    ],
)
def test_bad_speculative_settings_are_refused(qwen3_path, setting, field):
    with pytest.raises(InvalidRequestError) as info:
        InferenceEngine(model_path=str(qwen3_path), dtype="float32", **setting)
    assert info.value.param == field


@pytest.mark.parametrize("which", ["qwen3", "gemma3"])
def test_fixed_shape_verify_steps_pad_without_changing_a_token(which, qwen3_path, gemma3_path):
    """The buffers CUDA graphs of verify steps replay (every sequence padded to k + 1 tokens, the
    batch to a ladder size), run eagerly here: the same tokens as the ragged path."""
    path = str(qwen3_path if which == "qwen3" else gemma3_path)
    plain = InferenceEngine(model_path=path, dtype="float32", page_size=4)
    spec = InferenceEngine(model_path=path, dtype="float32", page_size=4, max_context_length=64, **NGRAM)
    spec.runner.enable_verify_graphs(NGRAM["num_speculative_tokens"] + 1, 4)
    # Five prompts: a step of five drafted sequences runs ragged (over 4); of three, padded to 4.
    prompts = _prompts(plain.vocab_size, [19, 5, 33])
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True)
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want):
        assert all(abs(x.logprob - y.logprob) < 1e-4 for x, y in zip(a.logprobs, b.logprobs))
    # Without logprobs the greedy rows are read back as one argmax; alone, a looping prompt fills
    # every row of its padded step.
    quiet = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in spec.generate(prompts, quiet)] == [o.token_ids for o in want]
    assert spec.generate(prompts[-2:-1], quiet)[0].token_ids == want[-2].token_ids
    assert spec.runner.verify.num_steps > 0
    _assert_drafts_were_kept(spec)
    _assert_clean(spec)


def _run_gate(gate: SpeculationGate, steps: int, batch: int, spec_s: float, spec_tokens: int, plain_s: float) -> list:
    """Steps of `batch` sequences that take spec_s for spec_tokens when drafts are allowed, plain_s
    for one token each when not; the modes the gate chose, in order."""
    now, tokens, modes = 0.0, 0, []
    for _ in range(steps):
        gate.record(now, tokens)
        speculating = gate.allow(batch, now)
        modes.append(speculating)
        now += spec_s if speculating else plain_s
        tokens = spec_tokens if speculating else batch
    return modes


def test_the_gate_runs_the_mode_cheaper_per_token_and_keeps_measuring_the_other():
    stretch = SpeculationGate.STRETCH
    # Batch 64: a verify step costs 5 ms for 2 tokens a sequence, a decode step 1.4 ms for one.
    gate = SpeculationGate()
    modes = _run_gate(gate, 64 * stretch, 64, 5e-3, 128, 1.4e-3)
    assert modes[:stretch] == [True] * stretch and modes[stretch : 2 * stretch] == [False] * stretch
    later = modes[4 * stretch :]
    # Only the stretches that try the other mode speculate, further apart each time it loses again.
    assert 0 < sum(later) <= len(later) // 8
    tries = [i for i in range(len(later)) if later[i] and (i == 0 or not later[i - 1])]
    gaps = [b - a for a, b in zip(tries, tries[1:])]
    assert len(gaps) >= 2 and gaps == sorted(gaps) and gaps[-1] > gaps[0]
    assert gate.cost(64, True) > gate.cost(64, False) and gate.num_steps_aside == len(modes) - sum(modes)
    assert gate.cost(8, True) is None  # each batch size is measured on its own
    # Batch 1: a verify step costs 1 ms for 4 tokens, a decode step 0.5 ms for one.
    gate = SpeculationGate()
    later = _run_gate(gate, 64 * stretch, 1, 1e-3, 4, 0.5e-3)[4 * stretch :]
    assert 0 < len(later) - sum(later) <= len(later) // 8  # speculating but for the tries
