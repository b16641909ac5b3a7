"""RequestSequence: one request's tokens, pages and progress through the engine."""

import enum
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from sfllm_core.outputs import TokenLogprob
from sfllm_core.sampling_params import SamplingParams

if TYPE_CHECKING:
    from sfllm_core.engine.grammar import SequenceGrammar

# Stands in token_ids for a token sampled on the GPU whose value the host has not read yet
# (the engine reads step N's tokens while step N+1 runs).
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # queued, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds pages and is scheduled every step
    FINISHED = "finished"


class RequestSequence:
    """A request's state machine: WAITING -> RUNNING (-> WAITING on preemption) -> FINISHED.

    `num_computed_tokens` counts the tokens whose K/V are in this sequence's pages; a step feeds the
    next chunk of `token_ids` from there, and samples once every token has been computed. A
    continuation (output generated elsewhere, e.g. on a worker that died) starts the output: its
    K/V are computed with the prompt's, and it counts as output for max_tokens, penalties and seeds.
    """

    def __init__(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, continuation: Sequence[int] = ()
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = self.prompt_token_ids + list(continuation)
        self.params = params
        self.status = SequenceStatus.WAITING
        # Pages and window bookkeeping: edited by MemoryPool only (grow, advance, truncate, release).
        self.pages: list[int] = []
        self.page_hashes: list[int] = []  # prefix-cache hashes of this sequence's full, computed pages
        self.window_start = 0  # pages before this one no longer hold window K/V (see MemoryPool)
        # Page-table rows as the runner copies them: pages, then the scratch page; and the window
        # layers' row (MemoryPool.window_page_row). Made on the first page.
        self.page_row: np.ndarray | None = None
        self.window_row: np.ndarray | None = None
        # Draft tokens proposed for this step (speculative decoding): verified after the last token.
        self.draft_ids: list[int] = []
        self.drafter_state: dict | None = None  # the draft proposer's per-sequence state (its index, back-off)
        self.num_accepted_drafts = 0  # draft tokens verification kept, over the request
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.num_emitted = 0  # output tokens already handed out as StepOutputs
        self.finish_reason: str | None = None
        self.stop_token_id: int | None = None
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs else None
        # With params.prompt_logprobs: entry i is prompt token i + 1 given the ones before it (the
        # runner appends them chunk by chunk); the first StepOutput hands them out, once.
        self.prompt_logprobs: list[TokenLogprob] | None = [] if params.prompt_logprobs is not None else None
        self.prompt_logprobs_sent = False
        self.arrival_time = time.monotonic()
        self.admitted = False  # set at first admission; preemption does not reset it
        # A constrained request's matcher, set once its grammar is compiled; kept across preemption
        # (the output so far is kept too) and closed when the sequence ends.
        self.grammar: SequenceGrammar | None = None
        # Whether the Sampler edits this row's logits (penalties, logit_bias, a grammar): read for
        # every row of every step, so worked out once.
        self.adjusts_logits = (
            params.repetition_penalty != 1.0
            or bool(params.presence_penalty)
            or bool(params.frequency_penalty)
            or bool(params.logit_bias)
            or params.constraint is not None
        )

    @property
    def window_pages(self) -> list[int]:
        """The window layers' page-table row over the pages held (scratch before window_start)."""
        return [] if self.window_row is None else self.window_row[: len(self.pages)].tolist()

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt logprobs are asked for and not all computed yet (the prefix cache is skipped meanwhile)."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens - 1

    def take_prompt_logprobs(self) -> list[TokenLogprob] | None:
        """The prompt's logprobs the first time they are all there; None before, after, or when not asked."""
        if self.prompt_logprobs is None or self.prompt_logprobs_sent or self.needs_prompt_logits:
            return None
        self.prompt_logprobs_sent = True
        return self.prompt_logprobs

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"RequestSequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
            f"computed={self.num_computed_tokens}, pages={len(self.pages)})"
        )
