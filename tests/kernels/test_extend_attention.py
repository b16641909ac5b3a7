"""The paged extend (prefill) kernel matches the PyTorch reference on random ragged batches."""

import pytest
import torch

from sfllm_core.kernels.extend_attention import extend_attention

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _small_dtype(device: torch.device) -> tuple[torch.dtype, float]:
    # The interpreter's tl.dot mishandles bfloat16, so CPU runs use float32.
    return (torch.bfloat16, 2e-2) if device.type == "cuda" else (torch.float32, 1e-4)


def _check(
    make_paged_batch,
    reference_attention,
    poisoned_like,
    seq_lens,
    query_lens,
    num_heads,
    num_kv_heads,
    head_dim,
    page_size,
    window,
    dtype,
    atol,
    device,
    seed,
):
    q, k_cache, v_cache, meta = make_paged_batch(
        seq_lens, query_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, device, seed
    )
    scale = head_dim**-0.5
    out = poisoned_like(q)
    extend_attention(
        q,
        k_cache,
        v_cache,
        out,
        meta.query_start_loc,
        meta.seq_lens,
        meta.page_table,
        meta.max_query_len,
        page_size,
        scale,
        window,
    )
    ref = reference_attention(q, k_cache, v_cache, meta, scale, window)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)


def _ragged(gen: torch.Generator, max_context: int) -> tuple[list[int], list[int]]:
    # A whole prefill, a chunk after a cached prefix, a one-token extend, and a random one.
    seq_lens = [max_context, max_context - 3, 9, int(torch.randint(2, max_context, (1,), generator=gen))]
    query_lens = [max_context, 21, 1, int(torch.randint(1, seq_lens[3] + 1, (1,), generator=gen))]
    return seq_lens, query_lens


