"""MemoryPool: the paged KV cache, its free list, and prefix sharing of whole pages.

Sliding-window layers (Gemma3's local layers) only ever read the last `window` keys, so they get
a smaller pool of their own: each page a sequence holds has a *companion* page there, holding the
window layers' K/V of the same tokens, until the sequence has moved a window past it. Companions
of cached pages stay cached (and shared) like the pages themselves until evicted.

The pool is the one owner of a sequence's page bookkeeping: `grow`, `attach_prefix`, `advance`,
`truncate` and `release` edit its pages, its window start and its two page-table rows (numpy,
kept in place so a step copies them without walking the page lists in Python).
"""

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from sfllm_core.engine.request_sequence import RequestSequence


class MemoryPool:
    """Fixed-size pages of KV slots for every layer, handed out to sequences by reference count.

    A full page whose tokens (and every token before them) are known gets a hash; a later sequence
    whose prompt starts with the same tokens reuses it instead of recomputing. Pages nobody
    references go back on the free list but keep their contents and hash until they are reused,
    oldest first, so a finished request's prefix stays cached while memory allows.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        enable_prefix_caching: bool = True,
        window: int | None = None,
        window_layers: frozenset[int] = frozenset(),
        num_window_pages: int = 0,
        max_pages_per_seq: int | None = None,
    ) -> None:
        self.num_pages = num_pages
        # Width of a sequence's page-table rows; no sequence ever holds more pages than this.
        self.max_pages_per_seq = max_pages_per_seq or num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        # One extra page at the end that is never handed out: padding rows of captured decode
        # graphs write their K/V there.
        self.scratch_page = num_pages
        # The window group: layers in window_layers keep their K/V in companion pages.
        self.window = window if window_layers and num_window_pages > 0 else None
        self.num_window_pages = num_window_pages if self.window else 0
        self.window_scratch_page = self.num_window_pages

        def kv(pages: int) -> tuple[torch.Tensor, torch.Tensor]:
            shape = ((pages + 1) * page_size, num_kv_heads, head_dim)
            return torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)

        self.kv_caches = [
            kv(self.num_window_pages if self.window and i in window_layers else num_pages) for i in range(num_layers)
        ]
        self._w_refs = [0] * self.num_window_pages
        self._w_free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(self.num_window_pages))
        self._companion: dict[int, int] = {}  # page -> its companion
        self._companion_of: dict[int, int] = {}  # companion -> its page
        self.ref_counts = [0] * num_pages
        self._free: OrderedDict[int, None] = OrderedDict((p, None) for p in range(num_pages))
        self._page_hash: dict[int, int] = {}
        self._hash_to_page: dict[int, int] = {}
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @staticmethod
    def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def num_free_pages(self) -> int:
        """Pages allocate() can hand out now: with a window group, also bounded by free companions."""
        if self.window:
            return min(len(self._free), len(self._w_free))
        return len(self._free)

    @property
    def num_used_pages(self) -> int:
        return self.num_pages - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_pages / self.num_pages

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def allocate(self, n: int) -> list[int]:
        """Take n pages (caller checks num_free_pages first); evicts the oldest cached contents."""
        if n > len(self._free):
            raise RuntimeError(f"MemoryPool: asked for {n} pages, {len(self._free)} free")
        if self.window and n > len(self._w_free):
            raise RuntimeError(f"MemoryPool: asked for {n} window pages, {len(self._w_free)} free")
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            old = self._page_hash.pop(page, None)
            if old is not None:
                del self._hash_to_page[old]
            self.ref_counts[page] = 1
            pages.append(page)
            if self.window:
                self._forget_companion(page)
                companion, _ = self._w_free.popitem(last=False)
                if companion in self._companion_of:
                    del self._companion[self._companion_of.pop(companion)]
                self._w_refs[companion] = 1
                self._companion[page] = companion
                self._companion_of[companion] = page
        return pages

    def _forget_companion(self, page: int) -> None:
        # The page's contents are being replaced: an old (unreferenced, cached) companion is plain free.
        companion = self._companion.pop(page, None)
        if companion is not None:
            del self._companion_of[companion]

    def free(self, pages: list[int], window_start: int = 0) -> None:
        """Drop one reference to each page, and to the companions of pages[window_start:] (those
        the holder still had); unreferenced pages become reusable."""
        self.release_window(pages[window_start:])
        for page in pages:
            self.ref_counts[page] -= 1
            assert self.ref_counts[page] >= 0, f"page {page} freed twice"
            if self.ref_counts[page] == 0:
                self._free[page] = None

    # ---- the window group ---------------------------------------------------------------------

    def window_start(self, num_computed: int) -> int:
        """Index of the first page whose window K/V a sequence at num_computed tokens still needs.

        Its next query sits at position num_computed and reads keys from num_computed - window + 1.
        """
        if not self.window:
            return 0
        return max(0, num_computed - self.window + 1) // self.page_size

    def release_window(self, pages: list[int]) -> None:
        """Drop the holder's reference to these pages' companions (it has moved past their window)."""
        if not self.window:
            return
        for page in pages:
            companion = self._companion[page]
            self._w_refs[companion] -= 1
            assert self._w_refs[companion] >= 0, f"window page {companion} released twice"
            if self._w_refs[companion] == 0:
                self._w_free[companion] = None

    def window_page_row(self, pages: list[int], window_start: int) -> list[int]:
        """The window layers' page table row: companions from window_start on, the scratch page before."""
        return [self.window_scratch_page] * window_start + [self._companion[p] for p in pages[window_start:]]

    def companions(self, pages: list[int]) -> list[int]:
        return [self._companion[p] for p in pages]

    @property
    def num_used_window_pages(self) -> int:
        return self.num_window_pages - len(self._w_free)

    # ---- a sequence's pages ------------------------------------------------------------------

    def _rows(self, seq: "RequestSequence") -> None:
        if seq.page_row is None:
            seq.page_row = np.full(self.max_pages_per_seq, self.scratch_page, dtype=np.int32)
            if self.window:
                seq.window_row = np.full(self.max_pages_per_seq, self.window_scratch_page, dtype=np.int32)

    def pages_needed(self, seq: "RequestSequence", num_tokens: int) -> int:
        """Pages a sequence must still get to hold num_tokens tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(seq.pages))

    def grow(self, seq: "RequestSequence", num_tokens: int) -> None:
        """Give a sequence the pages (and companions) it lacks to hold num_tokens tokens."""
        n = self.pages_needed(seq, num_tokens)
        if n == 0:
            return
        self._rows(seq)
        first = len(seq.pages)
        if first + n > self.max_pages_per_seq:
            raise RuntimeError(f"MemoryPool: a sequence may hold {self.max_pages_per_seq} pages, asked for {first + n}")
        pages = self.allocate(n)
        seq.pages += pages
        seq.page_row[first : first + n] = pages
        if self.window:
            seq.window_row[first : first + n] = [self._companion[p] for p in pages]

    def attach_prefix(self, seq: "RequestSequence", token_ids: list[int] | None) -> None:
        """Start a pageless sequence on the cached pages of its longest cached prefix (none if
        token_ids is None); its computed count is then theirs."""
        seq.pages, seq.page_hashes = self.match_prefix(token_ids) if token_ids is not None else ([], [])
        seq.num_computed_tokens = len(seq.pages) * self.page_size
        seq.window_start = self.window_start(seq.num_computed_tokens)
        if seq.pages:
            self._rows(seq)
            seq.page_row[: len(seq.pages)] = seq.pages
            if self.window:
                seq.window_row[: len(seq.pages)] = self.window_page_row(seq.pages, seq.window_start)

    def advance(self, seq: "RequestSequence") -> None:
        """Release the companions a sequence at its computed count has moved a window past."""
        if not self.window:
            return
        start = self.window_start(seq.num_computed_tokens)
        if start > seq.window_start:
            self.release_window(seq.pages[seq.window_start : start])
            seq.window_row[seq.window_start : start] = self.window_scratch_page
            seq.window_start = start

    def truncate(self, seq: "RequestSequence", num_tokens: int) -> None:
        """Give back the pages past those num_tokens tokens need (K/V written for tokens then dropped)."""
        keep = -(-num_tokens // self.page_size)
        if keep >= len(seq.pages):
            return
        dropped = seq.pages[keep:]
        # Pages past the window start still hold their companions; those before it were released.
        self.free(dropped, max(0, seq.window_start - keep))
        del seq.pages[keep:]
        del seq.page_hashes[keep:]
        seq.page_row[keep : keep + len(dropped)] = self.scratch_page
        if self.window:
            seq.window_row[keep : keep + len(dropped)] = self.window_scratch_page
            seq.window_start = min(seq.window_start, keep)

    def release(self, seq: "RequestSequence") -> None:
        """Give back every page and companion a sequence holds; it holds none after."""
        self.free(seq.pages, seq.window_start)
        if seq.page_row is not None:
            seq.page_row[: len(seq.pages)] = self.scratch_page
            if self.window:
                seq.window_row[: len(seq.pages)] = self.window_scratch_page
        seq.pages, seq.page_hashes, seq.window_start = [], [], 0

    def page_hash(self, parent: int, tokens: list[int]) -> int:
        """Hash of a full page, chained to the hash of the page before it (0 for the first)."""
        return hash((parent, tuple(tokens)))

    def match_prefix(self, token_ids: list[int]) -> tuple[list[int], list[int]]:
        """Reference the cached pages holding the longest page-aligned prefix of token_ids.

        Returns (pages, their hashes). At least one token is always left uncached, so the caller
        still has a token to compute logits from.
        """
        if not self.enable_prefix_caching:
            return [], []
        pages, hashes, parent = [], [], 0
        for i in range((len(token_ids) - 1) // self.page_size):
            parent = self.page_hash(parent, token_ids[i * self.page_size : (i + 1) * self.page_size])
            page = self._hash_to_page.get(parent)
            if page is None:
                break
            pages.append(page)
            hashes.append(parent)
        if self.window:
            # Continuing after the match needs the window K/V just before it: cut the match back
            # until the companions of its last window of pages are all still cached.
            while pages and any(
                p not in self._companion for p in pages[self.window_start(len(pages) * self.page_size) :]
            ):
                pages.pop()
                hashes.pop()
            for page in pages[self.window_start(len(pages) * self.page_size) :]:
                companion = self._companion[page]
                if self._w_refs[companion] == 0:
                    del self._w_free[companion]
                self._w_refs[companion] += 1
        for page in pages:
            if self.ref_counts[page] == 0:
                del self._free[page]
            self.ref_counts[page] += 1
        self.prefix_queries += len(token_ids)
        self.prefix_hits += len(pages) * self.page_size
        return pages, hashes

    def register_page(self, page: int, page_hash: int) -> None:
        """Publish a full, computed page so later prompts with the same prefix can share it."""
        if not self.enable_prefix_caching or page in self._page_hash or page_hash in self._hash_to_page:
            return
        self._page_hash[page] = page_hash
        self._hash_to_page[page_hash] = page
