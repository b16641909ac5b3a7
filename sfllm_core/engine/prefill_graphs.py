"""One sequence's prefill chunk replayed from a CUDA graph, padded to the next captured length.

A request that arrives at an idle engine is prefilled alone, and an eager forward launches every
kernel from the host: ~280 launches for a 128-token prompt, 14-20 ms of host time on an H200
against 1.2-1.6 ms of kernels (Qwen3-0.6B and Gemma3-1B shapes, 2026-12-02). So its time to first
token was the host's. Here the chunk is padded to the next captured length (16, 32, ... tokens),
as a verify step pads its drafts: the padding rows come after the real ones, so causal attention
keeps them out of every real row; their K/V go to the scratch page and their positions are
clamped into the rotary table. The graph gathers the last real row's hidden state before the
output projection, so it computes one row of logits whatever the padding.

A step that also carries decoding sequences (a request arriving while others decode) replays
the decode graph for them and this one for the chunk: two replays instead of an eager forward.
Chunks that need prompt logprobs, batches with more than one chunk, and chunks whose padded
length passes the context limit run eagerly as before.
"""

import logging
import time
from dataclasses import replace

import numpy as np
import torch

from sfllm_core.engine.request_sequence import RequestSequence
from sfllm_core.layers.attention import BatchMetadata
from sfllm_core.models.common import ForwardContext

logger = logging.getLogger("sfllm.runner")

# Longest padded chunk with a graph. Past it the kernels' own time outgrows the host's launches
# (a 1k-token Qwen3-0.6B prefill is ~5 ms of kernels), so eager launches hide behind them.
MAX_GRAPH_TOKENS = 1024
_SMALLEST = 16


def prefill_lengths(max_tokens: int) -> list[int]:
    """16, 32, 64, ... up to max_tokens (itself included when it is not a power of two)."""
    sizes, size = [], _SMALLEST
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return sizes + [max_tokens]


