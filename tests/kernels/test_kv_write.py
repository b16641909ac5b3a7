"""The fused K/V cache write stores each new row in its slot and skips padding slots."""

import pytest
import torch

from sfllm_core.kernels.kv_write import kv_write


@pytest.mark.parametrize(
    "num_heads,head_dim,dtype", [(2, 16, torch.float32), (1, 64, torch.bfloat16), (3, 24, torch.float16)]
)
def test_kv_write_stores_rows_in_slots(device, num_heads, head_dim, dtype):
    gen = torch.Generator().manual_seed(head_dim)
    num_slots, num_tokens = 40, 9
    k_cache = torch.randn(num_slots, num_heads, head_dim, generator=gen).to(dtype).to(device)
    v_cache = torch.randn(num_slots, num_heads, head_dim, generator=gen).to(dtype).to(device)
    # k and v as strided views of a fused kv tensor.
    kv = torch.randn(num_tokens, 2, num_heads, head_dim, generator=gen).to(dtype).to(device)
    k, v = kv[:, 0], kv[:, 1]
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens].to(device)
    slots[4] = -1
    k_expected, v_expected = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    k_expected[slots[keep]] = k[keep]
    v_expected[slots[keep]] = v[keep]
    kv_write(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_expected)
    assert torch.equal(v_cache, v_expected)
