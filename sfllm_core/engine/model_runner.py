"""ModelRunner: turns a scheduled batch into tensors, runs the model, returns last-token logits.

Sequences that ask for prompt logprobs also get the logprobs of their prompt positions in the
chunk, gathered from those rows alone, so nobody else's step computes more than last-token logits.

On CUDA, pure-decode steps replay CUDA graphs captured at start for a ladder of batch sizes: the
batch is padded up to the next captured size, padding rows write their K/V into a scratch page
the pool never hands out, and their logits are dropped. A lone prefill chunk (alone, or after
such decodes) replays a graph of its own, padded likewise (engine/prefill_graphs.py). Larger
batches and other prefills run eagerly.
"""

import logging
import time
from dataclasses import replace

import numpy as np
import torch

from sfllm_core.distributed.parallel_state import TensorParallel
from sfllm_core.engine.memory_pool import MemoryPool
from sfllm_core.engine.prefill_graphs import MAX_GRAPH_TOKENS, PrefillGraphs, prefill_lengths
from sfllm_core.engine.ranks import Followers, broadcast_pending
from sfllm_core.engine.request_sequence import PENDING_TOKEN, RequestSequence
from sfllm_core.engine.scheduler import ScheduledBatch
from sfllm_core.engine.verify_graphs import VerifyGraphs
from sfllm_core.layers.attention import AttentionBackend, BatchMetadata
from sfllm_core.models.common import ForwardContext
from sfllm_core.models.eagle3 import concat_aux
from sfllm_core.outputs import TokenLogprob

logger = logging.getLogger("sfllm.runner")

# Prompt logits are computed this many elements ([rows, vocab], float32) at a time: an 8k-token
# chunk over a 152k vocabulary at once would take 5 GB.
PROMPT_LOGITS_ELEMENTS = 1 << 25


