"""Fused in-place rotary embedding (rotate-half / NeoX layout) of q and k in one launch."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(X, token, stride_t, stride_h, num_heads, cos, sin, offs, BLOCK_H: tl.constexpr, HALF: tl.constexpr):
    heads = tl.arange(0, BLOCK_H)
    mask = (heads[:, None] < num_heads) & (offs[None, :] < HALF)
    first = X + token * stride_t + heads[:, None] * stride_h + offs[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(X.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(X.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    Positions,
    CosSin,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_c,
    num_q_heads,
    num_k_heads,
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
    _rotate_heads(Q, token, stride_qt, stride_qh, num_q_heads, cos, sin, offs, BLOCK_HQ, HALF)
    _rotate_heads(K, token, stride_kt, stride_kh, num_k_heads, cos, sin, offs, BLOCK_HK, HALF)


def rope_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    """Rotate q [T, Hq, D] and k [T, Hk, D] in place by positions int64 [T].

    q and k may be strided views (e.g. of a fused qkv output) with unit stride in the last dim;
    cos_sin_cache is [max_positions, D] float32, cos in the first half, sin in the second.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_k_heads = k.shape[1]
    assert k.shape[0] == num_tokens and k.shape[2] == head_dim and head_dim % 2 == 0
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_sin_cache.stride(1) == 1
    if num_tokens == 0:
        return
    half = head_dim // 2
    _rope_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos_sin_cache,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos_sin_cache.stride(0),
        num_q_heads,
        num_k_heads,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_k_heads),
        HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
        num_warps=4,
    )
