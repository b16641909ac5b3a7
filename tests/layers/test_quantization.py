"""sfllm_core/layers/quantization.py: each weight format computes x @ W^T for the weight it stands for."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sfllm_core.layers.linear import Linear, install_quantized_weights, merge_linears, project
from sfllm_core.layers.quantization import (
    CPU_QUANTIZED_MAX_ROWS,
    GroupedIntWeight,
    Int4PackedWeight,
    Int8ChannelWeight,
    QuantizedEmbedding,
    QuantizedWeight,
    RowSwitchWeight,
    TopRefinedWeight,
    concat_weights,
)


def grouped(n: int, k: int, group: int, low: int, high: int, offset: bool, seed: int = 0) -> GroupedIntWeight:
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(low, high + 1, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) * 0.02 + 0.001
    off = (torch.rand(n, k // group, generator=g) - 0.5) * 0.1 if offset else None
    return GroupedIntWeight(q, scale, off)


def bf16_input_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What a weight-only kernel with bfloat16 activations computes, in float64."""
    return (x.to(torch.bfloat16).double() @ w.double().t()).float()


def close_to(got: torch.Tensor, expected: torch.Tensor, rel: float) -> bool:
    return float((got - expected).norm() / expected.norm()) < rel


def test_grouped_ints_dequantize_and_rows_follow_the_definition():
    w = grouped(6, 64, 16, -32, 31, offset=True)
    expected = w.q.float() * w.scale.repeat_interleave(16, 1) + w.offset.repeat_interleave(16, 1)
    assert torch.equal(w.dequantize(), expected)
    ids = torch.tensor([[5, 0], [2, 2]])
    assert torch.equal(w.rows(ids), expected[ids])
    x = torch.randn(3, 64)
    torch.testing.assert_close(w(x), F.linear(x, expected))


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("group", [32, 64])
def test_int4_packing_keeps_scales_and_zero_points(group, offset):
    """q * scale + offset with q in 0..15 lands on torch's (q - 8) * scale + zero, up to bfloat16 scales."""
    exact = grouped(96, 256, group, 0, 15, offset)
    packed = Int4PackedWeight.from_ints(exact.q.to(torch.uint8), exact.scale, exact.offset)
    # The kernel's own scales and zero points are bfloat16; with those the packing is exact.
    sz = packed.scales_and_zeros.float()
    as_stored = (exact.q.float() - 8) * sz[..., 0].t().repeat_interleave(group, 1)
    as_stored += sz[..., 1].t().repeat_interleave(group, 1)
    assert torch.equal(packed.dequantize(), as_stored)
    # Against the exact weight: only the rounding of scale and zero point to bfloat16 (< 2^-8).
    assert close_to(packed.dequantize(), exact.dequantize(), 2**-8)
    for rows in (1, 5):
        x = torch.randn(rows, 256)
        got = packed(x)
        assert got.dtype == torch.float32 and got.shape == (rows, 96)
        assert close_to(got, bf16_input_reference(x, as_stored), 0.01)  # bfloat16 output rounding


def test_int4_from_dense_is_exact_on_its_grid_and_within_half_a_step_otherwise():
    g = torch.Generator().manual_seed(2)
    # Each group of 32 spans 16 levels of a power-of-two step from -8 steps: min/max finds that grid.
    step = 2.0 ** -torch.randint(4, 9, (64, 4, 1), generator=g).float()
    levels = torch.randint(0, 16, (64, 4, 32), generator=g).float()
    levels[..., 0], levels[..., 1] = 0, 15
    on_grid = ((levels - 8) * step).view(64, 128)
    assert torch.equal(Int4PackedWeight.from_dense(on_grid, group_size=32).dequantize(), on_grid)
    w = torch.randn(64, 128, generator=g)
    for group in (32, 64):
        int4 = Int4PackedWeight.from_dense(w, group_size=group)
        err = (int4.dequantize() - w).view(64, -1, group).abs().amax(-1)
        step = int4.scales_and_zeros.float()[..., 0].t()
        assert bool((err <= step * 0.5 + 1e-6).all())  # rounding to the nearest of 16 levels
        assert 0.02 < float((int4.dequantize() - w).norm() / w.norm()) < 0.15


