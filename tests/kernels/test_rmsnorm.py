"""The RMSNorm kernel matches layers/norms.py in both flavours: alone, after the residual add, and after
normalising x by a second weight before that add (Gemma's sandwich norms)."""

import pytest
import torch

from sfllm_core.kernels.rmsnorm import rmsnorm
from sfllm_core.layers.norms import GemmaRMSNorm, RMSNorm

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
MODES = ["norm", "add_norm", "norm_add_norm"]


def _random_norm(dim: int, gemma: bool, dtype: torch.dtype, gen: torch.Generator) -> RMSNorm:
    norm = (GemmaRMSNorm if gemma else RMSNorm)(dim, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(dim, generator=gen) * 0.5 + (0.0 if gemma else 1.0))
    return norm.to(dtype)


def _check(rows, dim, dtype, gemma, mode, device, atol, seed):
    gen = torch.Generator().manual_seed(seed)
    norm = _random_norm(dim, gemma, dtype, gen)
    x_norm = _random_norm(dim, gemma, dtype, gen) if mode == "norm_add_norm" else None
    # x is a view into a NaN-padded buffer: reading past a row's dim columns poisons the result.
    buffer = torch.full((rows, dim + 8), float("nan"), dtype=dtype)
    buffer[:, :dim] = (torch.randn(rows, dim, generator=gen) * 3).to(dtype)
    x = buffer[:, :dim]
    residual = None if mode == "norm" else torch.randn(rows, dim, generator=gen).to(dtype)
    if residual is None:
        expected, expected_residual = norm(x), None
    else:
        expected, expected_residual = norm.add_norm(x, residual, x_norm)

    out = torch.full((rows, dim), float("nan"), dtype=dtype, device=device)
    residual_out = None if residual is None else torch.full_like(out, float("nan"))
    result = rmsnorm(
        x.to(device),
        norm.weight.to(device),
        norm.eps,
        gemma,
        None if residual is None else residual.to(device),
        x_weight=None if x_norm is None else x_norm.weight.to(device),
        x_eps=1e-6,
        out=out,
        residual_out=residual_out,
    )
    # Half-precision results may differ from the reference by one rounding step.
    rtol = 1e-5 if dtype == torch.float32 else 1.6e-2
    if residual is None:
        assert result is out
    else:
        assert result[0] is out and result[1] is residual_out
        if device.type == "cuda" and x_norm is None:
            # The sum is one rounding of the same two numbers on either path: it must be exact.
            assert torch.equal(residual_out.cpu(), expected_residual)
        else:
            # The interpreter truncates float32 to bfloat16 where CUDA rounds to nearest.
            torch.testing.assert_close(residual_out.cpu().float(), expected_residual.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(out.cpu().float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("gemma", [False, True], ids=["qwen3", "gemma"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("rows,dim,dtype", [(5, 48, torch.float32), (3, 64, torch.bfloat16)])
def test_rmsnorm_matches_reference(device, rows, dim, dtype, gemma, mode):
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    _check(rows, dim, dtype, gemma, mode, device, atol, seed=dim)


def test_rmsnorm_keeps_leading_dims(device):
    x = torch.randn(2, 3, 16, device=device)
    weight = torch.rand(16, device=device)
    out = rmsnorm(x, weight, 1e-6, gemma=False)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out, rmsnorm(x.view(6, 16), weight, 1e-6, gemma=False).view(2, 3, 16))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("gemma", [False, True], ids=["qwen3", "gemma"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dim", [1024, 4096, 640, 1152])
def test_rmsnorm_full_shapes_on_gpu(dim, gemma, mode):
    _check(300, dim, torch.bfloat16, gemma, mode, torch.device("cuda"), 2e-2, seed=dim)
