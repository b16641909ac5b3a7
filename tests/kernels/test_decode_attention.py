"""The split-KV paged decode kernel matches the PyTorch reference on random paged batches."""

import pytest
import torch

from sfllm_core.kernels.decode_attention import _MIN_SPLIT_TOKENS, decode_attention, decode_num_splits

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _small_dtype(device: torch.device) -> tuple[torch.dtype, float]:
    # The interpreter's tl.dot mishandles bfloat16, so CPU runs use float32.
    return (torch.bfloat16, 2e-2) if device.type == "cuda" else (torch.float32, 1e-4)


def _check(
    make_paged_batch,
    reference_attention,
    poisoned_like,
    seq_lens,
    num_heads,
    num_kv_heads,
    head_dim,
    page_size,
    window,
    num_splits,
    dtype,
    atol,
    device,
    seed,
    min_split_tokens=None,
):
    q, k_cache, v_cache, meta = make_paged_batch(
        seq_lens, [1] * len(seq_lens), num_heads, num_kv_heads, head_dim, page_size, dtype, device, seed
    )
    scale = head_dim**-0.5
    out = poisoned_like(q)
    decode_attention(
        q, k_cache, v_cache, meta.page_table, meta.seq_lens, out, page_size, scale, window, num_splits, min_split_tokens
    )
    ref = reference_attention(q, k_cache, v_cache, meta, scale, window)
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)


# (num_heads, num_kv_heads, head_dim, page_size, sliding_window, num_splits)
SMALL_CASES = [
    (4, 4, 16, 1, None, 1),
    (4, 2, 32, 16, None, 3),
    (8, 2, 64, 64, None, 4),
    (8, 1, 32, 16, None, 2),
    (4, 4, 32, 1, 7, 3),
    (4, 1, 16, 16, 20, 4),
    (16, 2, 16, 64, 40, 2),
    (8, 4, 64, 16, 33, 1),
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,page_size,window,num_splits", SMALL_CASES)
def test_decode_matches_reference(
    make_paged_batch,
    reference_attention,
    poisoned_like,
    device,
    num_heads,
    num_kv_heads,
    head_dim,
    page_size,
    window,
    num_splits,
):
    dtype, atol = _small_dtype(device)
    gen = torch.Generator().manual_seed(head_dim * 1000 + page_size + num_splits)
    # Always a full-length and a one-token sequence, plus random ones in between.
    seq_lens = [64, 1, *torch.randint(2, 64, (3,), generator=gen).tolist()]
    _check(
        make_paged_batch,
        reference_attention,
        poisoned_like,
        seq_lens,
        num_heads,
        num_kv_heads,
        head_dim,
        page_size,
        window,
        num_splits,
        dtype,
        atol,
        device,
        seed=len(seq_lens) + head_dim,
    )


def test_decode_half_precision(make_paged_batch, reference_attention, poisoned_like, device):
    _check(
        make_paged_batch,
        reference_attention,
        poisoned_like,
        [50, 17, 3],
        8,
        2,
        64,
        16,
        None,
        3,
        torch.float16,
        5e-3,
        device,
        seed=7,
    )


def test_decode_reads_strided_query_and_writes_strided_output(make_paged_batch, reference_attention, device):
    dtype, atol = _small_dtype(device)
    q, k_cache, v_cache, meta = make_paged_batch([40, 9, 26], [1, 1, 1], 4, 2, 32, 16, dtype, device, seed=3)
    # q as a slice of a fused qkv projection output; out as a slice of a wider buffer.
    qkv = torch.randn(3, 8, 32, device=device).to(dtype)
    qkv[:, :4] = q
    wide = torch.full((3, 6, 32), float("nan"), dtype=dtype, device=device)
    decode_attention(qkv[:, :4], k_cache, v_cache, meta.page_table, meta.seq_lens, wide[:, 1:5], 16, 0.3, None, 2)
    ref = reference_attention(q, k_cache, v_cache, meta, 0.3, None)
    torch.testing.assert_close(wide[:, 1:5].float(), ref, atol=atol, rtol=0)
    assert wide[:, 0].isnan().all() and wide[:, 5].isnan().all()


def test_decode_buffers_reused_across_lengths(make_paged_batch, reference_attention, poisoned_like, device):
    # A replayed graph reuses the split scratch: shorter contexts must ignore the longer ones' leftovers.
    dtype, atol = _small_dtype(device)
    for seed, seq_lens in enumerate([[64, 60, 63], [5, 1, 17], [33, 64, 2]]):
        _check(
            make_paged_batch,
            reference_attention,
            poisoned_like,
            seq_lens,
            4,
            2,
            16,
            16,
            None,
            4,
            dtype,
            atol,
            device,
            seed=seed,
            min_split_tokens=16,
        )


def test_decode_empty_sequence_gives_zeros(make_paged_batch, device):
    # Padding rows of a captured batch may have no context; they must come out finite.
    dtype, _ = _small_dtype(device)
    q, k_cache, v_cache, meta = make_paged_batch([20, 1], [1, 1], 4, 2, 16, 16, dtype, device, seed=5)
    seq_lens = torch.tensor([20, 0], dtype=torch.int32, device=device)
    for num_splits in (1, 3):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, k_cache, v_cache, meta.page_table, seq_lens, out, 16, 0.25, None, num_splits)
        assert not out[0].isnan().any()
        assert (out[1] == 0).all()


