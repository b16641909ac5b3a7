"""EAGLE-3 drafts: a draft head in the SGLang / vLLM checkpoint format changes no token, and holds no page.

The mirror heads (tests/checkpoints.py) predict what their target would if it ignored context,
and the targets are scaled so that it mostly does: drafts are often right and sometimes wrong,
so every test sees accepted drafts and rejected ones.
"""

import json
import shutil

import pytest
import torch
import transformers
from checkpoints import make_eagle3_checkpoint, make_gemma3_checkpoint, make_qwen3_checkpoint, scale_layers
from same_outputs import assert_same_greedy

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.engine.scheduler import ScheduledBatch
from sfllm_core.errors import InvalidRequestError, UnsupportedModelError
from sfllm_core.models.eagle3 import aux_layers_of, default_aux_layers, load_eagle3_config
from sfllm_core.sampling_params import SamplingParams

K = 3


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, tuple[str, str]]:
    """(target, mirror head) per model. Qwen3's layers damped (its next token then follows from the
    current one, as the head's does, unless the head's vocabulary lacks it); Gemma3's (sliding window)
    amplified, so that context matters more and drafts miss more often."""
    root = tmp_path_factory.mktemp("eagle3")
    heads = {}
    for name, make, scale, draft_vocab in (
        ("qwen3", make_qwen3_checkpoint, 0.03, 128),
        ("gemma3", make_gemma3_checkpoint, 3.0, 256),
    ):
        target = scale_layers(make(root / name), scale)
        head = make_eagle3_checkpoint(
            root / f"{name}-head", target, mirror=True, num_key_value_heads=4, draft_vocab_size=draft_vocab
        )
        heads[name] = (str(target), str(head))
    return heads


def _engines(target: str, head: str, **setting) -> tuple[InferenceEngine, InferenceEngine]:
    common = dict(model_path=target, dtype="float32", page_size=4, **setting)
    spec = dict(speculative_algorithm="eagle3", speculative_draft_model=head, num_speculative_tokens=K)
    return InferenceEngine(**common), InferenceEngine(**common, **spec)


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 384, (n,), generator=g).tolist() for n in lengths]


def _assert_clean(engine: InferenceEngine) -> None:
    assert engine.pool.num_used_pages == 0 and engine.pool.num_used_window_pages == 0, "pages leaked"
    assert engine.pool.ref_counts == [0] * engine.pool.num_pages
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine._seqs


def _assert_accepted(engine: InferenceEngine, rejected_too: bool = True) -> None:
    p = engine.proposer
    assert p.num_accepted_tokens > 0, p.num_draft_tokens
    assert not rejected_too or p.num_draft_tokens > p.num_accepted_tokens, p.num_draft_tokens


@pytest.mark.parametrize(
    "which, setting",
    [
        ("qwen3", dict()),
        ("gemma3", dict()),
        ("gemma3", dict(max_num_batched_tokens=6)),
        ("qwen3", dict(num_pages=20)),
    ],
    ids=["qwen3-batched", "gemma3-sliding-window", "gemma3-chunked-prefill", "qwen3-preemption"],
)
def test_greedy_outputs_and_logprobs_are_identical_with_an_eagle3_head(targets, which, setting):
    plain, spec = _engines(*targets[which], **setting)
    prompts = _prompts([19, 5, 33, 12])
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    assert_same_greedy(got, want, 24)
    _assert_accepted(spec)
    if "num_pages" in setting:
        assert spec.scheduler.num_preemptions > 0
    _assert_clean(spec)


def test_stop_tokens_and_lengths_inside_a_multi_token_step(targets):
    plain, spec = _engines(*targets["qwen3"])
    prompts = _prompts([19, 5, 33, 12, 27])
    free = plain.generate(prompts, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    params = [
        SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[out.token_ids[5 + i]])
        if i % 2
        else SamplingParams(max_tokens=10 + 5 * i, temperature=0.0, ignore_eos=True)
        for i, out in enumerate(free)
    ]
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in want]
    assert {o.finish_reason for o in got} == {"stop", "length"}
    _assert_accepted(spec, rejected_too=False)
    _assert_clean(spec)


@pytest.mark.parametrize(
    "which, sampling",
    [
        ("qwen3", dict(temperature=0.8, top_k=20, seed=5)),
        ("gemma3", dict(temperature=0.7, seed=3, repetition_penalty=1.1)),
    ],
    ids=["qwen3-seeded", "gemma3-seeded-penalty"],
)
def test_seeded_requests_draw_the_same_tokens(targets, which, sampling):
    """Greedy drafts are point-mass proposals: the acceptance rule keeps each row's draw as it was."""
    plain, spec = _engines(*targets[which])
    prompts = _prompts([19, 5, 33])
    params = SamplingParams(max_tokens=30, ignore_eos=True, **sampling)
    assert [o.token_ids for o in spec.generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]
    assert spec.proposer.num_draft_tokens > 0
    _assert_clean(spec)


