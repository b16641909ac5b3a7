"""sfllm_core/kernels/cpu_decode_attention.py: one decode token's attention, equal to the grouped-bmm reference."""

import pytest
import torch

from sfllm_core.kernels import cpu_decode_attention
from sfllm_core.layers.attention import TorchPagedAttention

pytestmark = pytest.mark.skipif(not cpu_decode_attention.available(), reason="the CPU kernel does not build here")


@pytest.mark.parametrize("heads,kv_heads,length", [(4, 1, 1), (4, 1, 161), (8, 2, 37), (2, 2, 600)])
def test_slices_and_slot_lists_attend_as_the_reference(heads, kv_heads, length):
    g = torch.Generator().manual_seed(length)
    dim, slots_total = 64, 1024
    k_cache = torch.randn(slots_total, kv_heads, dim, generator=g)
    v_cache = torch.randn(slots_total, kv_heads, dim, generator=g)
    q = torch.randn(heads, dim, generator=g) * 2
    scale = dim**-0.5
    first = 300
    want = TorchPagedAttention._decode_one(q, k_cache[first : first + length], v_cache[first : first + length], scale)
    got = torch.full_like(q, float("nan"))
    cpu_decode_attention.decode_attention(got, q, k_cache, v_cache, None, first, length, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    slots = torch.randperm(slots_total, generator=g)[:length]  # scattered pages: read through the index
    want = TorchPagedAttention._decode_one(q, k_cache[slots], v_cache[slots], scale)
    cpu_decode_attention.decode_attention(got, q, k_cache, v_cache, slots, 0, length, scale)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