def _dense_decode(q, k_cache, v_cache, page_table, seq_lens, page_size, scale, window):
    """Plain float64 softmax(q k^T * scale) v of each sequence's one query (at position len - 1) over its keys."""
    group = q.shape[1] // k_cache.shape[1]
    out = []
    for i, length in enumerate(seq_lens):
        pos = torch.arange(length)
        slots = page_table[i, pos // page_size].long() * page_size + pos % page_size
        keys = k_cache[slots].double().repeat_interleave(group, dim=1)  # [L, Hq, D]: head h reads kv head h // group
        values = v_cache[slots].double().repeat_interleave(group, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[i].double(), keys) * scale
        if window is not None:
            scores[:, : max(0, length - window)] = float("-inf")
        out.append(torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), values))
    return torch.stack(out)


def test_num_splits_depends_only_on_host_constants():
    cpu = torch.device("cpu")
    assert decode_num_splits(1, 8, 1, cpu) == 1
    assert decode_num_splits(1, 1, 32768, cpu) > 1
    assert decode_num_splits(256, 8, 32768, cpu) == 1
    # No split shorter than the minimum chunk: a shorter context is never split, 4 chunks' worth at most 4 ways.
    assert decode_num_splits(1, 1, _MIN_SPLIT_TOKENS - 1, cpu) == 1
    assert decode_num_splits(1, 1, 4 * _MIN_SPLIT_TOKENS, cpu) == 4


@pytest.mark.parametrize("window", [None, 100])
def test_split_count_from_host_constants_serves_every_length_up_to_the_context(
    make_paged_batch, poisoned_like, device, window
):
    # A captured decode graph fixes the split count from host constants (batch, kv heads, the longest
    # context) and replays it with each step's lengths, read from device memory: the same buffers,
    # the lengths rewritten in place, must give plain attention over each sequence's keys every time.
    batch, num_heads, num_kv_heads, head_dim, page_size = 2, 4, 1, 16, 16
    num_splits = decode_num_splits(batch, num_kv_heads, 1024, device)
    assert num_splits > 1
    dtype, atol = _small_dtype(device)
    q, k_cache, v_cache, meta = make_paged_batch(
        [320] * batch, [1] * batch, num_heads, num_kv_heads, head_dim, page_size, dtype, device, seed=11
    )
    scale = head_dim**-0.5
    seq_lens, out = meta.seq_lens, poisoned_like(q)
    for lengths in ([320, 320], [1, 300], [17, 5], [256, 129], [320, 2]):
        seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        out.fill_(float("nan"))
        decode_attention(q, k_cache, v_cache, meta.page_table, seq_lens, out, page_size, scale, window, num_splits)
        expected = _dense_decode(
            q.cpu(), k_cache.cpu(), v_cache.cpu(), meta.page_table.cpu(), lengths, page_size, scale, window
        )
        torch.testing.assert_close(
            out.cpu().double(), expected, atol=atol, rtol=0, msg=lambda m, n=lengths: f"{n}: {m}"
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
@pytest.mark.parametrize("batch,max_context", [(1, 8192), (1, 1024), (7, 3000), (64, 1024)])
def test_decode_full_shapes_on_gpu(
    make_paged_batch,
    reference_attention,
    poisoned_like,
    num_heads,
    num_kv_heads,
    head_dim,
    page_size,
    window,
    batch,
    max_context,
):
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(batch + head_dim + page_size)
    seq_lens = [max_context, *torch.randint(1, max_context + 1, (batch - 1,), generator=gen).tolist()]
    num_splits = decode_num_splits(batch, num_kv_heads, max_context, device)
    _check(
        make_paged_batch,
        reference_attention,
        poisoned_like,
        seq_lens,
        num_heads,
        num_kv_heads,
        head_dim,
        page_size,
        window,
        num_splits,
        torch.bfloat16,
        2e-2,
        device,
        seed=batch,
    )


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("head_dim", [128, 256])
@pytest.mark.parametrize("batch", [1, 64])
def test_decode_float32_cache_fits_shared_memory_on_gpu(
    make_paged_batch, reference_attention, poisoned_like, head_dim, batch
):
    # float32 engines (the bit-exact comparisons) double the K/V tile bytes: at head dim 256 the
    # few-program config once asked for 280 KB of shared memory and failed to launch.
    device = torch.device("cuda")
    seq_lens = [700 + 37 * i for i in range(batch)]
    num_splits = decode_num_splits(batch, 1, 4096, device)
    _check(
        make_paged_batch,
        reference_attention,
        poisoned_like,
        seq_lens,
        4,
        1,
        head_dim,
        16,
        None,
        num_splits,
        torch.float32,
        2e-3,  # tl.dot takes float32 operands as TF32 on the GPU (10-bit mantissa)
        device,
        seed=head_dim,
    )