def test_streamed_steps_carry_several_tokens_and_pages_go_back_after_aborts(targets):
    plain, spec = _engines(*targets["gemma3"])
    prompts = _prompts([19, 5, 33])
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    whole = plain.generate(prompts[:1], params)[0]
    for i, prompt in enumerate(prompts):
        spec.add_request(f"r{i}", prompt, params)
    outputs = []
    for _ in range(10):
        outputs += spec.step()
        for seq in spec.scheduler.running:
            # Rolled back: no page beyond the one the next token needs, in both page groups.
            assert -(-seq.num_computed_tokens // 4) <= len(seq.pages) <= -(-seq.num_tokens // 4), seq
            assert seq.window_pages == spec.pool.window_page_row(seq.pages, seq.window_start)
    spec.abort("r1")
    while spec.has_work():
        outputs += spec.step()
    first = [o for o in outputs if o.request_id == "r0"]
    assert [t for o in first for t in o.token_ids] == whole.token_ids
    assert max(len(o.token_ids) for o in first) > 1
    assert next(o for o in outputs if o.request_id == "r1" and o.finished).finish_reason == "abort"
    # Each request's usage: the drafts verification kept for it, adding up to the proposer's count.
    kept = {o.request_id: o.num_accepted_draft_tokens for o in outputs}
    assert sum(kept.values()) == spec.proposer.num_accepted_tokens and kept["r0"] > 0
    _assert_accepted(spec)
    _assert_clean(spec)


def test_speculation_stands_aside_for_large_batches_and_resumes(targets):
    """Steps with more decoding sequences than speculative_max_batch run without the head; once
    the batch shrinks the head drafts again, from the hidden states of the steps since."""
    plain, spec = _engines(*targets["qwen3"], speculative_max_batch=2)
    prompts = _prompts([9, 9, 9])
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 30, 30)]
    assert [o.token_ids for o in spec.generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]
    assert spec.proposer.num_draft_tokens > 0  # after the first request ended
    _assert_clean(spec)
    spec.proposer.num_draft_tokens = 0
    spec.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert spec.proposer.num_draft_tokens == 0


@pytest.mark.parametrize("which", ["qwen3", "gemma3"])
def test_fixed_shape_verify_steps_with_hidden_states(targets, which):
    """The buffers verify graphs replay (padded to k + 1 tokens per sequence, the batch to a ladder
    size), run eagerly here, hand out the same hidden states and tokens as the ragged path; so do
    the head's drafting passes on theirs (padded to a ladder size on the scratch page)."""
    plain, spec = _engines(*targets[which], max_context_length=64)
    spec.runner.enable_verify_graphs(K + 1, 4, spec.aux_layers)
    spec.proposer.enable_graphs(4, spec.pool.max_pages_per_seq, 64)
    prompts = _prompts([19, 5, 33, 12, 7])  # steps of five run ragged; once two have ended, padded to four
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (6, 24, 24, 10, 24)]
    assert [o.token_ids for o in spec.generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]
    assert spec.runner.verify.num_steps > 0 and spec.proposer.passes.num_passes > 0
    _assert_accepted(spec)
    _assert_clean(spec)
    # The same drafts as the ragged passes draw: as many of them, as many accepted.
    _, ragged = _engines(*targets[which], max_context_length=64)
    ragged.generate(prompts, params)
    assert (ragged.proposer.num_draft_tokens, ragged.proposer.num_accepted_tokens) == (
        spec.proposer.num_draft_tokens,
        spec.proposer.num_accepted_tokens,
    )


@pytest.mark.parametrize("which", ["qwen3", "gemma3"])
def test_the_target_hands_out_the_hidden_states_transformers_computes(targets, which):
    """execute_aux's rows are transformers' hidden_states[i] (the input of layer i), in the head's order."""
    target = targets[which][0]
    engine = InferenceEngine(model_path=target, dtype="float32", page_size=4)
    layers = (2, 0, 1) if which == "gemma3" else (1, 0, 1)
    seq = engine.make_sequence("s", _prompts([11])[0], SamplingParams(max_tokens=1))
    engine.scheduler.add(seq)
    batch = engine.scheduler.schedule()
    assert isinstance(batch, ScheduledBatch) and batch.num_new_tokens == [11]
    _, _, aux, starts = engine.runner.execute_aux(batch, layers)
    reference = transformers.AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    with torch.no_grad():
        states = reference(torch.tensor([seq.token_ids]), output_hidden_states=True).hidden_states
    want = torch.cat([states[i][0] for i in layers], dim=-1)
    assert starts == [0] and aux.shape == want.shape
    torch.testing.assert_close(aux, want, rtol=1e-4, atol=1e-4)


