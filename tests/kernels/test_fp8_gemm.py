"""Activation quantization per token (and 128 columns) and the FP8 GEMMs against float32 references."""

import pytest
import torch
import torch.nn.functional as F

from sfllm_core.kernels.fp8_gemm import fp8_matmul, quantize_rows, triton_fp8_gemm, uses_rowwise_scaled_mm
from sfllm_core.layers.activation import SiluAndMul
from sfllm_core.layers.fp8 import FP8_DTYPE, FP8_MAX, Fp8Weight

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _group_scales(x: torch.Tensor, grouped: bool) -> torch.Tensor:
    m, k = x.shape
    if not grouped:
        return x.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX
    pad = -k % 128
    groups = F.pad(x.abs(), (0, pad)).view(m, -1, 128)
    return groups.amax(dim=-1).clamp(min=1e-12) / FP8_MAX


def _expand(scale: torch.Tensor, k: int) -> torch.Tensor:
    return scale if scale.shape[1] == 1 else scale.repeat_interleave(128, dim=1)[:, :k]


def _interpreter_slip(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Where Triton's interpreter rounds to float8 wrongly: it does not carry a rounding up into the
    exponent, so a value that should become a power of two comes out smaller (half of it, or zero
    below the subnormals)."""
    power_of_two = torch.frexp(want.abs())[0] == 0.5
    return power_of_two & (got.abs() < want.abs()) & (got * want >= 0)


def _assert_fp8_equal(got: torch.Tensor, want: torch.Tensor, device: torch.device) -> None:
    got, want = got.float().cpu(), want.float().cpu()
    if device.type == "cuda":
        assert torch.equal(got, want)
        return
    assert ((got == want) | _interpreter_slip(got, want)).all()


@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("m,k", [(1, 64), (5, 300), (3, 1024)])
def test_quantize_rows_scales_by_amax(device, m, k, grouped):
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(m, k, generator=gen) * torch.logspace(-1, 1, k)
    q, scale = quantize_rows(x.to(device), grouped)
    want_scale = _group_scales(x, grouped)
    assert q.dtype == FP8_DTYPE and scale.shape == want_scale.shape and scale.dtype == torch.float32
    if grouped:
        assert scale.stride(0) == 1  # column-major: the Triton GEMM reads a column per K step
    torch.testing.assert_close(scale.cpu(), want_scale, rtol=0, atol=0)
    want_q = (x / _expand(want_scale, k)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    _assert_fp8_equal(q, want_q, device)


def test_quantize_rows_applies_the_activation_first(device):
    gen = torch.Generator().manual_seed(3)
    gate_up = torch.randn(4, 2 * 200, generator=gen).to(torch.bfloat16)
    q, scale = quantize_rows(gate_up.to(device), grouped=True, activation="silu")
    act = SiluAndMul()(gate_up).float()
    # Rounded to bfloat16 where the layer rounds, but from another sigmoid (and the interpreter
    # truncates where CUDA rounds, twice): a bfloat16 step or two apart at most.
    torch.testing.assert_close(scale.cpu(), _group_scales(act, True), rtol=2**-6, atol=0)
    want = (act / _expand(scale.cpu(), 200)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float()
    got = q.float().cpu()
    within_a_step = (got - want).abs() <= want.abs() / 8 + 2**-9
    assert (within_a_step | _interpreter_slip(got, want)).all()
    assert (got == want).float().mean() > 0.9


@pytest.mark.parametrize(
    "m,n,k,scheme,spread",
    [
        (5, 24, 64, "channel", False),
        (20, 130, 300, "channel", False),
        (20, 130, 300, "block", False),  # N, K off the 128 blocks and off the tiles
        (70, 200, 256, "block", False),
        (17, 96, 256, "block", True),  # block scales spread over rows (merged q|k|v of a small model)
    ],
)
def test_triton_fp8_gemm_matches_dequantized_operands(device, m, n, k, scheme, spread):
    gen = torch.Generator().manual_seed(m + n)
    fw = Fp8Weight.from_dense(torch.randn(n, k, generator=gen) / k**0.5, scheme)
    if spread:
        fw = fw.row_spread()
    x = torch.randn(m, k, generator=gen)
    q, q_scale = quantize_rows(x.to(device), fw.scale.shape[1] > 1)
    out = triton_fp8_gemm(q, q_scale, fw.weight.to(device), fw.scale.to(device), fw.block_n, torch.float32).cpu()
    x_deq = q.float().cpu() * _expand(q_scale.cpu(), k)
    # Hopper's fp8 tensor cores accumulate with fewer bits than float32 (DeepSeek-V3 measured ~14).
    atol, rtol = (2e-3, 1e-3) if device.type == "cuda" else (1e-4, 1e-5)
    torch.testing.assert_close(out, x_deq @ fw.dequantize().t(), atol=atol, rtol=rtol)
    # And near the unquantized product: both sides carry e4m3's few percent.
    assert F.cosine_similarity(out.flatten(), (x @ fw.dequantize().t()).flatten(), dim=0) > 0.99


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("scheme", ["channel", "block"])
@pytest.mark.parametrize(
    "m,n,k", [(8, 6144, 4096), (256, 24576, 4096), (250, 24576, 4096), (300, 4096, 12288), (77, 384, 256)]
)
def test_fp8_matmul_paths_on_gpu(m, n, k, scheme):
    """Whatever path fp8_matmul takes (_scaled_mm row-wise, or Triton), it runs and equals the reference;
    250 rows: the prefill whose block-wise _scaled_mm cuBLASLt refused on the H200."""
    gen = torch.Generator().manual_seed(m)
    fw = Fp8Weight.from_dense(torch.randn(n, k, generator=gen) / k**0.5, scheme).cuda()
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16).cuda()
    out = fp8_matmul(x, fw.weight, fw.scale, fw.block_n, fw.block_k).float()
    q, q_scale = quantize_rows(x, fw.scale.shape[1] > 1)
    want = (q.float() * _expand(q_scale, k)) @ fw.dequantize().t()
    torch.testing.assert_close(out, want, atol=3e-2, rtol=2e-2)
    triton_out = triton_fp8_gemm(q, q_scale, fw.weight, fw.scale, fw.block_n, torch.bfloat16).float()
    torch.testing.assert_close(triton_out, want, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("m", [1, 77, 250, 256, 8192])
@pytest.mark.parametrize("n,k", [(6144, 4096), (24576, 4096), (4096, 12288), (151936, 4096), (384, 256)])
def test_block_weights_never_go_to_scaled_mm(m, n, k):
    """Block scales run the Triton GEMM at every shape: cuBLASLt refused its block-wise recipe for some
    row counts on the H200 (250 rows) after passing others (256), and a step's row count is any number."""
    for capability in ((9, 0), (10, 0), (12, 0)):
        assert not uses_rowwise_scaled_mm(n, k, 128, True, torch.bfloat16, capability)
        assert not uses_rowwise_scaled_mm(n, k, 1, True, torch.bfloat16, capability)  # scales spread over rows
        assert uses_rowwise_scaled_mm(n, k, 1, False, torch.bfloat16, capability)  # per channel: row-wise
    assert not uses_rowwise_scaled_mm(n, k, 1, False, torch.bfloat16, (8, 6))  # no fp8 tensor cores
    assert not uses_rowwise_scaled_mm(n, k, 1, False, torch.bfloat16, None)  # not CUDA
    assert not uses_rowwise_scaled_mm(n, k + 8, 1, False, torch.bfloat16, (9, 0))  # off cuBLAS's 16 alignment


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("scheme", ["channel", "block"])
@pytest.mark.parametrize("rows", [1, 2, 64])
def test_fp8_linear_replays_in_a_cuda_graph(scheme, rows):
    fw = Fp8Weight.from_dense(torch.randn(1024, 512) / 512**0.5, scheme).cuda()
    x = torch.randn(rows, 512, device="cuda", dtype=torch.bfloat16)
    eager = fw(x)  # warm-up outside the capture: compiles, probes
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fw(x)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(captured, fw(x), atol=0, rtol=0)
    assert not torch.equal(captured, eager)
