"""Paged-KV extend (prefill) attention for a ragged batch of sequences.

The new tokens of sequence i are rows [query_start_loc[i], query_start_loc[i+1]) of q, at the last
positions of its context; their K/V are already in the cache, so every key is read from the pages.
A token attends to the cached prefix and causally to the new tokens, within the sliding window if any.

One program handles a block of rows for one (sequence, kv head); a row is a (token, query head)
pair of that kv head's GQA group, so each K/V block is loaded once for the whole group.
"""

import torch
import triton
import triton.language as tl

from sfllm_core.kernels.pdl import pdl_launch

_LOG2E = 1.4426950408889634

# What changes from step to step is kept out of Triton's specialization, which would otherwise compile
# a new variant (about a second, stalling every stream) the first time a serving batch mixes its
# sequences differently: the metadata are slices starting after the batch's decodes (so their
# alignment varies) and the page table is as wide as the step's longest context.
_VARYING = {
    "do_not_specialize": ["stride_pt"],
    "do_not_specialize_on_alignment": ["QueryStartLoc", "SeqLens", "PageTable"],
}


@triton.jit(**_VARYING)
def _extend_kernel(
    Q,
    K,
    V,
    Out,
    QueryStartLoc,
    SeqLens,
    PageTable,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_pt,
    qk_scale,
    window,
    USE_WINDOW: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_R: tl.constexpr,
    TOKENS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    block = tl.program_id(2)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    q_start = tl.load(QueryStartLoc + seq)
    q_len = tl.load(QueryStartLoc + seq + 1) - q_start
    first = block * TOKENS
    # The grid is sized for the longest sequence; shorter ones have nothing in this block.
    if first >= q_len:
        return
    seq_len = tl.load(SeqLens + seq)
    prefix = seq_len - q_len

    offs_r = tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, HEAD_DIM)
    tok = first + offs_r // GROUP
    heads = kv_head * GROUP + offs_r % GROUP
    row_mask = (offs_r < TOKENS * GROUP) & (tok < q_len)
    q_pos = prefix + tok
    rows = (q_start + tok).to(tl.int64)
    q = tl.load(
        Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=row_mask[:, None], other=0.0
    )

    # Keys any row of this block can see: up to its last token, from the window of its first.
    hi = prefix + tl.minimum(first + TOKENS, q_len)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(prefix + first - window + 1, 0)

    m_i = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, HEAD_DIM], dtype=tl.float32)
    pages = PageTable + seq.to(tl.int64) * stride_pt
    for start_n in range(lo, hi, BLOCK_N):
        pos = start_n + tl.arange(0, BLOCK_N)
        pos_mask = pos < hi
        page = tl.load(pages + pos // PAGE_SIZE, mask=pos_mask, other=0)
        slot = page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
        k = tl.load(
            K + slot[:, None] * stride_kt + kv_head * stride_kh + offs_d[None, :], mask=pos_mask[:, None], other=0.0
        )
        s = tl.dot(q, tl.trans(k.to(q.dtype))) * qk_scale
        visible = pos_mask[None, :] & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible &= pos[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
        # A row may see nothing in this block (window or causal edge): keep its exponent finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        v = tl.load(
            V + slot[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=pos_mask[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_ptr = Out + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(out_ptr, o.to(Out.dtype.element_ty), mask=row_mask[:, None])


def _launch_config(head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_R rows, BLOCK_N keys, num_warps, num_stages)."""
    if device.type != "cuda":
        return 16, 16, 4, 1  # the interpreter: short test contexts still span several blocks
    return (64, 64, 4, 3) if head_dim <= 128 else (64, 32, 4, 2)


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    page_table: torch.Tensor,
    max_query_len: int,
    page_size: int,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """Attend the new tokens of each sequence over its paged context; writes their rows of out.

    q/out: [T, Hq, D], rows indexed by query_start_loc (int32 [N+1], absolute row offsets, so it may
    be a slice of a larger batch's); seq_lens int32 [N]; page_table int32 [N, max_pages];
    max_query_len bounds query_start_loc[i+1] - query_start_loc[i] and sizes the grid.
    """
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    num_seqs = seq_lens.shape[0]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert page_size >= 1 and page_size & (page_size - 1) == 0, "page_size must be a power of two"
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    if num_seqs == 0 or max_query_len == 0:
        return out
    group = num_heads // num_kv_heads
    block_r, block_n, num_warps, num_stages = _launch_config(head_dim, q.device)
    block_r = max(block_r, triton.next_power_of_2(group))
    tokens = block_r // group
    grid = (num_seqs, num_kv_heads, triton.cdiv(max_query_len, tokens))
    _extend_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        query_start_loc,
        seq_lens,
        page_table,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        page_table.stride(0),
        scale * _LOG2E,
        sliding_window if sliding_window is not None else 0,
        USE_WINDOW=sliding_window is not None,
        PAGE_SIZE=page_size,
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_R=block_r,
        TOKENS=tokens,
        BLOCK_N=block_n,
        num_warps=num_warps,
        **pdl_launch(q.device),
        num_stages=num_stages,
    )
    return out