def test_int8_per_row_is_exact_for_rows_on_its_grid_and_close_otherwise():
    g = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (64, 128), generator=g).float()
    q[:, 0] = 127  # every row reaches the grid's end, so its scale is the row's
    scales = (torch.rand(64, generator=g) + 0.5).to(torch.bfloat16).float()
    on_grid = q * scales[:, None]
    assert torch.equal(Int8ChannelWeight.from_dense(on_grid).dequantize(), on_grid)
    w = torch.randn(64, 128, generator=g)
    int8 = Int8ChannelWeight.from_dense(w)
    assert close_to(int8.dequantize(), w, 0.01)
    x = torch.randn(3, 128, generator=g)
    assert close_to(int8(x), bf16_input_reference(x, int8.dequantize()), 0.01)


def test_row_switch_sends_decode_batches_to_the_kernel_and_prefill_to_the_exact_weights():
    exact = grouped(64, 128, 32, 0, 15, offset=True)
    kernel = Int4PackedWeight.from_ints(exact.q.to(torch.uint8), exact.scale, exact.offset)
    switch = RowSwitchWeight(kernel, exact, max_rows=4)
    # Past the CPU kernels' row limit the exact weight runs as a float32 GEMM on its dequantized values.
    small, large = torch.randn(4, 128), torch.randn(CPU_QUANTIZED_MAX_ROWS + 1, 128)
    assert torch.equal(switch(small), kernel(small))
    assert torch.equal(switch(large), F.linear(large, exact.dequantize()))
    assert torch.equal(switch.rows(torch.tensor([3])), exact.dequantize()[3:4])


def test_top_refined_logits_are_exact_at_the_top_and_the_kernel_elsewhere():
    exact = grouped(512, 64, 32, -127, 127, offset=False, seed=6)
    kernel = Int8ChannelWeight.from_dense(exact.dequantize())
    refined = TopRefinedWeight(RowSwitchWeight(kernel, exact, max_rows=4), top=8)
    x = torch.randn(3, 64) * 3
    fast, truth = kernel(x), x.double() @ exact.dequantize().double().t()
    # Few outputs near each row's maximum (the usual case): exactly those are redone.
    near = fast >= fast.amax(dim=-1, keepdim=True) - refined.margin
    assert 3 <= int(near.sum()) and int(near.sum(dim=-1).max()) <= 8
    got = refined(x)
    torch.testing.assert_close(got[near].double(), truth[near], rtol=1e-5, atol=1e-5)
    assert torch.equal(got[~near], fast[~near])
    # More of them than `top` (a flat row): the top 8 per row are redone instead.
    refined.margin = float("inf")
    got = refined(x)
    top = fast.topk(8, dim=-1).indices
    torch.testing.assert_close(got.gather(1, top).double(), truth.gather(1, top), rtol=1e-5, atol=1e-5)
    rest = torch.ones_like(got, dtype=torch.bool).scatter(1, top, False)
    assert torch.equal(got[rest], fast[rest])
    assert torch.equal(refined.rows(torch.tensor([4])), exact.dequantize()[4:5])


def formats() -> list[QuantizedWeight]:
    exact = grouped(32, 64, 32, 0, 15, offset=True, seed=3)
    int4 = Int4PackedWeight.from_ints(exact.q.to(torch.uint8), exact.scale, exact.offset)
    switch = RowSwitchWeight(int4, exact, max_rows=2)
    return [exact, int4, Int8ChannelWeight.from_dense(exact.dequantize()), switch, TopRefinedWeight(switch, top=4)]


@pytest.mark.parametrize("weight", formats(), ids=lambda w: w.kind)
def test_formats_round_trip_through_their_tensors(weight):
    meta, tensors = weight.to_tensors()
    rebuilt = QuantizedWeight.from_tensors(meta, {k: v.clone() for k, v in tensors.items()})
    assert type(rebuilt) is type(weight) and rebuilt.shape == weight.shape
    x = torch.randn(3, 64)
    assert torch.equal(rebuilt(x), weight(x))


