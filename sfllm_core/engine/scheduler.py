"""Scheduler: continuous batching with chunked prefill, page-based admission and preemption."""

from collections import deque
from dataclasses import dataclass, field

from sfllm_core.engine.memory_pool import MemoryPool
from sfllm_core.engine.request_sequence import PENDING_TOKEN, RequestSequence, SequenceStatus


def window_chunk_tokens(window: int) -> int:
    """The most new tokens one sequence feeds in a step when the pool has a window group."""
    return max(2 * window, 512)


def window_pages_per_seq(window: int, page_size: int) -> int:
    """Companions one sequence can hold at once: a window of keys plus one chunk, page-misaligned."""
    return -(-(window + window_chunk_tokens(window) - 1) // page_size) + 1


@dataclass
class ScheduledBatch:
    """One step's work: sequences and how many new tokens each feeds (single-token ones first)."""

    seqs: list[RequestSequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __len__(self) -> int:
        return len(self.seqs)


class Scheduler:
    """FCFS continuous batching under a per-step token budget and the pool's free pages.

    Each step: running sequences first (decodes cost one token each, unfinished prefills continue
    chunk by chunk), then waiting ones are admitted in arrival order while budget, sequence slots
    and pages last. When a running sequence needs a page and none is free, the most recently
    admitted running sequence is preempted: its pages are freed and it waits to be recomputed.
    """

    def __init__(
        self, pool: MemoryPool, max_num_seqs: int, max_num_batched_tokens: int, max_context_length: int | None = None
    ) -> None:
        self.pool = pool
        self.max_context_length = max_context_length
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[RequestSequence] = deque()
        self.running: list[RequestSequence] = []
        self.num_preemptions = 0
        # With a window group each sequence holds at most the companions of a window plus one
        # chunk; the engine sizes the window pool for max_num_seqs of those (see InferenceEngine),
        # and num_free_pages counts free companions too, so admission and preemption cover both.
        self.chunk_limit = window_chunk_tokens(pool.window) if pool.window else max_num_batched_tokens

    def add(self, seq: RequestSequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _complete(self, seq: RequestSequence) -> bool:
        if seq.num_tokens - seq.num_prompt_tokens >= seq.params.max_tokens:
            return True
        return self.max_context_length is not None and seq.num_tokens >= self.max_context_length

    def _pages_needed(self, seq: RequestSequence, num_new: int) -> int:
        return self.pool.pages_needed(seq, seq.num_computed_tokens + num_new)

    def _preempt(self, seq: RequestSequence) -> None:
        self.running.remove(seq)
        self.pool.release(seq)
        seq.draft_ids = []
        if self.waiting and self.waiting[0].pages:
            # The head may hold the pages of its cached prefix while it waits for the rest; once it
            # is no longer first it must let them go, or the new head could wait on them for ever.
            head = self.waiting[0]
            self.pool.release(head)
            head.num_computed_tokens = 0
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        singles, chunks = ScheduledBatch(), ScheduledBatch()
        scheduled: set[int] = set()
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted earlier in this loop
                continue
            if self._complete(seq):  # its last token is sampled, only not read back yet
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget, self.chunk_limit)
            need = self._pages_needed(seq, num_new)
            while need > self.pool.num_free_pages:
                victim = next(s for s in reversed(self.running) if id(s) not in scheduled)
                self._preempt(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            if seq.draft_ids:
                # Drafts ride along with the decode only where budget and free pages allow: never
                # at the cost of a preemption.
                drafted = num_new + len(seq.draft_ids)
                if num_new == 1 and drafted <= budget and self._pages_needed(seq, drafted) <= self.pool.num_free_pages:
                    num_new = drafted
                else:
                    seq.draft_ids = []
            self.pool.grow(seq, seq.num_computed_tokens + num_new)
            target = singles if num_new == 1 else chunks
            target.seqs.append(seq)
            target.num_new_tokens.append(num_new)
            scheduled.add(id(seq))
            budget -= num_new

        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.pages:
                # Prompt logprobs need every prompt position's logits: a cached prefix has none.
                self.pool.attach_prefix(seq, None if seq.needs_prompt_logits else seq.token_ids)
                if not seq.admitted:  # a continuation's own tokens found cached are not prompt tokens
                    seq.num_cached_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget, self.chunk_limit)
            need = self._pages_needed(seq, num_new)
            if need > self.pool.num_free_pages:
                break  # FCFS: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.pool.grow(seq, seq.num_computed_tokens + num_new)
            seq.admitted = True
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            target = singles if num_new == 1 else chunks
            target.seqs.append(seq)
            target.num_new_tokens.append(num_new)
            budget -= num_new

        return ScheduledBatch(singles.seqs + chunks.seqs, singles.num_new_tokens + chunks.num_new_tokens)

    def commit(self, batch: ScheduledBatch) -> None:
        """Advance computed counts after the forward pass and publish newly full pages.

        A verified sequence's entry must by then count only the tokens kept (its last token and
        the accepted drafts), its rejected drafts' pages given back (MemoryPool.truncate).
        """
        page_size = self.pool.page_size
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
            self.pool.advance(seq)
            while len(seq.page_hashes) < seq.num_computed_tokens // page_size:
                i = len(seq.page_hashes)
                tokens = seq.token_ids[i * page_size : (i + 1) * page_size]
                if PENDING_TOKEN in tokens:  # hashed at a later commit, once the token is known
                    break
                parent = seq.page_hashes[-1] if seq.page_hashes else 0
                h = self.pool.page_hash(parent, tokens)
                seq.page_hashes.append(h)
                self.pool.register_page(seq.pages[i], h)

    def finish(self, seq: RequestSequence, reason: str) -> None:
        """Take a sequence out of every queue and release its pages (idempotent)."""
        if seq.status is SequenceStatus.FINISHED:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.pool.release(seq)
        seq.draft_ids = []
        while seq.token_ids and seq.token_ids[-1] == PENDING_TOKEN:
            seq.token_ids.pop()
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
