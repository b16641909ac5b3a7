"""The GEMV given FP8 weights and their scales (kernels/gemv.py) equals a float32 matmul by the
dequantized weight: plain, gated, and with the norm fused in."""

import pytest
import torch
import torch.nn.functional as F
import triton

from sfllm_core.kernels.gemv import gemv, gemv_normed, launch_config, one_row_fp8_config, row_iters
from sfllm_core.layers.activation import GeluTanhAndMul, SiluAndMul
from sfllm_core.layers.fp8 import Fp8Weight
from sfllm_core.layers.norms import GemmaRMSNorm, RMSNorm

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ACTS = {None: None, "silu": SiluAndMul, "gelu_tanh": GeluTanhAndMul}


def _gemv(x, fw, bias=None, activation=None, iters=None, prefetch=None):
    device = x.device
    bias = None if bias is None else bias.to(device)
    weight, scale = fw.weight.to(device), fw.scale.to(device)
    return gemv(x, weight, bias, activation, scale=scale, scale_block_n=fw.block_n, iters=iters, prefetch=prefetch)


def _gemv_normed(h, fw, norm_weight, eps, gemma, residual, iters=None, prefetch=None):
    weight, scale = fw.weight.to(h.device), fw.scale.to(h.device)
    return gemv_normed(
        h, weight, None, norm_weight, eps, gemma, residual, scale=scale, scale_block_n=fw.block_n, iters=iters,
        prefetch=prefetch,
    )  # fmt: skip


