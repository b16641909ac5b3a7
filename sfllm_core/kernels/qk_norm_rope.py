"""Per-head RMSNorm of q and k fused with their rotary embedding (NeoX layout), in place, one launch."""

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_rotate_heads(
    X,
    W,
    token,
    stride_t,
    stride_h,
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
    tl.store(first, (y1 * cos - y2 * sin).to(dtype), mask=mask)
    tl.store(first + HALF, (y2 * cos + y1 * sin).to(dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    Q,
    K,
    QWeight,
    KWeight,
    Positions,
    CosSin,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_c,
    num_q_heads,
    num_k_heads,
    q_eps,
    k_eps,
    GEMMA: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(Positions + token)
    offs = tl.arange(0, BLOCK_HALF)
    row = CosSin + pos * stride_c
    cos = tl.load(row + offs, mask=offs < HALF, other=0.0)[None, :]
    sin = tl.load(row + HALF + offs, mask=offs < HALF, other=0.0)[None, :]
    _norm_rotate_heads(
        Q, QWeight, token, stride_qt, stride_qh, num_q_heads, q_eps, cos, sin, offs, GEMMA, BLOCK_HQ, HALF
    )
    _norm_rotate_heads(
        K, KWeight, token, stride_kt, stride_kh, num_k_heads, k_eps, cos, sin, offs, GEMMA, BLOCK_HK, HALF
    )


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
) -> None:
    """Normalise every head of q [T, Hq, D] and k [T, Hk, D] in place, then rotate them by positions.

    gemma picks the norm flavour (see rmsnorm); q and k may be strided views of a fused qkv output
    with unit stride in the last dim; cos_sin_cache is [max_positions, D] float32, cos then sin.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    assert q_weight.shape == (head_dim,) and k_weight.shape == (head_dim,)
    assert q_weight.is_contiguous() and k_weight.is_contiguous()
    if num_tokens == 0:
        return
    half = head_dim // 2
    _qk_norm_rope_kernel[(num_tokens,)](
        q,
        k,
        q_weight,
        k_weight,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_k_heads,
        q_eps,
        k_eps,
        GEMMA=gemma,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_k_heads),
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