def graph_batch_sizes(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then steps of 8 to 64, of 16 to 256, of 32 beyond, up to max_batch."""
    sizes, size = [], 1
    while size <= max_batch:
        sizes.append(size)
        size = size * 2 if size < 8 else size + (8 if size < 64 else 16 if size < 256 else 32)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class _DecodeGraphs:
    """Static input buffers and one captured graph per ladder size."""

    def __init__(self, runner: "ModelRunner", max_batch: int, max_pages: int) -> None:
        dev = runner.device
        self.sizes = graph_batch_sizes(max_batch)
        self.max_pages = max_pages
        n = self.sizes[-1]
        # The per-row inputs live in one tensor, so that a step sends them in one copy (a copy costs
        # the host more than the data does). Rows, as host_inputs below: ids, positions, slots, (spare),
        # where a pending token (sampled last step, still on the GPU) comes from and whether it is
        # pending, and the sliding-window layers' slots.
        self.inputs = torch.zeros(7, n, dtype=torch.int64, device=dev)
        self.input_ids, self.positions, self.slot_mapping = self.inputs[0], self.inputs[1], self.inputs[2]
        self.token_src, self.token_pending = self.inputs[4], self.inputs[5]
        self.prev_tokens = torch.zeros(n, dtype=torch.int64, device=dev)  # last step's sampled ids, copied in
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)  # positions + 1, computed in the graph
        self.page_table = torch.zeros(n, max_pages, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=dev)
        # Page-locked host mirrors, filled in place each step (pinning memory per step costs more
        # than the whole replay of a small model). Two sets, used in turn: with overlapped steps
        # the copies out of one set may still be queued while the next step fills the other.
        self.host_inputs = torch.zeros(2, 7, n, dtype=torch.int64, pin_memory=True)
        self.host_table = torch.zeros(2, n, max_pages, dtype=torch.int32, pin_memory=True)
        # The sliding-window layers' own page table and slots (MemoryPool's window group).
        self.windowed = runner.pool.window is not None
        if self.windowed:
            self.window_slot_mapping = self.inputs[6]
            self.window_page_table = torch.zeros(n, max_pages, dtype=torch.int32, device=dev)
            self.host_window_table = torch.zeros(2, n, max_pages, dtype=torch.int32, pin_memory=True)
        self.turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def meta(self, size: int, page_size: int, max_seq_len: int) -> BatchMetadata:
        meta = BatchMetadata(
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            page_table=self.page_table[:size],
            logits_indices=self.logits_indices[:size],
            page_size=page_size,
            num_decodes=size,
            max_query_len=1,
            max_seq_len=max_seq_len,
        )
        if self.windowed:
            meta.window = replace(
                meta,
                slot_mapping=self.window_slot_mapping[:size],
                page_table=self.window_page_table[:size],
                backend_state={},
            )
        return meta


class ModelRunner:
    """Owns the model, the attention backend and the device side of a step."""

    def __init__(
        self,
        model: torch.nn.Module,
        pool: MemoryPool,
        backend: AttentionBackend,
        device: torch.device,
        max_context_length: int,
        cuda_graph_max_batch: int = 0,
        prefill_graph_max_tokens: int = 0,
    ) -> None:
        self.model = model
        self.pool = pool
        self.backend = backend
        self.device = device
        self.max_context_length = max_context_length
        self.graphs: _DecodeGraphs | None = None
        if device.type == "cuda" and cuda_graph_max_batch > 0:
            self._capture(cuda_graph_max_batch)
        self.verify: VerifyGraphs | None = None  # fixed-shape verify steps (speculative decoding)
        self.tp: TensorParallel | None = None
        self.followers: Followers | None = None  # rank 0 of a tensor-parallel engine: the other ranks
        self.prefill: PrefillGraphs | None = None  # one sequence's prefill chunk (engine/prefill_graphs.py)
        if device.type == "cuda" and prefill_graph_max_tokens > 1 and self.graphs is not None:
            self.enable_prefill_graphs(prefill_graph_max_tokens)

    def use_tensor_parallel(self, tp: TensorParallel, followers: "Followers | None") -> None:
        """One rank of a tensor-parallel engine: rank 0 (with followers) sends every step to the others
        before running it; a follower runs the steps rank 0 sends, and computes no prompt logprobs."""
        self.tp, self.followers = tp, followers

    def enable_prefill_graphs(self, max_tokens: int) -> None:
        """Run a lone prefill chunk of up to max_tokens (capped at MAX_GRAPH_TOKENS) padded to a
        captured length: from CUDA graphs (captured here) on CUDA, eagerly elsewhere (for tests)."""
        max_pages = -(-self.max_context_length // self.pool.page_size)
        max_tokens = min(max_tokens, MAX_GRAPH_TOKENS, self.max_context_length)
        self.prefill = PrefillGraphs(self, prefill_lengths(max_tokens), max_pages)
        if self.device.type == "cuda":
            self.prefill.capture()

    def enable_verify_graphs(self, tokens_per_seq: int, max_batch: int, aux_layers: tuple[int, ...] = ()) -> None:
        """Run verify steps of up to max_batch decoding sequences padded to tokens_per_seq each,
        from CUDA graphs (captured here) on CUDA, eagerly elsewhere (where tests check the padding).
        With aux_layers, they also hand out those layers' hidden states (see execute_aux)."""
        max_pages = -(-self.max_context_length // self.pool.page_size)
        self.verify = VerifyGraphs(self, graph_batch_sizes(max_batch), tokens_per_seq, max_pages, aux_layers)
        if self.device.type == "cuda":
            self.verify.capture()

    # ---- batch preparation --------------------------------------------------------------------

    def prepare(self, batch: ScheduledBatch) -> tuple[torch.Tensor, BatchMetadata, list[int]]:
        """Flat input ids, batch metadata, and the batch rows whose last token is sampled this step."""
        page_size = self.pool.page_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        sample_rows: list[int] = []
        logits_indices: list[int] = []
        max_pages = max(len(s.pages) for s in batch.seqs)
        page_table = np.stack([s.page_row[:max_pages] for s in batch.seqs])
        windowed = self.pool.window is not None
        window_slots: list[int] = []
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            drafts = seq.draft_ids
            input_ids += seq.token_ids[start : start + n]
            if drafts:  # a verify step: the last token, then the drafts
                input_ids += drafts
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(seq.pages[pos // page_size] * page_size + pos % page_size)
                if windowed:
                    window_slots.append(int(seq.window_row[pos // page_size]) * page_size + pos % page_size)
            query_start.append(query_start[-1] + n)
            seq_lens.append(start + n)
            query_lens.append(n)
            if start + n == seq.num_tokens + len(drafts):
                sample_rows.append(row)
                # A verified sequence gets a row of logits per fed token: each checks the next draft.
                logits_indices += range(query_start[-1] - 1 - len(drafts), query_start[-1])
        num_decodes = sum(1 for n in batch.num_new_tokens if n == 1)
        dev = self.device

        def tensor(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(dev)

        meta = BatchMetadata(
            positions=tensor(positions, torch.int64),
            slot_mapping=tensor(slots, torch.int64),
            query_start_loc=tensor(query_start, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            page_table=torch.from_numpy(page_table).to(dev),
            logits_indices=tensor(logits_indices, torch.int64),
            page_size=page_size,
            num_decodes=num_decodes,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            seq_lens_cpu=seq_lens,
            query_lens_cpu=query_lens,
        )
        if windowed:
            window_table = np.stack([s.window_row[:max_pages] for s in batch.seqs])
            meta.window = replace(
                meta,
                page_table=torch.from_numpy(window_table).to(dev),
                slot_mapping=tensor(window_slots, torch.int64),
                backend_state={},
            )
        return tensor(input_ids, torch.int64), meta, sample_rows

    # ---- execution ----------------------------------------------------------------------------

    @torch.inference_mode()
    def execute(
        self,
        batch: ScheduledBatch,
        pending_tokens: torch.Tensor | None = None,
        pending_rows: dict[int, int] | None = None,
    ) -> tuple[torch.Tensor | None, list[int]]:
        """Run one step; returns logits [rows, vocab] (float32) and sample_rows.

        Logits come one row per sampled sequence, in sample_rows' order, or 1 + len(draft_ids)
        consecutive rows for a sequence with drafts (a verify step).

        A sequence whose next input is PENDING_TOKEN takes it from pending_tokens (last step's
        sampled ids, still on the device) at row pending_rows[id(seq)]; only graph replays do that.
        A sequence that needs prompt logits gets this chunk's prompt logprobs appended to its
        prompt_logprobs (graph replays are decodes: they never need any).
        """
        if self.followers is not None:  # the other ranks run this same step (engine/ranks.py)
            self.followers.send(batch, pending_tokens, pending_rows)
            pending_tokens = broadcast_pending(
                self.tp, pending_tokens, 0 if pending_tokens is None else len(pending_tokens)
            )
        if self.graphs is not None and self.graph_fits(batch):
            return self._replay(batch, pending_tokens, pending_rows), list(range(len(batch.seqs)))
        if self.verify is not None and any(s.draft_ids for s in batch.seqs) and self.verify.fits(batch):
            return self.verify.run(batch), list(range(len(batch.seqs)))
        if self.prefill is not None and self._prefill_fits(batch):
            return self._replay_prefill(batch)
        input_ids, meta, sample_rows = self.prepare(batch)
        self.backend.prepare(meta)
        if meta.window is not None:
            self.backend.prepare(meta.window)
        ctx = ForwardContext(self.backend, meta, self.pool.kv_caches)
        hidden = self.model(input_ids, meta.positions, ctx)
        self._prompt_logprobs(batch, hidden)
        if not sample_rows or (self.tp is not None and not self.tp.is_leader):  # only rank 0 samples
            return None, sample_rows
        return self.model.compute_logits(hidden[meta.logits_indices]), sample_rows

    def _prefill_fits(self, batch: ScheduledBatch) -> bool:
        """One prefill chunk a graph can run, after decodes the decode graphs can (or none)."""
        seq, n = batch.seqs[-1], batch.num_new_tokens[-1]
        if not self.prefill.fits(seq, n):
            return False
        return len(batch.seqs) == 1 or self.graph_fits(ScheduledBatch(batch.seqs[:-1], batch.num_new_tokens[:-1]))

    def _replay_prefill(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[int]]:
        seq, n = batch.seqs[-1], batch.num_new_tokens[-1]
        b = len(batch.seqs) - 1
        parts = []
        if b:
            parts.append(self._replay(ScheduledBatch(batch.seqs[:-1], batch.num_new_tokens[:-1]), None, None))
            self.prefill.num_joined += 1
        logits = self.prefill.run(seq, n)
        rows = list(range(b))
        if seq.num_computed_tokens + n == seq.num_tokens:  # the chunk ends the prompt: its token is sampled
            parts.append(logits)
            rows.append(b)
        if not parts:
            return None, rows
        return (parts[0] if len(parts) == 1 else torch.cat(parts)), rows

    def _prompt_logprobs(self, batch: ScheduledBatch, hidden: torch.Tensor) -> None:
        """Log-softmax at each prompt position of the chunk for the prompt token after it, with its top-k."""
        if self.tp is not None and not self.tp.is_leader:
            return  # rank 0 samples and reports; the others only keep their K/V
        rows: list[int] = []  # rows of hidden
        targets: list[int] = []
        owners: list[tuple[RequestSequence, int]] = []  # (sequence, how many of the rows are its)
        offset = 0
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if seq.needs_prompt_logits:
                start, done = seq.num_computed_tokens, len(seq.prompt_logprobs)
                assert start <= done, "prompt logprobs need every prompt position computed (no prefix cache)"
                # Position i predicts token i + 1; a recompute after preemption skips the ones it has.
                first, last = max(start, done), min(start + n, seq.num_prompt_tokens - 1)
                if first < last:
                    rows += range(offset + first - start, offset + last - start)
                    targets += seq.prompt_token_ids[first + 1 : last + 1]
                    owners.append((seq, last - first))
            offset += n
        if not rows:
            return
        dev = hidden.device
        index = torch.tensor(rows, dtype=torch.int64, device=dev)
        target = torch.tensor(targets, dtype=torch.int64, device=dev)
        k = max(seq.params.prompt_logprobs for seq, _ in owners)
        step = max(1, PROMPT_LOGITS_ELEMENTS // self.model.lm_head.weight.shape[0])
        chosen, top_values, top_ids = [], [], []
        for s in range(0, len(rows), step):
            logits = self.model.compute_logits(hidden[index[s : s + step]]).float()
            lse = torch.logsumexp(logits, dim=-1, keepdim=True)
            chosen.append((logits.gather(1, target[s : s + step, None]) - lse).squeeze(1))
            if k:
                values, ids = logits.topk(k, dim=-1)
                top_values.append(values - lse)
                top_ids.append(ids)
        chosen_list = torch.cat(chosen).tolist()
        values_list = torch.cat(top_values).tolist() if k else [[]] * len(rows)
        ids_list = torch.cat(top_ids).tolist() if k else [[]] * len(rows)
        i = 0
        for seq, count in owners:
            seq_k = seq.params.prompt_logprobs
            seq.prompt_logprobs.extend(
                TokenLogprob(targets[j], chosen_list[j], list(zip(ids_list[j][:seq_k], values_list[j][:seq_k])))
                for j in range(i, i + count)
            )
            i += count

    @torch.inference_mode()
    def execute_aux(
        self, batch: ScheduledBatch, aux_layers: tuple[int, ...]
    ) -> tuple[torch.Tensor | None, list[int], torch.Tensor, list[int]]:
        """`execute`, also handing out the residual stream entering aux_layers (an EAGLE-3 head's).

        Returns logits and sample_rows as `execute` does, the hidden states [rows, 3 x hidden]
        (concatenated in aux_layers' order) and the row of each batch sequence's first fed token.
        Decode graphs never hand them out: such steps run as verify steps (graphs captured with
        aux_layers) or eagerly.
        """
        if self.verify is not None and self.verify.aux_layers == aux_layers and self.verify.fits(batch):
            logits = self.verify.run(batch)
            return (
                logits,
                list(range(len(batch.seqs))),
                self.verify.last_aux,
                [i * self.verify.q for i in range(len(batch))],
            )
        input_ids, meta, sample_rows = self.prepare(batch)
        self.backend.prepare(meta)
        if meta.window is not None:
            self.backend.prepare(meta.window)
        ctx = ForwardContext(self.backend, meta, self.pool.kv_caches, aux_layers=aux_layers)
        hidden = self.model(input_ids, meta.positions, ctx)
        self._prompt_logprobs(batch, hidden)
        starts = np.cumsum([0] + batch.num_new_tokens[:-1]).tolist()
        aux = concat_aux(aux_layers, ctx.aux_hidden)
        if not sample_rows:
            return None, sample_rows, aux, starts
        return self.model.compute_logits(hidden[meta.logits_indices]), sample_rows, aux, starts

    def graph_fits(self, batch: ScheduledBatch) -> bool:
        """A pure decode batch no larger than the largest captured graph."""
        return (
            self.graphs is not None
            and len(batch.seqs) <= self.graphs.sizes[-1]
            and all(n == 1 for n in batch.num_new_tokens)
            and all(s.num_computed_tokens + 1 == s.num_tokens for s in batch.seqs)
        )

    def _replay(
        self, batch: ScheduledBatch, pending_tokens: torch.Tensor | None, pending_rows: dict[int, int] | None
    ) -> torch.Tensor:
        g = self.graphs
        b = len(batch.seqs)
        size = next(s for s in g.sizes if s >= b)
        page_size = self.pool.page_size
        scratch = self.pool.scratch_page
        g.turn ^= 1
        host_inputs, host_table = g.host_inputs[g.turn], g.host_table[g.turn]
        inputs, table = host_inputs.numpy(), host_table.numpy()
        pool = self.pool
        if g.windowed:
            host_window_table = g.host_window_table[g.turn]
            window_table = host_window_table.numpy()
            window_scratch = pool.window_scratch_page
        # Column by column: one list per field, then one numpy write each (a per-row loop of numpy
        # scalar writes cost ~1 ms per step at batch 256, which is a third of a small model's step).
        seqs = batch.seqs
        pos = [s.num_computed_tokens for s in seqs]
        tokens = [s.token_ids[p] for s, p in zip(seqs, pos)]
        positions = np.array(pos, dtype=np.int64)
        offsets = positions % page_size
        inputs[1, :b] = positions
        inputs[2, :b] = np.array([s.pages[p // page_size] for s, p in zip(seqs, pos)]) * page_size + offsets
        any_pending = PENDING_TOKEN in tokens
        if any_pending:  # the graph takes these rows' ids from last step's output (prev_tokens)
            pending = np.array([t == PENDING_TOKEN for t in tokens])
            inputs[0, :b] = np.where(pending, 0, tokens)
            inputs[4, :b] = [pending_rows[id(s)] if t == PENDING_TOKEN else 0 for s, t in zip(seqs, tokens)]
            inputs[5, :b] = pending
        else:
            inputs[0, :b] = tokens
            inputs[4:6, :b] = 0
        # Whole rows, copied in C: the page lists are never walked here (contexts are long).
        np.stack([s.page_row for s in seqs], out=table[:b])
        if g.windowed:
            np.stack([s.window_row for s in seqs], out=window_table[:b])
            inputs[6, :b] = window_table[np.arange(b), positions // page_size] * page_size + offsets
        inputs[:6, b:size] = ((0,), (0,), (scratch * page_size,), (0,), (0,), (0,))
        table[b:size] = scratch
        if g.windowed:
            inputs[6, b:size] = window_scratch * page_size
            window_table[b:size] = window_scratch
            g.window_page_table[:size].copy_(host_window_table[:size], non_blocking=True)
        g.inputs.copy_(host_inputs, non_blocking=True)
        g.page_table[:size].copy_(host_table[:size], non_blocking=True)
        if any_pending:
            g.prev_tokens[: len(pending_tokens)].copy_(pending_tokens)
        g.graphs[size].replay()
        return g.outputs[size][:b]

    def _capture(self, max_batch: int) -> None:
        start = time.perf_counter()
        max_pages = -(-self.max_context_length // self.pool.page_size)
        g = _DecodeGraphs(self, max_batch, max_pages)
        self.graphs = g
        scratch = self.pool.scratch_page
        g.page_table.fill_(scratch)
        g.slot_mapping.fill_(scratch * self.pool.page_size)
        if g.windowed:
            g.window_page_table.fill_(self.pool.window_scratch_page)
            g.window_slot_mapping.fill_(self.pool.window_scratch_page * self.pool.page_size)
        for size in reversed(g.sizes):
            meta = g.meta(size, self.pool.page_size, self.max_context_length)

            def run(meta=meta, size=size) -> torch.Tensor:
                # In the graph, so the host sends neither: the lengths, and last step's ids where pending.
                g.seq_lens[:size].copy_(g.positions[:size] + 1)
                pending = g.token_pending[:size] != 0
                input_ids = torch.where(pending, g.prev_tokens[g.token_src[:size]], g.input_ids[:size])
                self.backend.prepare(meta)
                if meta.window is not None:
                    self.backend.prepare(meta.window)
                ctx = ForwardContext(self.backend, meta, self.pool.kv_caches)
                hidden = self.model(input_ids, meta.positions, ctx)
                return self.model.compute_logits(hidden)

            with torch.inference_mode():
                run()  # warm up: compiles kernels and settles allocations outside the capture
                torch.cuda.synchronize(self.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=g.pool):
                    g.outputs[size] = run()
            g.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        logger.info(
            "captured %d decode CUDA graphs (batch %d..%d) in %.1f s",
            len(g.sizes),
            g.sizes[0],
            g.sizes[-1],
            time.perf_counter() - start,
        )
        self.capture_seconds = time.perf_counter() - start
