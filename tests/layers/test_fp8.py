"""FP8 weights: quantization error within e4m3's rounding, exact merges, and the CPU (dequantizing) matmul."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sfllm_core.layers.fp8 import FP8_DTYPE, FP8_MAX, Fp8Weight, quantize_linears
from sfllm_core.layers.linear import Linear, merge_linears
from sfllm_core.layers.quantization import QuantizedWeight

SHAPES = [(64, 48), (130, 300), (256, 384)]  # rows and columns on and off the 128 blocks


def _weight(n: int, k: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Rows of very different magnitude, so per-row and per-block scales both matter.
    return torch.randn(n, k, generator=gen) * torch.logspace(-2, 1, n)[:, None]


@pytest.mark.parametrize("scheme", ["channel", "block"])
@pytest.mark.parametrize("n,k", SHAPES)
def test_round_trip_error_is_e4m3_rounding(scheme, n, k):
    w = _weight(n, k)
    fw = Fp8Weight.from_dense(w, scheme)
    assert fw.weight.dtype == FP8_DTYPE and fw.weight.shape == (n, k)
    scale = fw.expanded_scale()
    # e4m3 keeps 3 mantissa bits: half a step is 1/16 of the value for normal numbers, and
    # 2^-10 of the scale below 2^-6 (subnormals).
    bound = torch.maximum(w.abs() / 16, scale * 2.0**-10) * (1 + 1e-6)
    assert ((fw.dequantize() - w).abs() <= bound).all()
    # Each scale is its block's amax / 448, so the largest element lands on 448 exactly.
    if scheme == "channel":
        assert fw.scale.shape == (n, 1)
        torch.testing.assert_close(fw.scale[:, 0], w.abs().amax(dim=1) / FP8_MAX)
    else:
        assert fw.scale.shape == (-(-n // 128), -(-k // 128))
        torch.testing.assert_close(fw.scale[0, 0], w[:128, :128].abs().max() / FP8_MAX)
    assert fw.weight.float().abs().max() == FP8_MAX


@pytest.mark.parametrize("scheme", ["channel", "block"])
def test_quantizing_a_dequantized_weight_gives_it_back(scheme):
    fw = Fp8Weight.from_dense(_weight(130, 300), scheme)
    again = Fp8Weight.from_dense(fw.dequantize(), scheme)
    assert torch.equal(again.weight.view(torch.uint8), fw.weight.view(torch.uint8))
    torch.testing.assert_close(again.scale, fw.scale, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "schemes,rows",
    [
        (("block", "block", "block"), (256, 128, 128)),  # aligned blocks: concatenated as they are
        (("block", "block", "block"), (64, 32, 32)),  # off the blocks: scales spread over rows
        (("channel", "channel"), (100, 28)),
        (("channel", "block"), (64, 130)),  # mixed: per-row scales repeated over 128 columns
    ],
)
def test_merged_weights_stand_for_exactly_the_parts(schemes, rows):
    parts = [Fp8Weight.from_dense(_weight(n, 300, seed=i), s) for i, (s, n) in enumerate(zip(schemes, rows))]
    merged = Fp8Weight.concat(parts)
    assert merged.shape == (sum(rows), 300)
    assert torch.equal(merged.dequantize(), torch.cat([p.dequantize() for p in parts]))
    if schemes[0] == "block" and all(n % 128 == 0 for n in rows):
        assert merged.block_n == 128


def test_rows_and_cache_round_trip():
    fw = Fp8Weight.from_dense(_weight(130, 300), "block")
    ids = torch.tensor([[0, 129], [127, 128]])
    assert torch.equal(fw.rows(ids), fw.dequantize()[ids])
    meta, tensors = fw.to_tensors()
    back = QuantizedWeight.from_tensors(meta, tensors)
    assert isinstance(back, Fp8Weight) and (back.block_n, back.block_k) == (128, 128)
    assert torch.equal(back.dequantize(), fw.dequantize())


def test_bad_scheme_is_refused():
    with pytest.raises(ValueError, match="channel, block"):
        Fp8Weight.from_dense(torch.ones(4, 4), "tensor")


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(48, 64, bias=False)
        self.k_proj = nn.Linear(48, 32, bias=False)
        self.o_proj = Linear(64, 48, bias=True)
        self.lm_head = nn.Linear(48, 100, bias=False)


@pytest.mark.parametrize("scheme", ["channel", "block"])
def test_quantize_linears_replaces_projections_and_keeps_lm_head(scheme):
    torch.manual_seed(0)
    block = _Block()
    block.qk_proj = merge_linears(block.q_proj, block.k_proj)
    del block.q_proj, block.k_proj
    dense_qk, dense_o = block.qk_proj.weight.detach().clone(), block.o_proj.weight.detach().clone()
    bias = block.o_proj.bias.detach().clone()
    assert quantize_linears(block, scheme) == 2
    assert isinstance(block.qk_proj.weight, Fp8Weight) and isinstance(block.o_proj.weight, Fp8Weight)
    assert isinstance(block.lm_head.weight, nn.Parameter)
    x = torch.randn(5, 48)
    # The CPU path multiplies by the dequantized weight: the stored values exactly, close to the dense ones.
    torch.testing.assert_close(block.qk_proj(x), F.linear(x, block.qk_proj.weight.dequantize()))
    torch.testing.assert_close(block.qk_proj(x), F.linear(x, dense_qk), rtol=0.1, atol=0.1)
    h = torch.randn(5, 64)
    torch.testing.assert_close(block.o_proj(h), F.linear(h, block.o_proj.weight.dequantize(), bias))
    torch.testing.assert_close(block.o_proj(h), F.linear(h, dense_o, bias), rtol=0.1, atol=0.1)
