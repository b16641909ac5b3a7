"""Per-head RMSNorm of q and k fused with their rotary embedding (NeoX layout), one launch.

q is rotated in place. k is rotated in place too, or, given the paged cache, written straight to
its slot together with v: the decode step's KV write then costs no launch of its own.
"""

import torch
import triton
import triton.language as tl

from sfllm_core.kernels.pdl import pdl_launch


@triton.jit
def _norm_rotate_heads(
    X,
    W,
    Dest,
    token,
    stride_t,
    stride_h,
    stride_dest_h,
    num_heads,
    eps,
    cos,
    sin,
    offs,
    GEMMA: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    half_mask = offs < HALF
    mask = (heads[:, None] < num_heads) & half_mask[None, :]
    dtype = X.dtype.element_ty
    first = X + token * stride_t + heads[:, None] * stride_h + offs[None, :]
    # Each head is read as its two rotation halves; the norm sums over both.
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF) + eps)[:, None]
    w1 = tl.load(W + offs, mask=half_mask, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(W + HALF + offs, mask=half_mask, other=0.0).to(tl.float32)[None, :]
    # Round where the eager model does: the norm's output is in the activation dtype before RoPE.
    if GEMMA:
        y1 = ((x1 * rstd) * (1.0 + w1)).to(dtype).to(tl.float32)
        y2 = ((x2 * rstd) * (1.0 + w2)).to(dtype).to(tl.float32)
    else:
        y1 = (w1 * (x1 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        y2 = (w2 * (x2 * rstd).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    dest = Dest + heads[:, None] * stride_dest_h + offs[None, :]
    out_dtype = Dest.dtype.element_ty
    tl.store(dest, (y1 * cos - y2 * sin).to(dtype).to(out_dtype), mask=mask)
    tl.store(dest + HALF, (y2 * cos + y1 * sin).to(dtype).to(out_dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    Q,
    K,
    V,
    KCache,
    VCache,
    Slots,
    QWeight,
    KWeight,
    Positions,
    CosSin,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kct,
    stride_kch,
    stride_vct,
    stride_vch,
    stride_c,
    num_q_heads,
    num_k_heads,
    q_eps,
    k_eps,
    GEMMA: tl.constexpr,
    STORE_KV: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pos = tl.load(Positions + token)
    row = CosSin + pos * stride_c
    cos = tl.load(row + offs, mask=offs < HALF, other=0.0)[None, :]
    sin = tl.load(row + HALF + offs, mask=offs < HALF, other=0.0)[None, :]
    q = Q + token * stride_qt
    _norm_rotate_heads(
        Q, QWeight, q, token, stride_qt, stride_qh, stride_qh, num_q_heads, q_eps, cos, sin, offs, GEMMA, BLOCK_HQ, HALF
    )
    if not STORE_KV:
        k = K + token * stride_kt
        _norm_rotate_heads(
            K,
            KWeight,
            k,
            token,
            stride_kt,
            stride_kh,
            stride_kh,
            num_k_heads,
            k_eps,
            cos,
            sin,
            offs,
            GEMMA,
            BLOCK_HK,
            HALF,
        )
    else:
        slot = tl.load(Slots + token)
        # Padding rows of a captured batch carry slot -1: they own no cache memory.
        if slot >= 0:
            k_dest = KCache + slot * stride_kct
            _norm_rotate_heads(
                K,
                KWeight,
                k_dest,
                token,
                stride_kt,
                stride_kh,
                stride_kch,
                num_k_heads,
                k_eps,
                cos,
                sin,
                offs,
                GEMMA,
                BLOCK_HK,
                HALF,
            )
            heads = tl.arange(0, BLOCK_HK)[:, None]
            mask = (heads < num_k_heads) & (offs[None, :] < HALF)
            v_src = V + token * stride_vt + heads * stride_vh + offs[None, :]
            v_dest = VCache + slot * stride_vct + heads * stride_vch + offs[None, :]
            out_dtype = VCache.dtype.element_ty
            tl.store(v_dest, tl.load(v_src, mask=mask).to(out_dtype), mask=mask)
            tl.store(v_dest + HALF, tl.load(v_src + HALF, mask=mask).to(out_dtype), mask=mask)


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    q_eps: float,
    k_eps: float,
    gemma: bool,
    v: torch.Tensor | None = None,
    k_cache: torch.Tensor | None = None,
    v_cache: torch.Tensor | None = None,
    slots: torch.Tensor | None = None,
) -> None:
    """Normalise every head of q [T, Hq, D] and k [T, Hk, D], then rotate them by positions.

    gemma picks the norm flavour (see rmsnorm); q, k and v may be strided views of a fused qkv output
    with unit stride in the last dim; cos_sin_cache is [max_positions, D] float32, cos then sin.
    q is rotated in place. Without a cache so is k; with k_cache/v_cache [num_slots, Hk, D] and slots
    int64 [T], the rotated k and v go to those cache rows instead (slot < 0: skipped) and k is left as it was.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    store = k_cache is not None
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    assert q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,)
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    if store:
        assert v is not None and v_cache is not None and slots is not None and v.shape == k.shape
        assert v.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
        assert k_cache.shape[1:] == k.shape[1:] and v_cache.shape[1:] == k.shape[1:]
    else:
        v, k_cache, v_cache, slots = k, k, k, positions  # unused by the kernel
    if num_tokens == 0:
        return
    half = head_dim // 2
    _qk_norm_rope_kernel[(num_tokens,)](
        q,
        k,
        v,
        k_cache,
        v_cache,
        slots,
        q_weight,
        k_weight,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_k_heads,
        q_eps,
        k_eps,
        GEMMA=gemma,
        STORE_KV=store,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_k_heads),
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
        **pdl_launch(q.device),
    )
