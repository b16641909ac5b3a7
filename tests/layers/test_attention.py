"""TorchPagedAttention: decodes attended together equal decodes attended one by one."""

import dataclasses

import pytest
import torch

from sfllm_core.layers.attention import BatchMetadata, TorchPagedAttention


@pytest.mark.parametrize("window", [None, 5])
def test_batched_decodes_equal_one_by_one(window):
    g = torch.Generator().manual_seed(0)
    page_size, heads, kv_heads, dim = 4, 4, 2, 16
    decode_lens, extends = [1, 33, 9, 17], [(12, 5), (8, 3)]  # then extends: (context, new tokens)
    order = torch.randperm(63, generator=g).tolist()  # shuffled pages, page 63 never used
    pages, lens = [], decode_lens + [n for n, _ in extends]
    for n in lens:
        count = -(-n // page_size)
        pages.append(order[:count])
        order = order[count:]
    table = torch.tensor([p + [63] * (9 - len(p)) for p in pages], dtype=torch.int32)
    query_lens = [1] * len(decode_lens) + [q for _, q in extends]
    positions = [n - 1 for n in decode_lens] + [p for n, q in extends for p in range(n - q, n)]
    seq_of = [i for i, q in enumerate(query_lens) for _ in range(q)]
    slots = [pages[s][p // page_size] * page_size + p % page_size for s, p in zip(seq_of, positions)]
    tokens = len(positions)
    meta = BatchMetadata(
        positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor([0, 1, 2, 3, 4, 9, tokens], dtype=torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        page_table=table,
        logits_indices=torch.tensor([0, 1, 2, 3, 8, tokens - 1]),
        page_size=page_size,
        num_decodes=len(decode_lens),
        max_query_len=max(query_lens),
        max_seq_len=max(lens),
        seq_lens_cpu=lens,
        query_lens_cpu=query_lens,
    )
    k_cache = torch.randn(64 * page_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(64 * page_size, kv_heads, dim, generator=g)
    q = torch.randn(tokens, heads, dim, generator=g)
    k = torch.randn(tokens, kv_heads, dim, generator=g)
    v = torch.randn(tokens, kv_heads, dim, generator=g)
    backend = TorchPagedAttention()
    together = backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), meta, 0.25, window)
    one_by_one_meta = dataclasses.replace(meta, num_decodes=0, backend_state={})
    one_by_one = backend.forward(q, k, v, k_cache.clone(), v_cache.clone(), one_by_one_meta, 0.25, window)
    assert torch.allclose(together, one_by_one, atol=1e-5)