class PrefillGraphs:
    """Static buffers for one chunk of up to sizes[-1] tokens, and a graph per padded length."""

    # Rows of `inputs`: ids, positions, slots, sliding-window slots (one column per token), then
    # the sequence's length after the chunk and the index of its last real row (column 0 only).
    _ROWS = 6

    def __init__(self, runner, sizes: list[int], max_pages: int) -> None:
        self.runner = runner
        self.sizes = sizes
        pool, dev = runner.pool, runner.device
        t = sizes[-1]
        self.inputs = torch.zeros(self._ROWS, t, dtype=torch.int64, device=dev)
        self.seq_lens = torch.ones(1, dtype=torch.int32, device=dev)
        self.page_table = torch.full((1, max_pages), pool.scratch_page, dtype=torch.int32, device=dev)
        self.query_start = {s: torch.tensor([0, s], dtype=torch.int32, device=dev) for s in sizes}
        pinned = dev.type == "cuda"
        # Two host sets used in turn: the copies out of one may still be queued when the next chunk fills.
        self.host_inputs = torch.zeros(2, self._ROWS, t, dtype=torch.int64, pin_memory=pinned)
        self.host_table = torch.zeros(2, 1, max_pages, dtype=torch.int32, pin_memory=pinned)
        self.windowed = pool.window is not None
        if self.windowed:
            self.window_page_table = torch.full((1, max_pages), pool.window_scratch_page, dtype=torch.int32, device=dev)
            self.host_window_table = torch.zeros(2, 1, max_pages, dtype=torch.int32, pin_memory=pinned)
        self.max_position = runner.max_context_length - 1
        self.turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self.num_joined = 0  # of them, chunks that ran in a step with decoding sequences

    def fits(self, seq: RequestSequence, n: int) -> bool:
        """A chunk of n prompt tokens of seq that a graph can run."""
        return (
            2 <= n <= self.sizes[-1]
            and not seq.needs_prompt_logits
            and not seq.draft_ids
            # The padding rows' positions must stay inside the sequence's page-table row.
            and seq.num_computed_tokens + self.size_for(n) <= self.runner.max_context_length
        )

    def size_for(self, n: int) -> int:
        return next(s for s in self.sizes if s >= n)

    def _meta(self, size: int, seq_len: int | None) -> BatchMetadata:
        """seq_len: the host's copy of the length, for backends that read one (not while capturing)."""
        runner = self.runner
        meta = BatchMetadata(
            positions=self.inputs[1, :size],
            slot_mapping=self.inputs[2, :size],
            query_start_loc=self.query_start[size],
            seq_lens=self.seq_lens,
            page_table=self.page_table,
            logits_indices=self.inputs[5, :1],
            page_size=runner.pool.page_size,
            num_decodes=0,
            max_query_len=size,
            max_seq_len=runner.max_context_length + size,
            seq_lens_cpu=[seq_len] if seq_len is not None else [],
            query_lens_cpu=[size] if seq_len is not None else [],
        )
        if self.windowed:
            meta.window = replace(
                meta, slot_mapping=self.inputs[3, :size], page_table=self.window_page_table, backend_state={}
            )
        return meta

    def _forward(self, size: int, seq_len: int | None = None) -> torch.Tensor:
        runner = self.runner
        self.seq_lens.copy_(self.inputs[4, :1])  # in the graph: the host sends it with the ids
        meta = self._meta(size, seq_len)
        runner.backend.prepare(meta)
        if meta.window is not None:
            runner.backend.prepare(meta.window)
        ctx = ForwardContext(runner.backend, meta, runner.pool.kv_caches)
        hidden = runner.model(self.inputs[0, :size], meta.positions, ctx)
        return runner.model.compute_logits(hidden.index_select(0, meta.logits_indices))

    def capture(self) -> None:
        start = time.perf_counter()
        graph_pool = torch.cuda.graph_pool_handle()
        # The buffers describe a valid (padding-only) chunk on the scratch page while capturing.
        self._fill_padding(self.host_inputs[0].numpy(), 0, self.sizes[-1], 0)
        self.host_inputs[0, 4, 0] = self.sizes[-1]
        self.inputs.copy_(self.host_inputs[0])
        for size in reversed(self.sizes):
            with torch.inference_mode():
                self._forward(size)  # warm up: compiles kernels outside the capture
                torch.cuda.synchronize(self.runner.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=graph_pool):
                    self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.runner.device)
        self.capture_seconds = time.perf_counter() - start
        logger.info(
            "captured %d prefill CUDA graphs (%d..%d tokens) in %.1f s",
            len(self.sizes),
            self.sizes[0],
            self.sizes[-1],
            self.capture_seconds,
        )

    def _fill_padding(self, inputs: np.ndarray, first: int, size: int, position: int) -> None:
        """Columns first..size-1: id 0, clamped positions from `position` on, slots on the scratch pages."""
        pool = self.runner.pool
        page_size = pool.page_size
        offsets = np.arange(size - first) % page_size
        inputs[0, first:size] = 0
        inputs[1, first:size] = np.minimum(np.arange(position, position + size - first), self.max_position)
        inputs[2, first:size] = pool.scratch_page * page_size + offsets
        if self.windowed:
            inputs[3, first:size] = pool.window_scratch_page * page_size + offsets

    def run(self, seq: RequestSequence, n: int) -> torch.Tensor:
        """Logits [1, vocab] after the chunk's last token (read them only when the chunk ends the prompt)."""
        page_size = self.runner.pool.page_size
        size = self.size_for(n)
        p = seq.num_computed_tokens
        self.turn ^= 1
        host_inputs = self.host_inputs[self.turn]
        inputs = host_inputs.numpy()
        positions = np.arange(p, p + n)
        pages = positions // page_size
        offsets = positions % page_size
        inputs[0, :n] = seq.token_ids[p : p + n]
        inputs[1, :n] = positions
        inputs[2, :n] = seq.page_row[pages].astype(np.int64) * page_size + offsets
        if self.windowed:
            inputs[3, :n] = seq.window_row[pages].astype(np.int64) * page_size + offsets
        self._fill_padding(inputs, n, size, p + n)
        inputs[4, 0] = p + size
        inputs[5, 0] = n - 1
        host_table = self.host_table[self.turn]
        host_table[0] = torch.from_numpy(seq.page_row)
        self.page_table.copy_(host_table, non_blocking=True)
        if self.windowed:
            host_window = self.host_window_table[self.turn]
            host_window[0] = torch.from_numpy(seq.window_row)
            self.window_page_table.copy_(host_window, non_blocking=True)
        self.inputs[:, :size].copy_(host_inputs[:, :size], non_blocking=True)
        self.num_replays += 1
        if size in self.graphs:
            self.graphs[size].replay()
            return self.outputs[size]
        return self._forward(size, p + size)  # no graph (the CPU): the same padded chunk, eagerly
