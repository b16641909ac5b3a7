"""Paged-KV decode attention: one query token per sequence, split-KV flash decoding.

Stage 1 runs one program per (sequence, kv head, split). It attends the whole GQA group of query
heads that share the kv head, so each K/V page is read once per group, over one chunk of the
sequence's context, and writes a partial (log-sum-exp, normalized accumulator) pair. Stage 2 merges
the splits. With a single split, stage 1 writes the output directly and stage 2 is skipped.

The grid and the split count depend only on host constants (batch size, a fixed split count), and
each sequence's length is read from device memory, so a launch can be captured in a CUDA graph and
replayed for any lengths; the split count only caps how finely one sequence is spread over the GPU.
"""

import torch
import triton
import triton.language as tl

from sfllm_core.kernels.pdl import pdl_launch

# Below this many tokens per split, the per-program setup and the merge outweigh the parallelism.
# The kernel applies it to each sequence's actual length, so a split count sized for the longest
# context a graph may see still gives short sequences few, full splits. On an H200 at batch 1 with
# a few hundred tokens of context, 64 against 256 took 0.07 ms off each FP8 step of Qwen3-8B (36
# layers) and of 0.6B (28), and 32 gained nothing more (docs/PERFORMANCE.md, 2026-12-03).
_MIN_SPLIT_TOKENS = 64
_MAX_SPLITS = 64
# exp2/log2 are the fast hardware paths; scores are kept in log2 units throughout.
_LOG2E = 1.4426950408889634

# Partial results of stage 1, reused across layers and steps (and stable for CUDA graphs).
_scratch: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
_sm_count: dict[int, int] = {}


@triton.jit
def _split_range(
    seq_len,
    window,
    split,
    num_splits,
    min_chunk,
    USE_WINDOW: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Keys a decode query at position seq_len - 1 sees, cut into at most num_splits chunks of
    # whole blocks and at least min_chunk keys; returns this split's [lo, hi) and the chunk count.
    start = 0
    if USE_WINDOW:
        start = tl.maximum(seq_len - window, 0)
    span = seq_len - start
    chunk = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    chunk = tl.maximum(chunk, min_chunk)
    lo = start + split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    num_active = tl.cdiv(span, chunk)
    return lo, hi, num_active


@triton.jit(do_not_specialize=["stride_pt"])  # an eager step's page table is as wide as its longest context
def _decode_stage1(
    Q,
    K,
    V,
    PageTable,
    SeqLens,
    MidO,
    MidLse,
    Out,
    stride_qb,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_pt,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_ob,
    stride_oh,
    qk_scale,
    window,
    num_splits,
    min_chunk,
    USE_WINDOW: tl.constexpr,
    SPLIT: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_H: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SeqLens + seq)
    lo, hi, _ = _split_range(seq_len, window, split, num_splits, min_chunk, USE_WINDOW, BLOCK_N)
    # seq_lens and the page table are step inputs, copied in before the step's first kernel: safe to
    # read before the wait (pdl.py). q and this step's K/V come from the kernel just before.
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, HEAD_DIM)
    head_mask = offs_h < GROUP
    heads = kv_head * GROUP + offs_h
    q = tl.load(Q + seq * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=head_mask[:, None], other=0.0)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEAD_DIM], dtype=tl.float32)
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
        s = tl.where(pos_mask[None, :], s, float("-inf"))
        # Each chunk is non-empty (start_n < hi), so m_new is finite.
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(
            V + slot[:, None] * stride_vt + kv_head * stride_vh + offs_d[None, :], mask=pos_mask[:, None], other=0.0
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new

    # Empty chunks (short or zero-length sequences) leave l_i == 0: write zeros, never NaN.
    safe_l = tl.where(l_i > 0, l_i, 1.0)
    o = acc / safe_l[:, None]
    if not SPLIT:
        out_ptr = Out + seq * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr, o.to(Out.dtype.element_ty), mask=head_mask[:, None])
    else:
        mid = seq * stride_mb + heads * stride_mh + split * stride_ms
        tl.store(MidO + mid[:, None] * HEAD_DIM + offs_d[None, :], o, mask=head_mask[:, None])
        tl.store(MidLse + mid, m_i + tl.log2(safe_l), mask=head_mask)


@triton.jit
def _decode_stage2(
    MidO,
    MidLse,
    SeqLens,
    Out,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_ob,
    stride_oh,
    window,
    num_splits,
    min_chunk,
    USE_WINDOW: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(SeqLens + seq)
    _, _, num_active = _split_range(seq_len, window, 0, num_splits, min_chunk, USE_WINDOW, BLOCK_N)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()

    offs_d = tl.arange(0, HEAD_DIM)
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([HEAD_DIM], dtype=tl.float32)
    base = seq * stride_mb + head * stride_mh
    # Only the first num_active splits got keys; the rest hold stale data from earlier launches.
    for split in range(0, num_active):
        lse = tl.load(MidLse + base + split * stride_ms)
        o = tl.load(MidO + (base + split * stride_ms) * HEAD_DIM + offs_d)
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha + o * w
        l_i = l_i * alpha + w
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)
    tl.store(Out + seq * stride_ob + head * stride_oh + offs_d, out.to(Out.dtype.element_ty))


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count[index]


