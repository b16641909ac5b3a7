"""Verify steps of a fixed shape: every sequence feeds q = k + 1 tokens, replayed from CUDA graphs.

A verify step (speculative decoding) feeds each decoding sequence its last token and up to k
drafts. Captured graphs need fixed shapes, so each sequence is padded to q rows: the rows past
its drafts compute garbage that nobody reads. Their K/V go to the scratch page (the pool never
hands it out), their positions are clamped into the rotary table, and a real row never sees a
padding row (they come after it, and attention is causal). The batch is padded to the next
ladder size as decode graphs are, with whole padding sequences on the scratch page. The logits
of the real rows are gathered in order, as the eager path returns them.

On the CPU the same buffers run eagerly (`VerifyGraphs.run` without capture): tests check the
padding there against the ragged path.

With aux_layers (an EAGLE-3 head's), the graphs also hand out the target's residual stream
entering those layers, concatenated per row (`last_aux`, [size * q, 3 x hidden], padded as the
rows are), read before the next replay overwrites it.
"""

import itertools
import logging
import time
from dataclasses import replace

import numpy as np
import torch

from sfllm_core.engine.scheduler import ScheduledBatch
from sfllm_core.layers.attention import BatchMetadata
from sfllm_core.models.common import ForwardContext
from sfllm_core.models.eagle3 import concat_aux

logger = logging.getLogger("sfllm.runner")


