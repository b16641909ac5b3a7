"""sfllm_core/kernels/cpu_norm_rope.py: one call each for RMSNorm (+ residual, + sandwich norm) and q/k norm + RoPE,
equal to the torch references in layers/norms.py and layers/rotary.py to float32 rounding."""

import pytest
import torch

from sfllm_core.kernels import cpu_norm_rope
from sfllm_core.layers.norms import GemmaRMSNorm, RMSNorm
from sfllm_core.layers.rotary import RotaryEmbedding, norm_and_rotate

pytestmark = pytest.mark.skipif(not cpu_norm_rope.available(), reason="the CPU kernels do not build here")


def norm(cls: type[RMSNorm], dim: int, seed: int) -> RMSNorm:
    layer = cls(dim, 1e-6)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(dim, generator=torch.Generator().manual_seed(seed)) * 0.5)
    return layer


@pytest.mark.parametrize("cls", [RMSNorm, GemmaRMSNorm])
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_add_norm_matches_the_reference_with_and_without_the_sandwich_norm(cls, rows):
    g = torch.Generator().manual_seed(rows)
    n, pre = norm(cls, 640, 1), norm(cls, 640, 2)
    x, residual = torch.randn(rows, 640, generator=g) * 3, torch.randn(rows, 640, generator=g)
    with torch.inference_mode():
        for x_norm in (None, pre):
            got_out, got_sum = n.add_norm(x, residual, x_norm)  # the kernel (float32 on the CPU)
            want_sum = residual + (x if x_norm is None else x_norm._reference(x))
            torch.testing.assert_close(got_sum, want_sum, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(got_out, n._reference(want_sum), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(n(x), n._reference(x), rtol=1e-5, atol=1e-5)
        # Rows with a stride (a column slice of a wider tensor) read correctly.
        wide = torch.randn(rows, 900, generator=g)
        torch.testing.assert_close(n(wide[:, 100:740]), n._reference(wide[:, 100:740]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", [RMSNorm, GemmaRMSNorm])
def test_norm_and_rotate_matches_the_reference_on_a_qkv_split(cls):
    g = torch.Generator().manual_seed(0)
    tokens, heads, kv_heads, dim = 6, 4, 1, 256
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g)
    q = qkv[:, : heads * dim].view(tokens, heads, dim)  # views into the fused projection, as Attention has them
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    positions = torch.tensor([0, 1, 7, 300, 301, 4095])
    rotary = RotaryEmbedding(dim, 10000.0, 4096 + 1, 1.0)
    q_norm, k_norm = norm(cls, dim, 3), norm(cls, dim, 4)
    with torch.inference_mode():
        got_q, got_k = norm_and_rotate(positions, q, k, q_norm, k_norm, rotary)
    want_q, want_k = rotary(positions, q_norm._reference(q), k_norm._reference(k))
    torch.testing.assert_close(got_q, want_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_k, want_k, rtol=1e-5, atol=1e-5)
