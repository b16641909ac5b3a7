"""The fused in-place RoPE kernel matches apply_rope_reference, on strided views of a fused qkv."""

import pytest
import torch

from sfllm_core.kernels.rope import rope_inplace
from sfllm_core.layers.rotary import apply_rope_reference, rope_cos_sin_cache

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check(num_tokens, num_q_heads, num_k_heads, head_dim, base, scaling, dtype, atol, device, seed):
    gen = torch.Generator().manual_seed(seed)
    cache = rope_cos_sin_cache(head_dim, base, 4096, scaling).to(device)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen).to(device)
    widths = [num_q_heads, num_k_heads, num_k_heads]
    qkv = torch.randn(num_tokens, sum(widths) * head_dim, generator=gen).to(dtype).to(device)
    q, k, v = (t.view(num_tokens, -1, head_dim) for t in qkv.split([w * head_dim for w in widths], dim=-1))
    q_ref = apply_rope_reference(q, positions, cache)
    k_ref = apply_rope_reference(k, positions, cache)
    v_before = v.clone()
    rope_inplace(q, k, positions, cache)
    # Half-precision results may differ from the reference by one rounding step.
    rtol = 0 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(q.float(), q_ref.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(k.float(), k_ref.float(), atol=atol, rtol=rtol)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize(
    "num_tokens,num_q_heads,num_k_heads,head_dim,dtype",
    [
        (7, 4, 2, 16, torch.float32),
        (5, 8, 1, 64, torch.float32),
        (3, 6, 3, 32, torch.float16),
        (4, 4, 4, 48, torch.bfloat16),  # half of 24: not a power of two
    ],
)
def test_rope_matches_reference(device, num_tokens, num_q_heads, num_k_heads, head_dim, dtype):
    atol = 1e-5 if dtype == torch.float32 else 1e-2
    _check(num_tokens, num_q_heads, num_k_heads, head_dim, 10000.0, 1.0, dtype, atol, device, seed=head_dim)


def test_rope_with_scaled_cache(device):
    # Gemma3 global layers: another base and linear scaling, passed as another cache.
    _check(6, 4, 1, 32, 1_000_000.0, 8.0, torch.float32, 1e-5, device, seed=1)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_q_heads,num_k_heads,head_dim", [(16, 8, 128), (32, 8, 128), (4, 1, 256), (8, 4, 256)])
def test_rope_full_shapes_on_gpu(num_q_heads, num_k_heads, head_dim):
    _check(3000, num_q_heads, num_k_heads, head_dim, 1_000_000.0, 1.0, torch.bfloat16, 2e-2, torch.device("cuda"), 0)