def _padded(rows: int, width: int, gen: torch.Generator, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    # A view into a NaN-padded buffer: reading past a row's width poisons the result.
    buffer = torch.full((rows, width + 8), float("nan"), dtype=dtype)
    buffer[:, :width] = (torch.randn(rows, width, generator=gen) * scale).to(dtype)
    return buffer[:, :width]


def _check(rows, n, k, scheme, activation, with_bias, dtype, atol, device, seed):
    gen = torch.Generator().manual_seed(seed)
    width = k if activation is None else 2 * k
    x = _padded(rows, width, gen, dtype)
    fw = Fp8Weight.from_dense(torch.randn(n, k, generator=gen) / k**0.5, scheme)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    inputs = x if activation is None else ACTS[activation]()(x)
    expected = F.linear(inputs.float(), fw.dequantize(), None if bias is None else bias.float())
    out = _gemv(x.to(device), fw, bias, activation)
    assert out.shape == (rows, n) and out.dtype == dtype
    torch.testing.assert_close(out.cpu().float(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("scheme", ["channel", "block"])
@pytest.mark.parametrize(
    "rows,n,k,activation,with_bias,dtype",
    [
        (1, 24, 64, None, False, torch.float32),
        (2, 40, 300, "silu", True, torch.float32),  # K off the chunks and blocks, N off the row block
        (3, 130, 256, "gelu_tanh", False, torch.float32),  # rows across two 128-row scale blocks
        (4, 16, 520, None, True, torch.float32),
        (2, 32, 200, "silu", False, torch.bfloat16),
    ],
)
def test_fp8_gemv_matches_dequantized_matmul(device, rows, n, k, scheme, activation, with_bias, dtype):
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    _check(rows, n, k, scheme, activation, with_bias, dtype, atol, device, seed=k + rows)


def test_fp8_gemv_reads_merged_row_spread_scales(device):
    # q|k|v of 64 + 32 + 32 rows from 128x128 blocks: the merged weight has a scale per row.
    gen = torch.Generator().manual_seed(1)
    parts = [Fp8Weight.from_dense(torch.randn(n, 256, generator=gen), "block") for n in (64, 32, 32)]
    merged = Fp8Weight.concat(parts)
    assert merged.block_n == 1 and merged.scale.shape == (128, 2)
    x = torch.randn(2, 256, generator=gen)
    out = _gemv(x.to(device), merged)
    torch.testing.assert_close(out.cpu(), x @ merged.dequantize().t(), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "rows,n,k,scheme,gemma,with_residual",
    [
        (1, 48, 64, "channel", False, True),
        (2, 20, 300, "block", False, True),
        (3, 36, 130, "block", True, True),
        (2, 16, 96, "channel", False, False),
    ],
)
def test_fp8_gemv_normed_matches_norm_then_matmul(device, rows, n, k, scheme, gemma, with_residual):
    gen = torch.Generator().manual_seed(n + k)
    norm = (GemmaRMSNorm if gemma else RMSNorm)(k, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(k, generator=gen) * 0.5 + (0.0 if gemma else 1.0))
    h = _padded(rows, k, gen, torch.float32, scale=3.0)
    residual = _padded(rows, k, gen, torch.float32, scale=3.0) if with_residual else None
    fw = Fp8Weight.from_dense(torch.randn(n, k, generator=gen) / k**0.5, scheme)
    if residual is None:
        x, expected_residual = norm(h), h
    else:
        x, expected_residual = norm.add_norm(h, residual)
    out, new_residual = _gemv_normed(
        h.to(device),
        fw,
        norm.weight.detach().to(device),
        norm.eps,
        gemma,
        None if residual is None else residual.to(device),
    )
    torch.testing.assert_close(out.cpu(), F.linear(x, fw.dequantize()), atol=1e-4, rtol=0)
    torch.testing.assert_close(new_residual.cpu(), expected_residual, atol=0, rtol=0)


@pytest.mark.parametrize("scheme", ["channel", "block"])
@pytest.mark.parametrize("iters,prefetch", [(2, False), (3, False), (2, True), (3, True), (5, True)])
def test_row_blocks_sharing_a_program_make_the_input_once(device, scheme, iters, prefetch):
    # One row of x, several row blocks per program (the last program's blocks past N), each block
    # loaded on its turn or while the one before is summed: plain, gated, normed.
    gen = torch.Generator().manual_seed(iters)
    n, k = 300, 256  # 16-row blocks at most: 19 or more blocks, so several programs, the last part-empty
    fw = Fp8Weight.from_dense(torch.randn(n, k, generator=gen) / k**0.5, scheme)
    x = _padded(1, 2 * k, gen, torch.float32)
    plain = _gemv(x[:, :k].to(device), fw, iters=iters, prefetch=prefetch).cpu()
    torch.testing.assert_close(plain, x[:, :k] @ fw.dequantize().t())
    gated = _gemv(x.to(device), fw, None, "silu", iters=iters, prefetch=prefetch).cpu()
    torch.testing.assert_close(gated, SiluAndMul()(x) @ fw.dequantize().t(), atol=1e-4, rtol=0)
    norm = RMSNorm(k, 1e-6)
    h, residual = x[:, :k].contiguous(), x[:, k:].contiguous()
    want, want_residual = norm.add_norm(h, residual)
    out, new_residual = _gemv_normed(
        h.to(device), fw, norm.weight.detach().to(device), 1e-6, False, residual.to(device), iters, prefetch
    )
    torch.testing.assert_close(out.cpu(), want @ fw.dequantize().t(), atol=1e-4, rtol=0)
    torch.testing.assert_close(new_residual.cpu(), want_residual, atol=0, rtol=0)


def test_launch_config_holds_whole_rows_in_16_kb():
    # Qwen3-8B's projections: a program holds whole rows (block scales of 128 columns stay whole),
    # 16 KB of weights whether they are bf16 or fp8, and 8 warps once that is over 8192 elements.
    for n, k in [(6144, 4096), (4096, 4096), (24576, 4096), (4096, 12288), (151936, 4096), (1024, 2048)]:
        for size in (1, 2):
            block_n, block_k, warps = launch_config(n, k, size)
            assert block_k >= k and block_k & (block_k - 1) == 0 and block_k % 128 == 0
            assert block_n * block_k * size <= 16384 or block_n == 1
            assert warps == (8 if block_n * block_k > 8192 else 4)
    assert launch_config(6144, 4096, 1)[0] == 2 * launch_config(6144, 4096, 2)[0]
    # One row of x on 132 SMs: up to 8 row blocks a program while two programs per SM remain.
    assert row_iters(1, 4096, 132) == 8 and row_iters(1, 1536, 132) == 4 and row_iters(1, 256, 132) == 1
    assert row_iters(2, 4096, 132) == 1


# Qwen3-8B's and 0.6B's projections as the model launches them at batch 1: (N, K, input made in the
# kernel: normed q|k|v and gate|up, gated down; o and lm_head read x as it is).
ONE_ROW_SHAPES = [
    (6144, 4096, True), (4096, 4096, False), (24576, 4096, True), (4096, 12288, True), (151936, 4096, False),
    (4096, 1024, True), (1024, 2048, False), (6144, 1024, True), (1024, 3072, True), (151936, 1024, False),
]  # fmt: skip


def test_one_row_fp8_config_walks_whole_rows_in_at_least_a_wave():
    for n, k, made_input in ONE_ROW_SHAPES:
        block_n, block_k, warps, iters, prefetch = one_row_fp8_config(n, k, made_input, 132)
        assert block_k >= k and block_k & (block_k - 1) == 0 and block_k % 128 == 0
        assert block_n * block_k // (32 * warps) in (64, 128), (n, k)  # weights a thread holds
        programs = triton.cdiv(triton.cdiv(n, block_n), iters)
        assert iters == 1 or programs >= 132, (n, k)
        assert not prefetch or (iters >= 4 and programs <= 4 * 132), (n, k)
        if made_input and iters > 1:  # the input is made once for at most 16 rows
            assert block_n * iters <= 16
    # The sweep's winners (docs/PERFORMANCE.md): gated down walks 8 blocks of 2 rows, q|k|v prefetches.
    assert one_row_fp8_config(4096, 12288, True, 132) == (2, 16384, 8, 8, False)
    assert one_row_fp8_config(6144, 4096, True, 132) == (4, 4096, 4, 4, True)
    assert one_row_fp8_config(4096, 4096, False, 132) == (2, 4096, 4, 2, False)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("rows", [1, 2, 4])
@pytest.mark.parametrize("scheme", ["channel", "block"])
@pytest.mark.parametrize(
    "n,k,activation",
    [(6144, 4096, None), (4096, 4096, None), (24576, 4096, None), (4096, 12288, "silu"), (1024, 3072, "silu")],
)
def test_fp8_gemv_full_shapes_on_gpu(rows, n, k, scheme, activation):
    _check(rows, n, k, scheme, activation, False, torch.bfloat16, 6e-2, torch.device("cuda"), seed=rows)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("n,k", [(6144, 4096), (24576, 4096), (4096, 1024)])
def test_fp8_gemv_normed_full_shapes_on_gpu(rows, n, k):
    # The launches q|k|v and gate|up get (one row: one_row_fp8_config's walk, with prefetch for q|k|v).
    gen = torch.Generator().manual_seed(n)
    norm = RMSNorm(k, 1e-6)
    h = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    residual = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
    fw = Fp8Weight.from_dense(torch.randn(n, k, generator=gen) / k**0.5, "channel")
    x, want_residual = norm.add_norm(h.float(), residual.float())
    cuda = torch.device("cuda")
    out, new_residual = _gemv_normed(
        h.to(cuda), fw, norm.weight.detach().to(cuda, torch.bfloat16), 1e-6, False, residual.to(cuda)
    )
    torch.testing.assert_close(out.cpu().float(), F.linear(x, fw.dequantize()), atol=6e-2, rtol=2e-2)
    torch.testing.assert_close(new_residual.cpu().float(), want_residual, atol=2e-2, rtol=1e-2)
