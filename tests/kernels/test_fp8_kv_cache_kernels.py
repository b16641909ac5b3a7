"""The attention kernels read a float8_e4m3fn KV cache as the values it stores, and the KV writes fill one."""

import pytest
import torch

from sfllm_core.kernels.decode_attention import decode_attention
from sfllm_core.kernels.extend_attention import extend_attention
from sfllm_core.kernels.kv_write import kv_write

FP8 = torch.float8_e4m3fn


def _assert_float8_rounding(got: torch.Tensor, want: torch.Tensor, device: torch.device) -> None:
    """got is want rounded to float8 as CUDA rounds it. Triton's interpreter rounds its own way: it
    truncates subnormals and does not carry a rounding up into the exponent (a value due to become a
    power of two comes out smaller), so there a step off, or under a power of two, is allowed."""
    got, want = got.float().cpu(), want.float().cpu()
    if device.type == "cuda":
        assert torch.equal(got, want)
        return
    slip = (torch.frexp(want.abs())[0] == 0.5) & (got.abs() < want.abs()) & (got * want >= 0)
    step = (got - want).abs() <= want.abs() / 8 + 2**-9
    assert (step | slip).all()
    assert (got == want).float().mean() > 0.8


def _fp8_batch(make_paged_batch, seq_lens, query_lens, device, seed):
    """A random paged batch whose caches are float8 (their unused slots NaN, as float8 has one)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter's dot wants float32
    q, k_cache, v_cache, meta = make_paged_batch(seq_lens, query_lens, 8, 2, 32, 16, dtype, device, seed)
    return q, k_cache.to(FP8), v_cache.to(FP8), meta


@pytest.mark.parametrize("window", [None, 9])
def test_decode_reads_a_float8_cache(make_paged_batch, reference_attention, poisoned_like, device, window):
    q, k_cache, v_cache, meta = _fp8_batch(make_paged_batch, [5, 40, 17], [1, 1, 1], device, seed=1)
    out = poisoned_like(q)
    decode_attention(q, k_cache, v_cache, meta.page_table, meta.seq_lens, out, 16, 32**-0.5, window, 2)
    # The reference attends over the cache's own float8 values, upcast.
    ref = reference_attention(q, k_cache.float(), v_cache.float(), meta, 32**-0.5, window)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=2e-2 if device.type == "cuda" else 1e-4, rtol=0)


def test_extend_reads_a_float8_cache(make_paged_batch, reference_attention, poisoned_like, device):
    q, k_cache, v_cache, meta = _fp8_batch(make_paged_batch, [7, 30], [7, 12], device, seed=2)
    out = poisoned_like(q)
    extend_attention(
        q, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, meta.page_table, meta.max_query_len,
        16, 32**-0.5, None,
    )  # fmt: skip
    ref = reference_attention(q, k_cache.float(), v_cache.float(), meta, 32**-0.5, None)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=2e-2 if device.type == "cuda" else 1e-4, rtol=0)


def test_kv_write_rounds_into_a_float8_cache(device):
    gen = torch.Generator().manual_seed(3)
    k, v = torch.randn(6, 2, 32, generator=gen) * 4, torch.randn(6, 2, 32, generator=gen)
    k_cache = torch.zeros(64, 2, 32, dtype=FP8, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = torch.tensor([3, 9, 10, 40, 41, 63], device=device)
    kv_write(k.to(device), v.to(device), k_cache, v_cache, slots)
    for new, cache in ((k, k_cache), (v, v_cache)):
        _assert_float8_rounding(cache[slots], new.to(FP8), device)
        assert cache.float().abs().sum() == cache[slots].float().abs().sum()  # nothing else written


def test_qk_norm_rope_stores_rotated_keys_into_a_float8_cache(device):
    from sfllm_core.kernels.qk_norm_rope import qk_norm_rope
    from sfllm_core.layers.norms import RMSNorm
    from sfllm_core.layers.rotary import RotaryEmbedding

    gen = torch.Generator().manual_seed(4)
    rotary = RotaryEmbedding(32, 1_000_000.0, 256).to(device)
    weight = (torch.randn(32, generator=gen) * 0.5 + 1.0).to(device)
    norm = RMSNorm(32, 1e-6)
    positions = torch.randint(0, 256, (5,), generator=gen).to(device)
    q, k, v = (torch.randn(5, h, 32, generator=gen).to(device) * 3 for h in (4, 2, 2))
    slots = torch.tensor([1, 7, 8, 20, 30], device=device)
    caches = {}
    for dtype in (torch.float32, FP8):
        k_cache = torch.zeros(32, 2, 32, dtype=dtype, device=device)
        v_cache = torch.zeros_like(k_cache)
        qk_norm_rope(q.clone(), k.clone(), positions, rotary.cos_sin_cache, weight, weight, norm.eps, norm.eps, False,
                     v, k_cache, v_cache, slots)  # fmt: skip
        caches[dtype] = (k_cache, v_cache)
    for wide, narrow in zip(caches[torch.float32], caches[FP8]):
        _assert_float8_rounding(narrow[slots], wide[slots].to(FP8), device)