def decode_num_splits(batch_size: int, num_kv_heads: int, max_context_length: int, device: torch.device) -> int:
    """Split count that fills the GPU for this batch; depends only on host constants."""
    # About two waves of programs; more splits only add merge work.
    wanted = triton.cdiv(2 * _num_sms(device), max(1, batch_size * num_kv_heads))
    useful = triton.cdiv(max(1, max_context_length), _MIN_SPLIT_TOKENS)
    return max(1, min(wanted, useful, _MAX_SPLITS))


# Budget for stage 1's K and V tiles over its pipeline stages, counted as 2 * BLOCK_N * head_dim *
# element size * stages; Triton's own shared-memory use measured at about 0.55 of this (an H200
# allows 227 KB per block: float32 K/V at head dim 256 with 128-key blocks needed 280 KB).
_TILE_BYTES = 288 << 10


def _launch_config(head_dim: int, num_programs: int, device: torch.device, elem_size: int = 2) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) of stage 1, from host constants only."""
    if device.type != "cuda":
        return 16, 4, 1  # the interpreter: small blocks so short test contexts still span several
    if num_programs < _num_sms(device):
        # Under one wave each program's chain of dependent loads is the critical path: fewer, larger blocks.
        block_n, num_warps, num_stages = 128, 4, 2
    else:
        block_n, num_warps, num_stages = (64, 4, 3) if head_dim <= 128 else (32, 4, 2)
    while block_n > 16 and 2 * block_n * head_dim * elem_size * num_stages > _TILE_BYTES:
        block_n //= 2
    return block_n, num_warps, num_stages


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    page_size: int,
    scale: float,
    sliding_window: int | None,
    num_splits: int,
    min_split_tokens: int | None = None,
) -> torch.Tensor:
    """Attend q [B, Hq, D] (one token per sequence, at position seq_lens - 1) over the paged cache.

    k_cache/v_cache: [num_slots, Hkv, D]; page_table int32 [B, max_pages]; seq_lens int32 [B];
    writes and returns out [B, Hq, D] (zeros for a sequence of length 0). num_splits must be fixed for a
    captured graph (see decode_num_splits); min_split_tokens overrides the smallest chunk a split takes.
    """
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    assert num_heads % num_kv_heads == 0, "query heads must be a multiple of kv heads"
    assert head_dim >= 16 and head_dim & (head_dim - 1) == 0, "head_dim must be a power of two >= 16"
    assert page_size >= 1 and page_size & (page_size - 1) == 0, "page_size must be a power of two"
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.stride(2) == 1 and v_cache.stride(2) == 1
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    block_n, num_warps, num_stages = _launch_config(
        head_dim, batch * num_kv_heads * num_splits, q.device, k_cache.element_size()
    )
    if min_split_tokens is None:
        min_split_tokens = _MIN_SPLIT_TOKENS if q.is_cuda else block_n
    min_chunk = triton.cdiv(min_split_tokens, block_n) * block_n
    use_window = sliding_window is not None
    window = sliding_window if use_window else 0

    key = (q.device, batch, num_heads, num_splits, head_dim)
    if num_splits > 1 and key not in _scratch:
        _scratch[key] = (
            torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device),
            torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device),
        )
    mid_o, mid_lse = _scratch[key] if num_splits > 1 else (out, out)  # stage 1 ignores mid when not split

    # Strides of mid in [B, Hq, S] units; the kernel scales by head_dim for mid_o.
    stride_mb, stride_mh, stride_ms = num_heads * num_splits, num_splits, 1
    _decode_stage1[(batch, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        page_table,
        seq_lens,
        mid_o,
        mid_lse,
        out,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        page_table.stride(0),
        stride_mb,
        stride_mh,
        stride_ms,
        out.stride(0),
        out.stride(1),
        scale * _LOG2E,
        window,
        num_splits,
        min_chunk,
        USE_WINDOW=use_window,
        SPLIT=num_splits > 1,
        PAGE_SIZE=page_size,
        GROUP=group,
        BLOCK_H=block_h,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        **pdl_launch(q.device),
    )
    if num_splits > 1:
        _decode_stage2[(batch, num_heads)](
            mid_o,
            mid_lse,
            seq_lens,
            out,
            stride_mb,
            stride_mh,
            stride_ms,
            out.stride(0),
            out.stride(1),
            window,
            num_splits,
            min_chunk,
            USE_WINDOW=use_window,
            HEAD_DIM=head_dim,
            BLOCK_N=block_n,
            num_warps=4,
            **pdl_launch(q.device),
        )
    return out
