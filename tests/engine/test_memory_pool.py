"""MemoryPool: allocation, reference counts, prefix sharing and eviction."""

import pytest
import torch

from sfllm_core.engine.memory_pool import MemoryPool


def _pool(num_pages=8, page_size=4, prefix=True) -> MemoryPool:
    return MemoryPool(num_pages, page_size, 2, 1, 8, torch.float32, torch.device("cpu"), prefix)


def test_allocate_and_free_account_every_page():
    pool = _pool()
    pages = pool.allocate(5)
    assert len(set(pages)) == 5 and pool.num_used_pages == 5 and pool.usage == 5 / 8
    pool.free(pages[:2])
    assert pool.num_free_pages == 5
    with pytest.raises(RuntimeError):
        pool.allocate(6)
    pool.free(pages[2:])
    assert pool.num_used_pages == 0


def test_prefix_pages_are_shared_by_reference_and_survive_free():
    pool = _pool()
    tokens = list(range(13))  # three full pages and one token
    pages = pool.allocate(4)
    parent = 0
    for i in range(3):
        parent = pool.page_hash(parent, tokens[i * 4 : (i + 1) * 4])
        pool.register_page(pages[i], parent)
    pool.free(pages)
    assert pool.num_used_pages == 0
    matched, hashes = pool.match_prefix(tokens)
    assert matched == pages[:3] and len(hashes) == 3
    assert pool.num_used_pages == 3
    # A prompt that is exactly the cached pages still leaves its last token to compute.
    again, _ = pool.match_prefix(tokens[:12])
    assert again == pages[:2]
    assert pool.ref_counts[pages[0]] == 2
    # A different first page matches nothing.
    assert pool.match_prefix([99] + tokens[1:])[0] == []


def test_reused_pages_lose_their_cached_contents():
    pool = _pool(num_pages=2)
    pages = pool.allocate(1)
    h = pool.page_hash(0, [1, 2, 3, 4])
    pool.register_page(pages[0], h)
    pool.free(pages)
    pool.allocate(2)  # takes the cached page too: its hash must go
    assert pool.match_prefix([1, 2, 3, 4, 5])[0] == []


def test_prefix_caching_off():
    pool = _pool(prefix=False)
    pages = pool.allocate(1)
    pool.register_page(pages[0], 123)
    pool.free(pages)
    assert pool.match_prefix(list(range(9))) == ([], [])
