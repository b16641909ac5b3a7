"""TritonAttention computes what TorchPagedAttention computes, KV write included, and replays from CUDA graphs."""

import os

import pytest
import torch

# Without a GPU the kernels run under Triton's interpreter, chosen before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from sfllm_core.layers.attention import BatchMetadata, TorchPagedAttention  # noqa: E402
from sfllm_core.layers.triton_attention import TritonAttention  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _step(seq_lens, query_lens, num_heads, num_kv_heads, head_dim, page_size, dtype, device, seed, num_pages=None):
    """A step as ModelRunner builds it: cached prefixes in shuffled pages, new q/k/v, and the metadata."""
    gen = torch.Generator().manual_seed(seed)
    needed = [(n + page_size - 1) // page_size for n in seq_lens]
    num_pages = num_pages or sum(needed) + 2
    free = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()  # page 0 stays unused
    page_table = torch.zeros(len(seq_lens), max(needed) + 1, dtype=torch.int32)
    k_cache = torch.randn(num_pages * page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_pages * page_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    positions, slot_mapping = [], []
    for i, (length, qlen) in enumerate(zip(seq_lens, query_lens, strict=True)):
        pages = torch.tensor([free.pop() for _ in range(needed[i])], dtype=torch.int32)
        page_table[i, : len(pages)] = pages
        pos = torch.arange(length - qlen, length)
        positions.append(pos)
        slot_mapping.append(pages[pos // page_size].long() * page_size + pos % page_size)
    num_tokens = sum(query_lens)
    q, k, v = (
        torch.randn(num_tokens, h, head_dim, generator=gen).to(dtype) for h in (num_heads, num_kv_heads, num_kv_heads)
    )
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    meta = BatchMetadata(
        positions=torch.cat(positions).to(device),
        slot_mapping=torch.cat(slot_mapping).to(device),
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        page_table=page_table.to(device),
        logits_indices=(qsl[1:] - 1).long().to(device),
        page_size=page_size,
        num_decodes=next((i for i, n in enumerate(query_lens) if n != 1), len(query_lens)),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        seq_lens_cpu=list(seq_lens),
        query_lens_cpu=list(query_lens),
    )
    return [t.to(device) for t in (q, k, v, k_cache, v_cache)], meta


def _small_dtype(device: torch.device) -> tuple[torch.dtype, float]:
    # The interpreter's tl.dot mishandles bfloat16, so CPU runs use float32.
    return (torch.bfloat16, 2e-2) if device.type == "cuda" else (torch.float32, 1e-4)


def _compare(tensors, meta, scale, window, atol, call_prepare=True):
    q, k, v, k_cache, v_cache = tensors
    ref_k, ref_v = k_cache.float(), v_cache.float()
    ref = TorchPagedAttention().forward(q.float(), k.float(), v.float(), ref_k, ref_v, meta, scale, window)
    backend = TritonAttention(max_context_length=max(meta.seq_lens_cpu))
    if call_prepare:
        backend.prepare(meta)
    out = backend.forward(q, k, v, k_cache, v_cache, meta, scale, window)
    assert out.shape == q.shape and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=0)
    torch.testing.assert_close(k_cache.float(), ref_k, atol=0, rtol=0)
    torch.testing.assert_close(v_cache.float(), ref_v, atol=0, rtol=0)


@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,page_size,window",
    [(4, 2, 32, 16, None), (8, 1, 16, 1, 9), (4, 4, 64, 64, None), (16, 2, 16, 16, 30)],
)
def test_mixed_decode_and_extend_batch(num_heads, num_kv_heads, head_dim, page_size, window):
    dtype, atol = _small_dtype(DEVICE)
    # Three decodes, then a chunk after a cached prefix, a whole prefill and a one-token extend.
    tensors, meta = _step(
        [40, 7, 64, 50, 23, 12],
        [1, 1, 1, 19, 23, 1],
        num_heads,
        num_kv_heads,
        head_dim,
        page_size,
        dtype,
        DEVICE,
        seed=head_dim + page_size,
    )
    assert meta.num_decodes == 3
    _compare(tensors, meta, head_dim**-0.5, window, atol)


def test_pure_decode_batch_without_prepare():
    dtype, atol = _small_dtype(DEVICE)
    tensors, meta = _step([33, 1, 64, 17], [1, 1, 1, 1], 8, 2, 32, 16, dtype, DEVICE, seed=1)
    _compare(tensors, meta, 0.2, None, atol, call_prepare=False)


def test_pure_prefill_batch():
    dtype, atol = _small_dtype(DEVICE)
    tensors, meta = _step([30, 5, 47], [30, 5, 47], 4, 2, 16, 16, dtype, DEVICE, seed=2)
    assert meta.num_decodes == 0
    _compare(tensors, meta, 0.25, 12, atol)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,window", [(16, 8, 128, None), (4, 1, 256, 512)])
def test_mixed_batch_full_shapes_on_gpu(num_heads, num_kv_heads, head_dim, window):
    tensors, meta = _step(
        [4000, 17, 8192, 2100, 600],
        [1, 1, 1, 300, 600],
        num_heads,
        num_kv_heads,
        head_dim,
        16,
        torch.bfloat16,
        DEVICE,
        seed=head_dim,
    )
    _compare(tensors, meta, head_dim**-0.5, window, 2e-2)


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("window", [None, 256])
def test_decode_replays_from_a_cuda_graph(window):
    # Capture once with static metadata tensors, then replay with other lengths, pages and inputs.
    batch, num_heads, num_kv_heads, head_dim, page_size, num_pages = 8, 16, 8, 128, 16, 4096
    backend = TritonAttention(max_context_length=4096)
    static, static_meta = _step(
        [5] * batch,
        [1] * batch,
        num_heads,
        num_kv_heads,
        head_dim,
        page_size,
        torch.bfloat16,
        DEVICE,
        seed=0,
        num_pages=num_pages,
    )
    q, k, v, k_cache, v_cache = static
    page_table = torch.zeros(batch, 4096 // page_size + 1, dtype=torch.int32, device=DEVICE)
    page_table[:, : static_meta.page_table.shape[1]] = static_meta.page_table
    static_meta.page_table = page_table

    def run() -> torch.Tensor:
        backend.prepare(static_meta)
        return backend.forward(q, k, v, k_cache, v_cache, static_meta, head_dim**-0.5, window)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        run()  # warm-up: compiles the kernels and allocates the split scratch outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()

    for seed, max_len in enumerate([4096, 300, 1500], start=1):
        gen = torch.Generator().manual_seed(seed)
        seq_lens = [max_len, *torch.randint(1, max_len + 1, (batch - 1,), generator=gen).tolist()]
        fresh, meta = _step(
            seq_lens,
            [1] * batch,
            num_heads,
            num_kv_heads,
            head_dim,
            page_size,
            torch.bfloat16,
            DEVICE,
            seed=seed,
            num_pages=num_pages,
        )
        for dst, src in zip((q, k, v, k_cache, v_cache), fresh, strict=True):
            dst.copy_(src)
        page_table.zero_()
        page_table[:, : meta.page_table.shape[1]] = meta.page_table
        static_meta.seq_lens.copy_(meta.seq_lens)
        static_meta.slot_mapping.copy_(meta.slot_mapping)
        static_meta.positions.copy_(meta.positions)
        graph.replay()
        ref_k, ref_v = fresh[3].float(), fresh[4].float()
        ref = TorchPagedAttention().forward(
            fresh[0].float(), fresh[1].float(), fresh[2].float(), ref_k, ref_v, meta, head_dim**-0.5, window
        )
        torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=0)
        torch.testing.assert_close(k_cache.float(), ref_k, atol=0, rtol=0)