def test_a_random_head_with_default_layers_and_its_own_embeddings(tmp_path, qwen3_path):
    """A head with random weights (its drafts nearly all wrong) and the default aux layers still changes nothing."""
    head = make_eagle3_checkpoint(tmp_path / "head", qwen3_path, own_embeddings=True, seed=4)
    plain, spec = _engines(qwen3_path, str(head))
    assert spec.aux_layers == default_aux_layers(2)
    prompts = _prompts([19, 5, 33])
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in spec.generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]
    assert spec.proposer.num_draft_tokens > 0 and spec.proposer.head.embed_tokens is not spec.model.model.embed_tokens
    _assert_clean(spec)


def test_the_checkpoint_format(tmp_path, qwen3_path):
    head = make_eagle3_checkpoint(tmp_path / "head", qwen3_path, aux_layer_ids=[1, 0, 1], draft_vocab_size=64)
    config = load_eagle3_config(str(head))
    assert config.draft_vocab_size == 64 and aux_layers_of(config, 2) == (1, 0, 1)
    assert default_aux_layers(36) == (2, 18, 33)  # SGLang's and vLLM's choice for Qwen3-8B
    raw = json.loads((head / "config.json").read_text())
    raw["eagle_aux_hidden_state_layer_ids"] = [0, 1, 1]  # vLLM reads it at the top level
    (head / "config.json").write_text(json.dumps(raw))
    assert aux_layers_of(load_eagle3_config(str(head)), 2) == (0, 1, 1)
    engine = InferenceEngine(
        model_path=qwen3_path, dtype="float32", speculative_algorithm="eagle3", speculative_draft_model=str(head)
    )
    d2t = engine.proposer.head.d2t
    assert d2t.dtype == torch.int64 and (torch.arange(64) + d2t).unique().numel() == 64


def test_bad_heads_are_refused_by_name(tmp_path, qwen3_path):
    head = make_eagle3_checkpoint(tmp_path / "head", qwen3_path)
    common = dict(model_path=qwen3_path, dtype="float32", speculative_algorithm="eagle3")
    with pytest.raises(InvalidRequestError) as info:
        InferenceEngine(**common)
    assert info.value.param == "speculative_draft_model"
    raw = json.loads((head / "config.json").read_text())
    (head / "config.json").write_text(json.dumps(dict(raw, architectures=["LlamaForCausalLM"])))
    with pytest.raises(UnsupportedModelError, match="no EAGLE-3 draft head"):
        InferenceEngine(**common, speculative_draft_model=str(head))
    (head / "config.json").write_text(json.dumps(raw))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(head / "model.safetensors"))
    del tensors["fc.weight"]
    save_file(tensors, str(head / "model.safetensors"))
    with pytest.raises(UnsupportedModelError, match="missing tensors: fc.weight"):
        InferenceEngine(**common, speculative_draft_model=str(head))
    shutil.rmtree(head)


@pytest.mark.slow
def test_gemma270m_with_a_random_head_in_the_format(tmp_path, gemma270m_path):
    """The real model (sliding-window layers, a 262k vocabulary) takes an EAGLE-3 head of its width."""
    common = dict(model_path=gemma270m_path, dtype="float32", quantization="none", max_context_length=256)
    plain = InferenceEngine(**common)
    mc = plain.model_config
    shape = tmp_path / "shape"  # the head needs only the target's widths, which the GGUF's config gives
    shape.mkdir()
    (shape / "config.json").write_text(
        json.dumps(dict(hidden_size=mc.hidden_size, vocab_size=mc.vocab_size, max_position_embeddings=256))
    )
    head = make_eagle3_checkpoint(tmp_path / "head", shape, draft_vocab_size=4096, head_dim=64)
    spec = InferenceEngine(**common, speculative_algorithm="eagle3", speculative_draft_model=str(head))
    assert spec.aux_layers == (2, 9, 15)  # 18 layers: SGLang's and vLLM's default choice
    prompts = ["<bos>The capital of France is", "<bos>Water boils at a temperature of"]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in spec.generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]
    assert spec.proposer.num_draft_tokens > 0
    _assert_clean(spec)
