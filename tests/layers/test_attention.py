"""TorchPagedAttention against plain dense causal attention (windows, GQA, prefill, decode), and batched decodes."""

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


def _dense_attention(q, keys, values, q_positions, scale, window):
    """softmax(q k^T * scale + causal/window mask) v for one sequence, in float64, GQA by repeating kv heads.

    q [n, H, D] at positions q_positions; keys/values [L, Hkv, D] at positions 0..L-1. Query head h
    reads kv head h // (H / Hkv).
    """
    group = q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)  # [L, H, D]
    v = values.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale
    k_pos = torch.arange(keys.shape[0])[None, :]
    q_pos = torch.tensor(q_positions)[:, None]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


def _paged_batch_against_dense(seqs, heads, kv_heads, window, seed, dim=8, page_size=4, scale=0.3):
    """Runs TorchPagedAttention.forward over a paged float64 cache; returns (its output, the dense reference).

    seqs: (context length after the step, new tokens) per sequence, decodes (1 new token) first.
    Every slot no sequence owns, and every new token's slot before the store, holds NaN.
    """
    g = torch.Generator().manual_seed(seed)
    num_pages = [-(-n // page_size) for n, _ in seqs]
    total_pages = sum(num_pages) + 4
    order = (torch.randperm(total_pages - 1, generator=g) + 1).tolist()  # page 0 is never handed out
    width = max(num_pages) + 1
    k_cache = torch.full((total_pages * page_size, kv_heads, dim), float("nan"), dtype=torch.float64)
    v_cache = torch.full_like(k_cache, float("nan"))
    table, positions, slots, q_rows, k_new, v_new, expected = [], [], [], [], [], [], []
    for (length, new), count in zip(seqs, num_pages, strict=True):
        pages = [order.pop() for _ in range(count)]
        table.append(pages + [0] * (width - count))
        seq_slots = torch.tensor([pages[p // page_size] * page_size + p % page_size for p in range(length)])
        keys = torch.randn(length, kv_heads, dim, generator=g, dtype=torch.float64)
        values = torch.randn(length, kv_heads, dim, generator=g, dtype=torch.float64)
        cached = length - new
        k_cache[seq_slots[:cached]] = keys[:cached]  # the context; the new tokens' K/V come with the call
        v_cache[seq_slots[:cached]] = values[:cached]
        q = torch.randn(new, heads, dim, generator=g, dtype=torch.float64)
        q_pos = list(range(cached, length))
        q_rows.append(q)
        k_new.append(keys[cached:])
        v_new.append(values[cached:])
        positions += q_pos
        slots += seq_slots[cached:].tolist()
        expected.append(_dense_attention(q, keys, values, q_pos, scale, window))
    query_lens = [new for _, new in seqs]
    lens = [n for n, _ in seqs]
    starts = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    num_decodes = 0
    while num_decodes < len(seqs) and query_lens[num_decodes] == 1:
        num_decodes += 1
    meta = BatchMetadata(
        positions=torch.tensor(positions),
        slot_mapping=torch.tensor(slots),
        query_start_loc=starts,
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        page_table=torch.tensor(table, dtype=torch.int32),
        logits_indices=(starts[1:] - 1).long(),
        page_size=page_size,
        num_decodes=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(lens),
        seq_lens_cpu=lens,
        query_lens_cpu=query_lens,
    )
    out = TorchPagedAttention().forward(
        torch.cat(q_rows), torch.cat(k_new), torch.cat(v_new), k_cache, v_cache, meta, scale, window
    )
    return out, torch.cat(expected)


BATCHES = {
    # Several tokens per sequence: whole prompts (no cache) and chunks continuing a cached context.
    "prefill": [(7, 7), (2, 2), (13, 5), (23, 9), (10, 3)],
    # One new token over a longer context: several decodes (attended together), and a single one.
    "decode": [(21, 1), (1, 1), (34, 1), (9, 1), (17, 1)],
    "one-decode": [(29, 1)],
    # Decodes first, then extends, as the runner lays a mixed step out.
    "mixed": [(26, 1), (5, 1), (11, 4), (19, 19)],
}


@pytest.mark.parametrize("window", [None, 1, 3, 6, 40], ids=lambda w: f"window{w}")
@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (8, 1)], ids=["mha", "gqa3", "gqa8"])
@pytest.mark.parametrize("batch", list(BATCHES))
def test_paged_attention_equals_dense_causal_attention(batch, heads, kv_heads, window):
    out, expected = _paged_batch_against_dense(
        BATCHES[batch], heads, kv_heads, window, seed=heads * 100 + (window or 0)
    )
    assert not out.isnan().any()
    torch.testing.assert_close(out, expected, atol=1e-10, rtol=0)
