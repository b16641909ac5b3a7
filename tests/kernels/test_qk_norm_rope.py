"""The fused per-head q/k RMSNorm + RoPE kernel matches the norm modules followed by the rotary reference."""

import pytest
import torch

from sfllm_core.kernels.qk_norm_rope import qk_norm_rope
from sfllm_core.layers.norms import GemmaRMSNorm, RMSNorm
from sfllm_core.layers.rotary import RotaryEmbedding, norm_and_rotate

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _check(num_tokens, num_q_heads, num_k_heads, head_dim, gemma, dtype, atol, device, seed, store=False):
    gen = torch.Generator().manual_seed(seed)
    rotary = RotaryEmbedding(head_dim, 1_000_000.0, 4096)
    norm_cls = GemmaRMSNorm if gemma else RMSNorm
    q_norm, k_norm = norm_cls(head_dim, 1e-6), norm_cls(head_dim, 1e-6)
    with torch.no_grad():
        for norm in (q_norm, k_norm):
            norm.weight.copy_(torch.randn(head_dim, generator=gen) * 0.5 + (0.0 if gemma else 1.0))
    q_norm, k_norm = q_norm.to(dtype), k_norm.to(dtype)
    positions = torch.randint(0, 4096, (num_tokens,), generator=gen)
    # q, k, v are views of a fused qkv output whose heads sit in NaN-padded slots: the kernel must
    # read and write only each head's head_dim columns, and leave v alone.
    heads = num_q_heads + 2 * num_k_heads
    qkv = torch.full((num_tokens, heads, head_dim + 8), float("nan"), dtype=dtype)
    qkv[..., :head_dim] = (torch.randn(num_tokens, heads, head_dim, generator=gen) * 3).to(dtype)
    q, k, v = qkv[..., :head_dim].split([num_q_heads, num_k_heads, num_k_heads], dim=1)
    q_ref, k_ref = norm_and_rotate(positions, q, k, q_norm, k_norm, rotary)

    qkv_dev = qkv.to(device)
    q_dev, k_dev, v_dev = qkv_dev[..., :head_dim].split([num_q_heads, num_k_heads, num_k_heads], dim=1)
    cache = {}
    if store:
        # NaN-filled caches; the last token is a padding row (slot -1) that must write nothing.
        num_slots = 2 * num_tokens + 3
        slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
        slots[-1] = -1
        k_cache = torch.full((num_slots, num_k_heads, head_dim), float("nan"), dtype=dtype, device=device)
        v_cache = k_cache.clone()
        cache = dict(v=v_dev, k_cache=k_cache, v_cache=v_cache, slots=slots.to(device))
    qk_norm_rope(
        q_dev,
        k_dev,
        positions.to(device),
        rotary.cos_sin_cache.to(device),
        q_norm.weight.to(device),
        k_norm.weight.to(device),
        q_norm.eps,
        k_norm.eps,
        gemma,
        **cache,
    )
    result = qkv_dev.cpu()
    # Half-precision results may differ from the reference by one rounding step.
    rtol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(result[:, :num_q_heads, :head_dim].float(), q_ref.float(), atol=atol, rtol=rtol)
    k_out = result[:, num_q_heads : num_q_heads + num_k_heads, :head_dim]
    if store:
        assert torch.equal(k_out, k), "with a cache, k itself stays as it was"
        real = slots >= 0
        k_cache, v_cache = cache["k_cache"].cpu(), cache["v_cache"].cpu()
        torch.testing.assert_close(k_cache[slots[real]].float(), k_ref[real].float(), atol=atol, rtol=rtol)
        assert torch.equal(v_cache[slots[real]], v[real])
        untouched = torch.ones(k_cache.shape[0], dtype=torch.bool)
        untouched[slots[real]] = False
        assert k_cache[untouched].isnan().all() and v_cache[untouched].isnan().all()
    else:
        torch.testing.assert_close(k_out.float(), k_ref.float(), atol=atol, rtol=rtol)
    assert torch.equal(result[:, num_q_heads + num_k_heads :, :head_dim], v)
    assert result[..., head_dim:].isnan().all()


@pytest.mark.parametrize("gemma", [False, True], ids=["qwen3", "gemma"])
@pytest.mark.parametrize(
    "num_tokens,num_q_heads,num_k_heads,head_dim,dtype",
    [
        (5, 4, 2, 32, torch.float32),
        (3, 3, 1, 48, torch.float32),  # half of 24: not a power of two; 3 heads: masked head rows
        (4, 4, 4, 16, torch.bfloat16),
    ],
)
@pytest.mark.parametrize("store", [False, True], ids=["in_place", "to_cache"])
def test_qk_norm_rope_matches_reference(device, num_tokens, num_q_heads, num_k_heads, head_dim, dtype, gemma, store):
    atol = 1e-5 if dtype == torch.float32 else 2e-2
    _check(num_tokens, num_q_heads, num_k_heads, head_dim, gemma, dtype, atol, device, seed=head_dim, store=store)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("gemma", [False, True], ids=["qwen3", "gemma"])
@pytest.mark.parametrize("num_q_heads,num_k_heads,head_dim", [(16, 8, 128), (32, 8, 128), (4, 1, 256), (8, 4, 256)])
@pytest.mark.parametrize("store", [False, True], ids=["in_place", "to_cache"])
def test_qk_norm_rope_full_shapes_on_gpu(num_q_heads, num_k_heads, head_dim, gemma, store):
    _check(1000, num_q_heads, num_k_heads, head_dim, gemma, torch.bfloat16, 2e-2, torch.device("cuda"), 0, store)
