"""sfllm_core/models/gguf.py and the loader's quantized path: GGUF blocks kept as they are, served by CPU kernels."""

from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoints import make_gemma3_checkpoint, write_gguf
from gguf import GGMLQuantizationType, GGUFReader, dequantize, quantize

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.errors import InvalidRequestError
from sfllm_core.kernels import cpu_grouped_gemm
from sfllm_core.layers.linear import Linear
from sfllm_core.layers.quantization import (
    GroupedIntWeight,
    Int4PackedWeight,
    Int8ChannelWeight,
    QuantizedEmbedding,
    QuantizedWeight,
    RowSwitchWeight,
    TopRefinedWeight,
)
from sfllm_core.models import loader
from sfllm_core.models.gguf import LOGITS_TOP, GgufBlockWeight, decode_weight, grouped_ints, served_weight
from sfllm_core.sampling_params import SamplingParams

# Block layouts with a quantizer in the gguf package, and K types (no quantizer there) given as random bytes.
QUANTIZABLE = ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"]
K_TYPES = {"Q4_K": (144, [0, 2]), "Q5_K": (176, [0, 2]), "Q6_K": (210, [208])}  # bytes per block, float16 offsets


def reference(data: np.ndarray, name: str, shape: tuple[int, int]) -> torch.Tensor:
    return torch.from_numpy(dequantize(data, GGMLQuantizationType[name]).reshape(shape).astype(np.float32))


def random_k_blocks(name: str, rows: int, blocks: int, seed: int) -> np.ndarray:
    nbytes, halves = K_TYPES[name]
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, (rows, blocks, nbytes), dtype=np.uint8)
    for at in halves:  # random bytes would make d and dmin any float16, inf and nan included
        d = rng.uniform(1e-4, 0.05, (rows, blocks)).astype(np.float16)
        data[:, :, at : at + 2] = d.view(np.uint8).reshape(rows, blocks, 2)
    return data.reshape(rows, blocks * nbytes)


@pytest.mark.parametrize("name", QUANTIZABLE)
def test_quantized_blocks_decode_to_the_gguf_package_values_bit_for_bit(name):
    weights = np.random.default_rng(0).standard_normal((16, 256)).astype(np.float32)
    data = quantize(weights, GGMLQuantizationType[name])
    exact = grouped_ints(data, name, (16, 256))
    assert exact.group_size == 32
    assert torch.equal(exact.dequantize(), reference(data, name, (16, 256)))


@pytest.mark.parametrize("name", sorted(K_TYPES))
def test_k_quant_blocks_decode_to_the_gguf_package_values_bit_for_bit(name):
    data = random_k_blocks(name, rows=16, blocks=2, seed=1)
    exact = grouped_ints(data, name, (16, 512))
    assert exact.group_size == (16 if name == "Q6_K" else 32)
    assert torch.equal(exact.dequantize(), reference(data, name, (16, 512)))


@pytest.mark.parametrize("kernels", [True, False], ids=["cpu-kernels", "torch-only"])
def test_four_bit_blocks_go_to_the_int4_kernel_and_wider_ones_stay_exact_or_go_to_int8(kernels, monkeypatch):
    if kernels and not cpu_grouped_gemm.available():
        pytest.skip("the CPU grouped int8 kernel does not build here")
    if not kernels:  # a machine without a compiler (or AVX-512): torch's kernels only
        monkeypatch.setattr(cpu_grouped_gemm, "available", lambda: False)
    q4_k = grouped_ints(random_k_blocks("Q4_K", 64, 1, 2), "Q4_K", (64, 256))
    assert isinstance(decode_weight(q4_k), Int4PackedWeight)
    q4_0 = quantize(np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32), GGMLQuantizationType.Q4_0)
    assert isinstance(decode_weight(grouped_ints(q4_0, "Q4_0", (64, 64))), Int4PackedWeight)
    for name in ("Q5_K", "Q6_K"):
        exact = grouped_ints(random_k_blocks(name, 64, 1, 4), name, (64, 256))
        served = decode_weight(exact)
        assert served is exact if kernels else isinstance(served, Int8ChannelWeight)
    q5_0 = quantize(np.random.default_rng(5).standard_normal((64, 64)).astype(np.float32), GGMLQuantizationType.Q5_0)
    served = served_weight(grouped_ints(q5_0, "Q5_0", (64, 64)), blocks=q5_0, type_name="Q5_0").decode
    assert isinstance(served, GgufBlockWeight if kernels else Int8ChannelWeight)


