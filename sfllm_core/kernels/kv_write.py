"""Store new K and V rows into their paged-cache slots in one launch (instead of two index_copy_)."""

import torch
import triton
import triton.language as tl

from sfllm_core.kernels.pdl import pdl_launch


@triton.jit
def _kv_write_kernel(
    K,
    V,
    KCache,
    VCache,
    Slots,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kct,
    stride_kch,
    stride_vct,
    stride_vch,
    num_heads,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    slot = tl.load(Slots + token)
    # Padding rows of a captured batch carry slot -1: they own no cache memory.
    if slot < 0:
        return
    heads = tl.arange(0, BLOCK_H)[:, None]
    offs_d = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < num_heads) & (offs_d < HEAD_DIM)
    k = tl.load(K + token * stride_kt + heads * stride_kh + offs_d, mask=mask)
    v = tl.load(V + token * stride_vt + heads * stride_vh + offs_d, mask=mask)
    tl.store(KCache + slot * stride_kct + heads * stride_kch + offs_d, k.to(KCache.dtype.element_ty), mask=mask)
    tl.store(VCache + slot * stride_vct + heads * stride_vch + offs_d, v.to(VCache.dtype.element_ty), mask=mask)


def kv_write(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Write k/v [T, Hkv, D] (strided views allowed) to cache rows slots int64 [T]; slot < 0 is skipped."""
    num_tokens, num_heads, head_dim = k.shape
    assert v.shape == k.shape and k.stride(2) == 1 and v.stride(2) == 1
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    if num_tokens == 0:
        return
    _kv_write_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slots,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        num_heads,
        BLOCK_H=triton.next_power_of_2(num_heads),
        HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
        **pdl_launch(k.device),
    )
