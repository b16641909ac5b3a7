"""MemoryPool: allocation, reference counts, prefix sharing and eviction."""

import pytest
import torch

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.engine.memory_pool import MemoryPool
from sfllm_core.sampling_params import SamplingParams


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


def _window_pool(num_pages=12, num_window_pages=6, page_size=4, window=8) -> MemoryPool:
    # Layer 0 is a window layer, layer 1 a full one.
    return MemoryPool(
        num_pages,
        page_size,
        2,
        1,
        8,
        torch.float32,
        torch.device("cpu"),
        True,
        window=window,
        window_layers=frozenset({0}),
        num_window_pages=num_window_pages,
    )


def _register(pool: MemoryPool, pages: list[int], tokens: list[int]) -> None:
    parent = 0
    for i, page in enumerate(pages):
        parent = pool.page_hash(parent, tokens[i * pool.page_size : (i + 1) * pool.page_size])
        pool.register_page(page, parent)


def test_window_layers_get_a_smaller_cache_and_companions_follow_their_pages():
    pool = _window_pool()
    assert pool.kv_caches[0][0].shape[0] == (6 + 1) * 4 and pool.kv_caches[1][0].shape[0] == (12 + 1) * 4
    pages = pool.allocate(5)
    assert pool.num_used_window_pages == 5
    row = pool.window_page_row(pages, 0)
    assert len(set(row)) == 5 and max(row) < 6
    # At 17 computed tokens the next query reads keys from position 10 on: page 2 and later.
    start = pool.window_start(17)
    assert start == 2
    pool.release_window(pages[:start])
    assert pool.num_used_window_pages == 3
    assert pool.window_page_row(pages, start)[:2] == [pool.window_scratch_page] * 2
    with pytest.raises(AssertionError):
        pool.release_window(pages[:1])  # released twice
    pool.free(pages, start)
    assert pool.num_used_pages == 0 and pool.num_used_window_pages == 0


def test_window_allocation_fails_loudly_when_companions_run_out():
    pool = _window_pool(num_pages=12, num_window_pages=3)
    assert pool.num_free_pages == 3  # the scheduler sees the scarcer of the two
    pool.allocate(3)
    assert pool.num_free_pages == 0 and pool.num_used_pages == 3
    with pytest.raises(RuntimeError, match="window pages"):
        pool.allocate(1)


def test_prefix_match_needs_the_companions_of_its_last_window():
    pool = _window_pool()
    tokens = list(range(21))  # five full pages and one token
    pages = pool.allocate(5)
    _register(pool, pages, tokens)
    pool.release_window(pages[:3])  # the sequence moved on: companions of pages 0-2 dropped
    pool.free(pages, 3)
    # A match of all five pages continues at position 20 and needs keys from 13 on: pages 3 and 4.
    matched, _ = pool.match_prefix(tokens)
    assert matched == pages and pool.num_used_window_pages == 2
    pool.free(matched, pool.window_start(20))
    assert pool.num_used_window_pages == 0
    # Evict the companion of page 4 (the oldest free ones go first): the match shrinks to where
    # the window before it is still whole.
    taken = pool.allocate(6)
    assert pages[4] not in taken
    matched, _ = pool.match_prefix(tokens)
    assert len(matched) < 5
    start = pool.window_start(len(matched) * pool.page_size)
    assert all(p in pool._companion for p in matched[start:])


def _step(engine: InferenceEngine, tokens: dict[str, list[int]], reasons: dict[str, str]) -> None:
    """One engine step; each request's tokens and finish reason are collected from its outputs."""
    for out in engine.step():
        tokens.setdefault(out.request_id, []).extend(out.token_ids)
        if out.finished:
            reasons[out.request_id] = out.finish_reason


def _run_to_end(engine: InferenceEngine, tokens: dict[str, list[int]], reasons: dict[str, str]) -> None:
    while engine.has_work():
        _step(engine, tokens, reasons)