# --- the real Gemma 3 270M's blocks --------------------------------------------------------------------

# One tensor of each block type the file uses (Q4_K_M: token_embd Q8_0, layers Q5_0 / Q4_K / Q6_K / Q8_0),
# with the weight error their CPU kernel format adds, relative (Frobenius) to the exact weight.
# Int4: scales and zero points rounded to bfloat16 (measured 0.19%). The wider blocks stay exact where the
# CPU kernels build (Q5_0 and Q8_0 as GGUF blocks, Q6_K as grouped int8); without them, int8 with one
# scale per row instead of one per 16 or 32 weights (measured 0.85% for Q5_0, 1.0% for Q6_K, 0.80% for Q8_0).
REAL_TENSORS = {
    "blk.0.attn_output.weight": ("Q4_K", Int4PackedWeight, 0.003),
    "blk.0.attn_k.weight": ("Q5_0", GgufBlockWeight, 0.0),
    "blk.0.ffn_down.weight": ("Q6_K", GroupedIntWeight, 0.0),
    "blk.0.attn_v.weight": ("Q8_0", GgufBlockWeight, 0.0),
}


@pytest.fixture(scope="module")
def gemma_reader(gemma270m_path):
    reader = GGUFReader(gemma270m_path)
    return {t.name: t for t in reader.tensors}


@pytest.mark.parametrize("tensor_name", sorted(REAL_TENSORS))
def test_real_blocks_decode_exactly_and_their_kernel_format_stays_close(gemma_reader, tensor_name):
    kind, format_class, tolerance = REAL_TENSORS[tensor_name]
    tensor = gemma_reader[tensor_name]
    assert tensor.tensor_type.name == kind
    shape = tuple(reversed(tensor.shape.tolist()))
    expected = reference(tensor.data, kind, shape)
    exact = grouped_ints(tensor.data, kind, shape)
    assert torch.equal(exact.dequantize(), expected)
    if format_class is not Int4PackedWeight and not cpu_grouped_gemm.available():
        pytest.skip("the CPU grouped int8 kernel does not build here")
    served = served_weight(exact, blocks=tensor.data, type_name=kind).decode
    assert isinstance(served, format_class)
    error = float((served.dequantize() - expected).norm() / expected.norm())
    assert error <= tolerance, error
    # Decode-sized batches through the kernel: float32 activations, so within float32 summation of exact.
    x = torch.randn(5, shape[1], generator=torch.Generator().manual_seed(0))
    truth = x.double() @ expected.double().t()
    rel = float((served(x).double() - truth).norm() / truth.norm())
    assert rel < (5e-3 if format_class is Int4PackedWeight else 1e-6), rel  # int4: bfloat16 activations


def test_real_embedding_rows_are_exact(gemma_reader):
    tensor = gemma_reader["token_embd.weight"]
    rows = tensor.data[:512]  # the first 512 of 262144 rows: the decoding is per row
    exact = grouped_ints(rows, "Q8_0", (512, 640))
    ids = torch.tensor([2, 511, 17])
    assert torch.equal(exact.rows(ids), reference(rows, "Q8_0", (512, 640))[ids])


def test_real_logits_rank_through_int4_and_their_top_is_exact(gemma_reader):
    """The tied Q8_0 embedding as the logits' projection: ranked by an int4 copy, its top redone exactly."""
    tensor = gemma_reader["token_embd.weight"]
    rows = 4096  # of 262144: enough rows for a ranking, the quantization is per group of a row
    exact = grouped_ints(tensor.data[:rows], "Q8_0", (rows, 640))
    served = served_weight(exact, logits=True)
    assert isinstance(served, TopRefinedWeight) and served.top == LOGITS_TOP
    ranking = served.inner.decode
    assert isinstance(ranking, Int4PackedWeight) and ranking.group_size == 32
    assert served.inner.prefill is exact
    # Activations scaled like the final norm's output give logits of Gemma's magnitude.
    x = torch.randn(4, 640, generator=torch.Generator().manual_seed(0)) * 4
    truth = x.double() @ exact.dequantize().double().t()
    got = served(x)
    best = truth.topk(20, dim=-1).indices
    # The true top 20 are all among the refined entries, which are exact; the rest are int4's.
    torch.testing.assert_close(got.gather(1, best).double(), truth.gather(1, best), rtol=1e-5, atol=1e-4)
    assert torch.equal(got.argmax(-1), truth.argmax(-1))
    assert float((got.double() - truth).norm() / truth.norm()) < 0.12
    assert torch.equal(served.rows(torch.tensor([7])), exact.dequantize()[7:8])
    if cpu_grouped_gemm.available():  # more rows than are ranked: every logit exact, through the grouped kernel
        x8 = torch.randn(8, 640, generator=torch.Generator().manual_seed(1)) * 4
        torch.testing.assert_close(
            served(x8).double(), x8.double() @ exact.dequantize().double().t(), rtol=1e-5, atol=1e-4
        )


