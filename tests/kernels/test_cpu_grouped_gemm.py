"""sfllm_core/kernels/cpu_grouped_gemm.py: the CPU kernels compute x @ W^T for GGUF-grouped int8 weights exactly."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, dequantize, quantize

from sfllm_core.kernels import cpu_grouped_gemm
from sfllm_core.layers.quantization import GroupedIntWeight, QuantizedWeight, RowSwitchWeight
from sfllm_core.models.gguf import GgufBlockWeight, grouped_ints

pytestmark = pytest.mark.skipif(not cpu_grouped_gemm.available(), reason="the CPU kernels do not build here")


def assert_float32_exact(got: torch.Tensor, truth: torch.Tensor) -> None:
    """Within float32 summation error of the float64 product (weights and activations are not rounded)."""
    assert got.dtype == torch.float32 and got.shape == truth.shape
    scale = truth.abs().amax().clamp(min=1e-30)
    assert float((got.double() - truth).abs().amax() / scale) < 2e-6


@pytest.mark.parametrize("group", [16, 32, 64, 256])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 16])
def test_grouped_int8_matches_the_float64_product_for_every_row_tile(group, rows):
    g = torch.Generator().manual_seed(group * 100 + rows)
    n, k = 70, 512  # 70 output features: 17 blocks of 4 and a remainder of 2
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, k // group, generator=g) * 0.02
    offset = torch.randn(n, k // group, generator=g) * 0.01
    x = torch.randn(rows, k, generator=g)
    w = (q.double().view(n, -1, group) * scale.double()[:, :, None]).view(n, k)
    assert_float32_exact(cpu_grouped_gemm.grouped_int8_mm(x, q, scale), x.double() @ w.t())
    w_off = w + offset.double().repeat_interleave(group, dim=1)
    assert_float32_exact(cpu_grouped_gemm.grouped_int8_mm(x, q, scale, offset), x.double() @ w_off.t())


@pytest.mark.parametrize("type_name", ["Q5_0", "Q8_0"])
@pytest.mark.parametrize("rows", [1, 3, 4, 7])
def test_gguf_blocks_match_the_gguf_package_dequantization(type_name, rows):
    rng = np.random.default_rng(rows)
    n, k = 38, 320
    data = quantize(rng.standard_normal((n, k)).astype(np.float32), GGMLQuantizationType[type_name])
    truth_w = torch.from_numpy(dequantize(data, GGMLQuantizationType[type_name]).reshape(n, k)).double()
    x = torch.from_numpy(rng.standard_normal((rows, k)).astype(np.float32))
    got = cpu_grouped_gemm.gguf_block_mm(x, torch.from_numpy(data), type_name)
    assert_float32_exact(got, x.double() @ truth_w.t())


def test_no_rows_give_an_empty_result():
    q, scale = torch.ones(8, 32, dtype=torch.int8), torch.ones(8, 1)
    assert cpu_grouped_gemm.grouped_int8_mm(torch.empty(0, 32), q, scale).shape == (0, 8)


def q5_0_weight(n: int, k: int, seed: int) -> tuple[GgufBlockWeight, np.ndarray]:
    data = quantize(np.random.default_rng(seed).standard_normal((n, k)).astype(np.float32), GGMLQuantizationType.Q5_0)
    return GgufBlockWeight(torch.from_numpy(data), type_name="Q5_0"), data


def test_block_weight_is_exact_and_concatenates_mixed_blocks_as_q8_0():
    q5, data5 = q5_0_weight(12, 64, 1)
    data8 = quantize(np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32), GGMLQuantizationType.Q8_0)
    q8 = GgufBlockWeight(torch.from_numpy(data8), type_name="Q8_0")
    assert torch.equal(q5.dequantize(), grouped_ints(data5, "Q5_0", (12, 64)).dequantize())
    assert torch.equal(q5.rows(torch.tensor([[3, 0]])), q5.dequantize()[[3, 0]][None])
    # q|k|v of a Q5_0 query and key beside a Q8_0 value (half of Gemma 3 270M's layers): all Q8_0, no loss.
    merged = GgufBlockWeight.concat([q5, q8])
    assert merged.type_name == "Q8_0" and merged.shape == (16, 64)
    assert torch.equal(merged.dequantize(), torch.cat([q5.dequantize(), q8.dequantize()]))
    x = torch.randn(2, 64)
    assert_float32_exact(merged(x), x.double() @ merged.dequantize().double().t())


def test_a_row_switch_sharing_one_exact_weight_is_cached_once_and_restored_shared():
    exact = GroupedIntWeight(torch.randint(-32, 32, (8, 64), dtype=torch.int8), torch.rand(8, 4))
    switch = RowSwitchWeight(exact, exact, max_rows=16)
    meta, tensors = switch.to_tensors()
    assert meta["decode"] == "prefill" and all(k.startswith("prefill.") for k in tensors)
    back = QuantizedWeight.from_tensors(meta, tensors)
    assert back.decode is back.prefill and torch.equal(back.dequantize(), exact.dequantize())
    merged = RowSwitchWeight.concat([switch, switch])
    assert merged.decode is merged.prefill and merged.shape == (16, 64)
    blocks, _ = q5_0_weight(8, 64, 3)
    meta, tensors = blocks.to_tensors()
    restored = QuantizedWeight.from_tensors(meta, tensors)
    assert restored.type_name == "Q5_0" and torch.equal(restored.dequantize(), blocks.dequantize())