# (num_heads, num_kv_heads, head_dim, page_size, sliding_window)
SMALL_CASES = [
    (4, 4, 16, 1, None),
    (4, 2, 32, 16, None),
    (8, 2, 64, 64, None),
    (8, 1, 32, 16, None),
    (4, 4, 16, 16, 5),
    (4, 1, 32, 1, 20),
    (16, 2, 16, 64, 33),
    (6, 2, 16, 16, None),  # a group of 3: rows per block not a multiple of the group
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size,window", SMALL_CASES)
def test_extend_matches_reference(
    make_paged_batch, reference_attention, poisoned_like, device, num_heads, num_kv_heads, head_dim, page_size, window
):
    dtype, atol = _small_dtype(device)
    gen = torch.Generator().manual_seed(head_dim * 100 + page_size + num_heads)
    seq_lens, query_lens = _ragged(gen, 48)
    _check(
        make_paged_batch,
        reference_attention,
        poisoned_like,
        seq_lens,
        query_lens,
        num_heads,
        num_kv_heads,
        head_dim,
        page_size,
        window,
        dtype,
        atol,
        device,
        seed=num_heads + head_dim,
    )


def test_extend_half_precision(make_paged_batch, reference_attention, poisoned_like, device):
    _check(
        make_paged_batch,
        reference_attention,
        poisoned_like,
        [40, 30],
        [40, 12],
        8,
        2,
        64,
        16,
        None,
        torch.float16,
        5e-3,
        device,
        seed=11,
    )


def test_extend_on_a_slice_of_the_batch(make_paged_batch, reference_attention, device):
    # The backend hands the kernel the extend part of a mixed batch: absolute row offsets, untouched decode rows.
    dtype, atol = _small_dtype(device)
    q, k_cache, v_cache, meta = make_paged_batch([30, 12, 40, 25], [1, 1, 17, 25], 4, 2, 32, 16, dtype, device, 2)
    out = torch.full_like(q, float("nan"))
    extend_attention(
        q, k_cache, v_cache, out, meta.query_start_loc[2:], meta.seq_lens[2:], meta.page_table[2:], 25, 16, 0.2, None
    )
    ref = reference_attention(q, k_cache, v_cache, meta, 0.2, None)
    assert out[:2].isnan().all()
    torch.testing.assert_close(out[2:].float(), ref[2:], atol=atol, rtol=0)


def test_extend_reads_strided_query(make_paged_batch, reference_attention, poisoned_like, device):
    dtype, atol = _small_dtype(device)
    q, k_cache, v_cache, meta = make_paged_batch([20, 33], [20, 8], 4, 1, 16, 16, dtype, device, seed=4)
    qkv = torch.randn(q.shape[0], 6, 16, device=device).to(dtype)
    qkv[:, :4] = q
    out = poisoned_like(q)
    extend_attention(
        qkv[:, :4], k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, meta.page_table, 20, 16, 0.25, None
    )
    torch.testing.assert_close(
        out.float(), reference_attention(q, k_cache, v_cache, meta, 0.25, None), atol=atol, rtol=0
    )


# (num_heads, num_kv_heads, head_dim, page_size, sliding_window): Qwen3-0.6B, Qwen3-8B, Gemma3 shapes
GPU_CASES = [
    (16, 8, 128, 16, None),
    (32, 8, 128, 64, None),
    (16, 8, 128, 1, None),
    (4, 1, 256, 16, None),
    (4, 1, 256, 16, 512),
    (8, 4, 256, 64, 1024),
]


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size,window", GPU_CASES)
def test_extend_full_shapes_on_gpu(
    make_paged_batch, reference_attention, poisoned_like, num_heads, num_kv_heads, head_dim, page_size, window
):
    # A long cached prefix with a new chunk, a whole prefill, and short extends.
    seq_lens = [8192, 2048, 700, 65, 3000]
    query_lens = [512, 2048, 1, 64, 129]
    _check(
        make_paged_batch,
        reference_attention,
        poisoned_like,
        seq_lens,
        query_lens,
        num_heads,
        num_kv_heads,
        head_dim,
        page_size,
        window,
        torch.bfloat16,
        2e-2,
        torch.device("cuda"),
        seed=head_dim + page_size,
    )


def _compiled_variants(kernel) -> int:
    # Triton keeps one compiled kernel per specialization in the first item of its per-device cache.
    return len(kernel.device_caches[torch.cuda.current_device()][0])


@pytest.mark.gpu
@requires_cuda
def test_any_mix_of_decodes_and_extends_reuses_one_compiled_kernel(make_paged_batch, reference_attention):
    # Serving mixes a step's decodes and extends in every proportion: the extend part's metadata start
    # at any offset and the page table is as wide as the step's longest context. Each new variant
    # costs a compile of about a second in a serving process (seen on an H200: an 853 ms step).
    from sfllm_core.kernels.extend_attention import _extend_kernel

    device = torch.device("cuda")
    lens = [70, 33, 17, 90, 12, 64, 45, 28]
    q, k_cache, v_cache, meta = make_paged_batch(
        lens, [1, 1, 1, 1, 1, 5, 45, 28], 16, 8, 128, 16, torch.bfloat16, device, 3
    )
    ref = reference_attention(q, k_cache, v_cache, meta, 0.1, None)
    counts = []
    for nd in range(6):  # a slice at every offset mod 4, with page tables of several widths
        for extra in (0, 3, 16 - meta.page_table.shape[1] % 16):
            table = torch.nn.functional.pad(meta.page_table, (0, extra))
            out = torch.full_like(q, float("nan"))
            extend_attention(
                q, k_cache, v_cache, out, meta.query_start_loc[nd:], meta.seq_lens[nd:], table[nd:], 45, 16, 0.1, None
            )
            rows = slice(int(meta.query_start_loc[nd]), None)
            torch.testing.assert_close(out[rows].float(), ref[rows], atol=2e-2, rtol=0)
            counts.append(_compiled_variants(_extend_kernel))
    assert counts[-1] == counts[0], f"compiled variants grew as the mix changed: {counts}"