@pytest.mark.parametrize("aborted", ["owner", "sharer"])
def test_aborting_one_of_two_requests_sharing_a_prefix_frees_exactly_its_references(qwen3_path, aborted):
    """The owner's prefill publishes four full pages; the sharer takes them by reference; one is aborted mid-decode."""
    page_size, max_tokens = 4, 12
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    shared = torch.randint(3, 384, (4 * page_size,), generator=torch.Generator().manual_seed(3)).tolist()
    prompts = {"owner": shared + [5, 6, 7], "sharer": shared + [9, 10]}
    alone = InferenceEngine(model_path=str(qwen3_path), dtype="float32", device="cpu", enable_prefix_caching=False)
    expected = {rid: alone.generate([prompt], params)[0].token_ids for rid, prompt in prompts.items()}

    engine = InferenceEngine(model_path=str(qwen3_path), dtype="float32", device="cpu", page_size=page_size)
    pool = engine.pool
    assert pool.enable_prefix_caching
    tokens: dict[str, list[int]] = {}
    reasons: dict[str, str] = {}

    def step() -> None:
        _step(engine, tokens, reasons)

    engine.add_request("owner", prompts["owner"], params)
    step()  # the owner's whole prompt: its four full pages are published
    engine.add_request("sharer", prompts["sharer"], params)
    step()
    owner, sharer = engine._seqs["owner"], engine._seqs["sharer"]
    shared_pages = owner.pages[:4]
    assert sharer.num_cached_tokens == 4 * page_size and sharer.pages[:4] == shared_pages
    assert [pool.ref_counts[p] for p in shared_pages] == [2] * 4
    own_pages = {rid: set(seq.pages) - set(shared_pages) for rid, seq in (("owner", owner), ("sharer", sharer))}
    for _ in range(3):
        step()
    assert all(0 < len(tokens[rid]) < max_tokens for rid in prompts), tokens  # both mid-decode

    engine.abort(aborted)
    step()
    survivor = "sharer" if aborted == "owner" else "owner"
    assert reasons == {aborted: "abort"}
    # The survivor still holds the shared pages, once; the aborted one's own pages hold nothing.
    assert [pool.ref_counts[p] for p in shared_pages] == [1] * 4
    assert all(pool.ref_counts[p] == 0 for p in own_pages[aborted])
    assert all(pool.ref_counts[p] == 1 for p in own_pages[survivor])
    assert pool.num_used_pages == len(engine._seqs[survivor].pages)
    _run_to_end(engine, tokens, reasons)

    assert reasons == {aborted: "abort", survivor: "length"}
    assert tokens[survivor] == expected[survivor]
    assert tokens[aborted] == expected[aborted][: len(tokens[aborted])]
    assert pool.ref_counts == [0] * pool.num_pages
    assert pool.num_used_pages == 0 and pool.num_free_pages == pool.num_pages
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine._seqs

    # Free, yet still cached (evictable): the next request with the prefix reuses all four pages.
    engine.add_request("again", prompts[aborted], params)
    again = engine._inbox[-1][1]
    _run_to_end(engine, tokens, reasons)
    assert again.num_cached_tokens == 4 * page_size
    assert tokens["again"] == expected[aborted] and reasons["again"] == "length"
    assert pool.ref_counts == [0] * pool.num_pages and pool.num_used_pages == 0


def test_a_sequences_pages_grow_advance_truncate_and_release_through_the_pool():
    """The pool keeps a sequence's pages, window start and both page-table rows in step."""
    from sfllm_core.engine.request_sequence import RequestSequence

    pool = _window_pool(num_pages=12, num_window_pages=8)
    seq = RequestSequence("s", list(range(30)), SamplingParams())
    pool.grow(seq, 10)  # three pages of four
    assert len(seq.pages) == 3 and pool.num_used_pages == 3 and pool.num_used_window_pages == 3
    assert seq.page_row[:3].tolist() == seq.pages and set(seq.page_row[3:]) == {pool.scratch_page}
    assert seq.window_pages == pool.window_page_row(seq.pages, 0)
    pool.grow(seq, 12)  # still three pages
    assert len(seq.pages) == 3
    seq.num_computed_tokens = 17
    pool.grow(seq, 26)  # seven pages
    pool.advance(seq)  # the next query (position 17) reads keys from 10 on: pages 2 and later
    assert seq.window_start == 2 and pool.num_used_window_pages == 5
    assert seq.window_pages == pool.window_page_row(seq.pages, 2)
    # Rolled back to 18 tokens: pages 5 and 6 (tokens 20-27) and their companions go back.
    dropped = seq.pages[5:]
    pool.truncate(seq, 18)
    assert len(seq.pages) == 5 and all(pool.ref_counts[p] == 0 for p in dropped)
    assert pool.num_used_pages == 5 and pool.num_used_window_pages == 3
    assert set(seq.page_row[5:]) == {pool.scratch_page}
    assert seq.window_pages == pool.window_page_row(seq.pages, 2)
    pool.release(seq)
    assert seq.pages == [] and seq.window_start == 0
    assert pool.num_used_pages == 0 and pool.num_used_window_pages == 0
    assert set(seq.page_row) == {pool.scratch_page} and set(seq.window_row) == {pool.window_scratch_page}
