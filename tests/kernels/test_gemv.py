"""The decode GEMV matches F.linear, alone and with a gated activation folded into its input."""

import pytest
import torch
import torch.nn.functional as F

from sfllm_core.kernels.gemv import gemv
from sfllm_core.layers.activation import GeluTanhAndMul, SiluAndMul

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
ACTS = {None: None, "silu": SiluAndMul, "gelu_tanh": GeluTanhAndMul}


def _check(rows, k, n, activation, with_bias, dtype, atol, device, seed):
    gen = torch.Generator().manual_seed(seed)
    width = k if activation is None else 2 * k
    # x is a view into a NaN-padded buffer: reading past a row's width columns poisons the result.
    buffer = torch.full((rows, width + 8), float("nan"), dtype=dtype)
    buffer[:, :width] = torch.randn(rows, width, generator=gen).to(dtype)
    x = buffer[:, :width]
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    # The reference: the activation layer in the activation dtype, then the product in float32.
    inputs = x if activation is None else ACTS[activation]()(x)
    expected = F.linear(inputs.float(), weight.float(), None if bias is None else bias.float())
    out = gemv(x.to(device), weight.to(device), None if bias is None else bias.to(device), activation)
    assert out.shape == (rows, n) and out.dtype == dtype
    torch.testing.assert_close(out.cpu().float(), expected, atol=atol, rtol=0)


@pytest.mark.parametrize("activation", list(ACTS))
@pytest.mark.parametrize(
    "rows,k,n,with_bias,dtype",
    [
        (1, 64, 12, False, torch.float32),
        (3, 48, 10, True, torch.float32),  # K not a multiple of the block, N of the row block
        (2, 32, 8, False, torch.bfloat16),
    ],
)
def test_gemv_matches_linear(device, rows, k, n, activation, with_bias, dtype):
    # bfloat16: the output's own rounding, and the interpreter truncates where CUDA rounds.
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    _check(rows, k, n, activation, with_bias, dtype, atol, device, seed=k)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("rows", [1, 2, 4, 8])
@pytest.mark.parametrize(
    "k,n,activation",
    [(1024, 4096, None), (2048, 1024, None), (1024, 6144, None), (3072, 1024, "silu"), (6912, 1152, "gelu_tanh")],
)
def test_gemv_full_shapes_on_gpu(rows, k, n, activation):
    _check(rows, k, n, activation, False, torch.bfloat16, 5e-2, torch.device("cuda"), seed=rows)


def _check_normed(rows, k, n, gemma, with_residual, with_x_norm, dtype, atol, device, seed):
    from sfllm_core.kernels.gemv import gemv_normed
    from sfllm_core.layers.norms import GemmaRMSNorm, RMSNorm

    gen = torch.Generator().manual_seed(seed)
    norm_cls = GemmaRMSNorm if gemma else RMSNorm
    norm, h_norm = norm_cls(k, 1e-6), norm_cls(k, 1e-5)
    with torch.no_grad():
        for module in (norm, h_norm):
            module.weight.copy_(torch.randn(k, generator=gen) * 0.5 + (0.0 if gemma else 1.0))
    norm, h_norm = norm.to(dtype), h_norm.to(dtype)
    h = (torch.randn(rows, k, generator=gen) * 3).to(dtype)
    residual = (torch.randn(rows, k, generator=gen) * 3).to(dtype) if with_residual else None
    weight = (torch.randn(n, k, generator=gen) / k**0.5).to(dtype)
    # The reference: the unfused modules, then the product in float32.
    if residual is None:
        x, expected_residual = norm(h), h
    else:
        x, expected_residual = norm.add_norm(h, residual, h_norm if with_x_norm else None)
    expected = F.linear(x.float(), weight.float())

    def dev(t):
        return None if t is None else t.to(device)

    out, new_residual = gemv_normed(
        dev(h),
        dev(weight),
        None,
        dev(norm.weight.data),
        norm.eps,
        gemma,
        dev(residual),
        dev(h_norm.weight.data) if with_x_norm else None,
        h_norm.eps,
    )
    assert out.shape == (rows, n) and new_residual.shape == (rows, k)
    torch.testing.assert_close(out.cpu().float(), expected, atol=atol, rtol=0)
    # The sum itself is exact; a sandwich norm before it may differ by one rounding step.
    rtol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(new_residual.cpu(), expected_residual, atol=1e-5 if rtol < 1e-3 else atol, rtol=rtol)
    if residual is not None:
        assert torch.equal(residual.to(device), dev(residual)), "the input residual is left as it was"


@pytest.mark.parametrize("gemma", [False, True], ids=["qwen3", "gemma"])
@pytest.mark.parametrize(
    "rows,k,n,with_residual,with_x_norm,dtype",
    [
        (1, 64, 12, False, False, torch.float32),
        (3, 48, 10, True, False, torch.float32),  # K not a power of two
        (2, 32, 8, True, True, torch.float32),
        (1, 32, 8, True, True, torch.bfloat16),
    ],
)
def test_gemv_normed_matches_norm_then_linear(device, rows, k, n, gemma, with_residual, with_x_norm, dtype):
    atol = 1e-4 if dtype == torch.float32 else 5e-2
    _check_normed(rows, k, n, gemma, with_residual, with_x_norm, dtype, atol, device, seed=k)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("rows", [1, 4])
@pytest.mark.parametrize(
    "gemma,k,n", [(False, 1024, 4096), (False, 1024, 6144), (True, 1152, 13824), (True, 640, 1280)]
)
def test_gemv_normed_full_shapes_on_gpu(rows, gemma, k, n):
    _check_normed(rows, k, n, gemma, True, gemma, torch.bfloat16, 5e-2, torch.device("cuda"), seed=rows)
