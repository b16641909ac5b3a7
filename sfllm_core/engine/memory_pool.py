"""MemoryPool: the paged KV cache, its free list, and prefix sharing of whole pages."""

from collections import OrderedDict

import torch


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
    ) -> None:
        self.num_pages = num_pages
        self.page_size = page_size
        self.enable_prefix_caching = enable_prefix_caching
        # One extra page at the end that is never handed out: padding rows of captured decode
        # graphs write their K/V there.
        self.scratch_page = num_pages
        shape = ((num_pages + 1) * page_size, num_kv_heads, head_dim)
        self.kv_caches = [
            (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
            for _ in range(num_layers)
        ]
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
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            old = self._page_hash.pop(page, None)
            if old is not None:
                del self._hash_to_page[old]
            self.ref_counts[page] = 1
            pages.append(page)
        return pages

    def free(self, pages: list[int]) -> None:
        """Drop one reference to each page; unreferenced pages become reusable."""
        for page in pages:
            self.ref_counts[page] -= 1
            assert self.ref_counts[page] >= 0, f"page {page} freed twice"
            if self.ref_counts[page] == 0:
                self._free[page] = None

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