# --- loading with quantization "gguf" ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_q8_gguf(tmp_path_factory) -> str:
    """A tiny Gemma3 GGUF whose 2-D weights are Q8_0 (tied embedding), as llama.cpp lays it out."""
    folder = tmp_path_factory.mktemp("g")
    return str(write_gguf(make_gemma3_checkpoint(folder / "ckpt"), folder / "model.gguf", quantize=True))


def test_quantized_weights_come_first_then_the_dense_rest_and_later_from_the_cache(tiny_q8_gguf, tmp_path, monkeypatch):
    cache = str(tmp_path / "cache")
    first = list(loader.load_weights(tiny_q8_gguf, torch.float32, cache, quantization="gguf"))
    kinds = [isinstance(value, QuantizedWeight) for _, value, _ in first]
    assert kinds == sorted(kinds, reverse=True) and any(kinds) and not all(kinds)
    dense = dict((n, t) for n, t, _ in loader.load_weights(tiny_q8_gguf, torch.float32, str(tmp_path / "d")))
    for name, value, source in first:
        assert source == tiny_q8_gguf
        if name == "model.embed_tokens.weight":  # tied: also the logits' projection, its top redone exactly
            assert isinstance(value, TopRefinedWeight)
            value = value.inner
        assert isinstance(value, RowSwitchWeight) == name.endswith(("proj.weight", "embed_tokens.weight"))
        exact = value.prefill if isinstance(value, RowSwitchWeight) else value
        assert torch.equal(exact if not isinstance(exact, GroupedIntWeight) else exact.dequantize(), dense[name])
    assert not (Path(cache) / next(Path(cache).iterdir()).name / "model.safetensors").exists()

    def no_reading(path):
        raise AssertionError("the GGUF was read again instead of the cache")

    monkeypatch.setattr(loader, "_GgufCheckpoint", no_reading)
    second = list(loader.load_weights(tiny_q8_gguf, torch.float32, cache, quantization="gguf"))
    assert [n for n, _, _ in second] == [n for n, _, _ in first]
    for (_, a, _), (_, b, _) in zip(first, second):
        if isinstance(a, QuantizedWeight):
            x = torch.randn(3, a.in_features)
            assert type(a) is type(b) and torch.equal(a(x), b(x))
        else:
            assert torch.equal(a, b)


def test_engine_serves_the_quantized_blocks_on_the_cpu_and_agrees_with_the_dequantized_path(tiny_q8_gguf):
    quantized = InferenceEngine(model_path=tiny_q8_gguf, dtype="float32", load_tokenizer=False)
    dense = InferenceEngine(model_path=tiny_q8_gguf, dtype="float32", quantization="none", load_tokenizer=False)
    assert (quantized.quantization, dense.quantization) == ("gguf", "none")
    model = quantized.model.model
    assert isinstance(model.embed_tokens, QuantizedEmbedding)
    assert quantized.model.lm_head.weight is model.embed_tokens.weight
    qkv = [layer.self_attn.qkv_proj for layer in model.layers]
    assert all(isinstance(proj, Linear) and proj.quantized for proj in qkv)
    prompts = [[2, 5, 9, 11, 40, 7], [2, 100, 3]]
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    got, expected = quantized.generate(prompts, params), dense.generate(prompts, params)
    for g, e in zip(got, expected):
        # The first token's distribution: within int8 rounding of the reference's (greedy ids may part later,
        # a random tiny model having many near ties).
        first, reference = dict(g.logprobs[0].top), dict(e.logprobs[0].top)
        assert first.keys() == reference.keys()
        assert all(abs(first[t] - reference[t]) < 0.05 for t in first)


def test_quantization_gguf_is_refused_where_there_are_no_gguf_blocks(gemma3_path):
    with pytest.raises(InvalidRequestError, match="quantization gguf"):
        InferenceEngine(model_path=gemma3_path, quantization="gguf", load_tokenizer=False)
    assert InferenceEngine(model_path=gemma3_path, load_tokenizer=False).quantization == "none"