class VerifyGraphs:
    """Static buffers of verify steps of q tokens per sequence, and one graph per ladder size."""

    def __init__(self, runner, sizes: list[int], q: int, max_pages: int, aux_layers: tuple[int, ...] = ()) -> None:
        self.runner = runner
        self.aux_layers = aux_layers
        self.last_aux: torch.Tensor | None = None
        self.sizes, self.q = sizes, q
        pool, dev = runner.pool, runner.device
        n = sizes[-1]
        t = n * q
        # Rows of `inputs`: ids, positions, slots, window slots (one column per fed token).
        self.inputs = torch.zeros(4, t, dtype=torch.int64, device=dev)
        self.seq_lens = torch.full((n,), q, dtype=torch.int32, device=dev)
        self.page_table = torch.full((n, max_pages), pool.scratch_page, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(0, (n + 1) * q, q, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(t, dtype=torch.int64, device=dev)
        pinned = dev.type == "cuda"
        self.host_inputs = torch.zeros(4, t, dtype=torch.int64, pin_memory=pinned)
        self.host_seq_lens = torch.zeros(n, dtype=torch.int32, pin_memory=pinned)
        self.host_table = torch.zeros(n, max_pages, dtype=torch.int32, pin_memory=pinned)
        self.rows = torch.zeros(t, dtype=torch.int64, device=dev)  # the real rows of a step's logits
        self.host_rows = torch.zeros(t, dtype=torch.int64, pin_memory=pinned)
        self.windowed = pool.window is not None
        if self.windowed:
            self.window_page_table = torch.full((n, max_pages), pool.window_scratch_page, dtype=torch.int32, device=dev)
            self.host_window_table = torch.zeros(n, max_pages, dtype=torch.int32, pin_memory=pinned)
        self.max_position = runner.max_context_length - 1
        # Numpy views of the host buffers, and the padding rows' slots on the scratch pages.
        self._np = (
            self.host_inputs.numpy(),
            self.host_table.numpy(),
            self.host_seq_lens.numpy(),
            self.host_rows.numpy(),
        )
        self._np_window = self.host_window_table.numpy() if self.windowed else None
        self._offsets = np.arange(q)
        self._spread = pool.scratch_page * pool.page_size + self._offsets % pool.page_size
        if self.windowed:
            self._window_spread = pool.window_scratch_page * pool.page_size + self._offsets % pool.page_size
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.num_steps = 0  # verify steps run on these buffers

    def fits(self, batch: ScheduledBatch) -> bool:
        """Only decoding sequences, each with at most q - 1 drafts, no more than the largest size."""
        q, limit = self.q, self.runner.max_context_length
        return len(batch.seqs) <= self.sizes[-1] and all(
            n == 1 + len(s.draft_ids) <= q
            and s.num_computed_tokens + 1 == s.num_tokens
            # The padding rows' positions must stay in the sequence's page-table row.
            and s.num_computed_tokens + q <= limit
            for s, n in zip(batch.seqs, batch.num_new_tokens)
        )

    def meta(self, size: int, seq_lens_cpu: list[int] | None = None) -> BatchMetadata:
        q, t = self.q, size * self.q
        runner = self.runner
        meta = BatchMetadata(
            positions=self.inputs[1, :t],
            slot_mapping=self.inputs[2, :t],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            page_table=self.page_table[:size],
            logits_indices=self.logits_indices[:t],
            page_size=runner.pool.page_size,
            num_decodes=0,
            max_query_len=q,
            max_seq_len=runner.max_context_length + q,
            seq_lens_cpu=seq_lens_cpu or [],
            query_lens_cpu=[q] * size if seq_lens_cpu else [],
        )
        if self.windowed:
            meta.window = replace(
                meta, slot_mapping=self.inputs[3, :t], page_table=self.window_page_table[:size], backend_state={}
            )
        return meta

    def _forward(self, size: int, meta: BatchMetadata) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        runner = self.runner
        runner.backend.prepare(meta)
        if meta.window is not None:
            runner.backend.prepare(meta.window)
        ctx = ForwardContext(runner.backend, meta, runner.pool.kv_caches, aux_layers=self.aux_layers)
        hidden = runner.model(self.inputs[0, : size * self.q], meta.positions, ctx)
        logits = runner.model.compute_logits(hidden)
        return (logits, concat_aux(self.aux_layers, ctx.aux_hidden)) if self.aux_layers else logits

    def capture(self) -> None:
        start = time.perf_counter()
        graph_pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            meta = self.meta(size)
            with torch.inference_mode():
                self._forward(size, meta)  # warm up: compiles kernels outside the capture
                torch.cuda.synchronize(self.runner.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=graph_pool):
                    self.outputs[size] = self._forward(size, meta)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.runner.device)
        logger.info(
            "captured %d verify CUDA graphs (batch %d..%d, %d tokens each) in %.1f s",
            len(self.sizes),
            self.sizes[0],
            self.sizes[-1],
            self.q,
            time.perf_counter() - start,
        )

    def run(self, batch: ScheduledBatch) -> torch.Tensor:
        """The step's logits: 1 + len(draft_ids) rows per sequence, in batch order."""
        pool, q = self.runner.pool, self.q
        page_size, scratch = pool.page_size, pool.scratch_page
        seqs = batch.seqs
        b = len(seqs)
        size = next(s for s in self.sizes if s >= b)
        inputs, table, seq_lens, host_rows = self._np
        # Column by column over the whole batch, as decode replays are built: a loop of small numpy
        # writes per sequence cost ~6 us each, 0.4 ms of host time per step at batch 64.
        offsets, spread = self._offsets, self._spread
        pos = np.fromiter((s.num_computed_tokens for s in seqs), np.int64, b)
        num_drafts = np.fromiter((len(s.draft_ids) for s in seqs), np.int64, b)
        real = offsets < 1 + num_drafts[:, None]  # [b, q]: the rows fed a token
        ids = np.zeros((b, q), dtype=np.int64)
        ids[:, 0] = [s.token_ids[p] for s, p in zip(seqs, pos.tolist())]
        ids[:, 1:][real[:, 1:]] = list(itertools.chain.from_iterable(s.draft_ids for s in seqs))
        positions = pos[:, None] + offsets  # fits() keeps them inside the sequence's page-table row
        inputs[0, : b * q] = ids.ravel()
        inputs[1, : b * q] = np.minimum(positions, self.max_position).ravel()
        np.stack([s.page_row for s in seqs], out=table[:b])
        pages, within = positions // page_size, positions % page_size
        slots = table[np.arange(b)[:, None], pages] * page_size + within
        inputs[2, : b * q] = np.where(real, slots, spread).ravel()
        seq_lens[:b] = pos + q
        if self.windowed:
            window_table, window_spread = self._np_window, self._window_spread
            np.stack([s.window_row for s in seqs], out=window_table[:b])
            window_slots = window_table[np.arange(b)[:, None], pages] * page_size + within
            inputs[3, : b * q] = np.where(real, window_slots, window_spread).ravel()
        if size > b:  # whole padding sequences: q tokens at positions 0..q-1 on the scratch page
            inputs[0, b * q : size * q] = 0
            inputs[1, b * q : size * q] = np.tile(offsets, size - b)
            inputs[2, b * q : size * q] = np.tile(spread, size - b)
            seq_lens[b:size] = q
            table[b:size] = scratch
            if self.windowed:
                inputs[3, b * q : size * q] = np.tile(window_spread, size - b)
                window_table[b:size] = pool.window_scratch_page
        if self.windowed:
            self.window_page_table[:size].copy_(self.host_window_table[:size], non_blocking=True)
        self.inputs[:, : size * q].copy_(self.host_inputs[:, : size * q], non_blocking=True)
        self.seq_lens[:size].copy_(self.host_seq_lens[:size], non_blocking=True)
        self.page_table[:size].copy_(self.host_table[:size], non_blocking=True)
        self.num_steps += 1
        if size in self.graphs:
            self.graphs[size].replay()
            out = self.outputs[size]
        else:  # no graph (the CPU): the same padded step, eagerly
            out = self._forward(size, self.meta(size, seq_lens[:size].tolist()))
        if self.aux_layers:
            out, self.last_aux = out
        if size == b and real.all():  # every row is real: nothing to gather (read before the next replay)
            return out
        keep = np.flatnonzero(real.ravel())
        host_rows[: len(keep)] = keep
        # From page-locked memory (reused after the step's tokens are read, a sync): a pageable
        # copy would make the host wait for it.
        rows = self.rows[: len(keep)]
        rows.copy_(self.host_rows[: len(keep)], non_blocking=True)
        return out[rows]