@pytest.mark.parametrize("weight", formats()[:4], ids=lambda w: w.kind)  # logits are never merged
def test_concatenated_weights_compute_their_parts_side_by_side(weight):
    other = type(weight).from_tensors(*weight.to_tensors())
    merged = concat_weights([weight, other, weight])
    x = torch.randn(2, 64)
    assert merged.shape == (96, 64)
    torch.testing.assert_close(merged(x), torch.cat([weight(x), other(x), weight(x)], dim=-1))


def test_int4_weights_of_whole_packing_blocks_concatenate_as_they_are():
    parts = [grouped(n, 64, 32, 0, 15, offset=True, seed=n) for n in (64, 128)]
    int4 = [Int4PackedWeight.from_ints(p.q.to(torch.uint8), p.scale, p.offset) for p in parts]
    merged = concat_weights(int4)
    assert torch.equal(merged.packed, torch.cat([w.packed for w in int4]))
    assert torch.equal(merged.dequantize(), torch.cat([w.dequantize() for w in int4]))


def test_parts_of_different_formats_meet_in_a_general_one():
    exact16 = grouped(32, 64, 16, -32, 31, offset=False, seed=4)  # Q6_K-like
    exact32 = grouped(16, 64, 32, 0, 15, offset=True, seed=5)  # Q4_K-like
    merged = concat_weights([exact16, exact32])
    assert isinstance(merged, GroupedIntWeight) and merged.group_size == 16
    assert torch.equal(merged.dequantize(), torch.cat([exact16.dequantize(), exact32.dequantize()]))
    int4 = Int4PackedWeight.from_ints(exact32.q.to(torch.uint8), exact32.scale, exact32.offset)
    mixed = concat_weights([Int8ChannelWeight.from_dense(exact16.dequantize()), int4])
    assert isinstance(mixed, Int8ChannelWeight)
    assert close_to(mixed.dequantize(), torch.cat([exact16.dequantize(), int4.dequantize()]), 0.01)


def test_a_quantized_linear_merges_projects_and_keeps_its_bias():
    parts = [Linear.from_weight(w, torch.randn(32)) for w in formats()[:3]]
    x = torch.randn(2, 64)
    for layer in parts:
        assert layer.quantized and layer.weight.shape == (32, 64)
        torch.testing.assert_close(layer(x), layer.weight(x) + layer.bias)
        assert torch.equal(project(x, layer.weight), layer.weight(x))
    merged = merge_linears(parts[0], parts[0])
    torch.testing.assert_close(merged(x), torch.cat([parts[0](x)] * 2, dim=-1))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 64)
        self.proj = nn.Linear(64, 48, bias=True)
        self.lm_head = nn.Linear(64, 32, bias=False)
        self.lm_head.weight = self.embed.weight
        self.norm = nn.LayerNorm(64)


def test_install_replaces_layers_shares_the_tied_embedding_and_passes_the_dense_rest_on():
    model = TinyLM()
    embed, proj = formats()[3], RowSwitchWeight(*[Int8ChannelWeight.from_dense(torch.randn(48, 64))] * 2, max_rows=2)
    dense = [("norm.weight", torch.ones(64), "f"), ("proj.bias", torch.zeros(48), "f")]
    weights = [("embed.weight", embed, "f"), ("proj.weight", proj, "f"), *dense]
    rest = list(install_quantized_weights(model, weights, True))
    assert rest == dense
    assert isinstance(model.embed, QuantizedEmbedding) and model.embed.weight is embed
    assert isinstance(model.lm_head, Linear) and model.lm_head.weight is embed  # one copy for both
    assert isinstance(model.proj, Linear) and model.proj.weight is proj and model.proj.bias is not None
    assert {name for name, _ in model.named_parameters()} == {"proj.bias", "norm.weight", "norm.bias"}
    ids = torch.tensor([1, 7])
    assert torch.equal(model.embed(ids), embed.dequantize()[ids])


def test_install_refuses_a_weight_of_the_wrong_shape():
    from sfllm_core.errors import UnsupportedModelError

    wrong = Int8ChannelWeight.from_dense(torch.randn(40, 64))
    with pytest.raises(UnsupportedModelError, match="proj.weight"):
        install_quantized_weights(TinyLM(), [("proj.weight", wrong, "f.gguf")], False)
