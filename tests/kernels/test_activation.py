"""The gated activation kernels match layers/activation.py on a fused gate|up projection output."""

import pytest
import torch

from sfllm_core.kernels.activation import gelu_tanh_and_mul, silu_and_mul
from sfllm_core.layers.activation import GeluTanhAndMul, SiluAndMul

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

KERNELS = {"silu": (silu_and_mul, SiluAndMul), "gelu_tanh": (gelu_tanh_and_mul, GeluTanhAndMul)}


def _check(rows, inner, dtype, which, device, atol, seed):
    kernel, layer = KERNELS[which]
    gen = torch.Generator().manual_seed(seed)
    # gate_up is a view into a NaN-padded buffer: reading past a row's 2 * inner columns poisons it.
    buffer = torch.full((rows, 2 * inner + 8), float("nan"), dtype=dtype)
    buffer[:, : 2 * inner] = (torch.randn(rows, 2 * inner, generator=gen) * 3).to(dtype)
    gate_up = buffer[:, : 2 * inner]
    expected = layer()(gate_up)
    out = torch.full((rows, inner), float("nan"), dtype=dtype, device=device)
    assert kernel(gate_up.to(device), out=out) is out
    # Half-precision results may differ from the reference by one rounding step.
    rtol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out.cpu().float(), expected.float(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("which", list(KERNELS))
@pytest.mark.parametrize(
    "rows,inner,dtype",
    [(4, 48, torch.float32), (2, 1100, torch.float32), (3, 64, torch.bfloat16)],  # 1100: two column blocks
)
def test_activation_matches_reference(device, which, rows, inner, dtype):
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    _check(rows, inner, dtype, which, device, atol, seed=inner)


def test_activation_allocates_output_with_leading_dims(device):
    gate_up = torch.randn(2, 3, 32, device=device)
    out = silu_and_mul(gate_up)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out, silu_and_mul(gate_up.view(6, 32)).view(2, 3, 16))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("which", list(KERNELS))
@pytest.mark.parametrize("rows,inner", [(1, 3072), (300, 3072), (64, 12288), (300, 6912)])
def test_activation_full_shapes_on_gpu(which, rows, inner):
    _check(rows, inner, torch.bfloat16, which, torch.device("cuda"), 2e-2, seed=rows)
