"""EAGLE-3 drafts: a one-layer draft head reads the target's hidden states and drafts a chain of tokens.

Chain drafting, greedy (topk 1): every draft is the head's argmax, a point-mass proposal, so the
verify step's acceptance rule (engine/speculative.py) keeps greedy and seeded outputs exactly.

The head keeps its own K/V, one layer's worth, in tensors of its own that follow the target's
pages: the K/V of a sequence's position p sits in the slot of p in the sequence's page table. So
the head needs no page of its own, and when the target gives rejected drafts' pages back
(MemoryPool.truncate) nothing of the head's is left holding one.

Per sequence, with L tokens known after a step (the last one just sampled):
- catch-up, right after every target step that ran with the target's hidden states (an "aux
  step"): one row per position p the step kept, (token p + 1, the target's hidden state at p);
  it writes the head's K/V of those positions, and its last row (p = L - 2, whose token is the one
  just sampled) gives the first draft d1 and the head's own hidden state g1;
- drafting, in the next step once the scheduler has given the verify step its pages: rows at
  positions L - 1, L, ... of (d_j, g_j), each giving d_(j+1). Those K/V are the head's guesses;
  the next catch-up writes the true rows over them. On CUDA those passes replay graphs captured
  at the batch ladder (`_DraftPasses`); the catch-up runs eagerly.

Steps with more decoding sequences than speculative_max_batch run as without speculation (decode
graphs, no hidden states read out): the head's K/V of those positions stay unwritten (stale), which
lowers later acceptance for the sequences that lived through them but never changes a token.
"""

import logging
import time

import numpy as np
import torch

from sfllm_core.engine.model_runner import graph_batch_sizes
from sfllm_core.engine.request_sequence import RequestSequence
from sfllm_core.engine.speculative import DraftProposer
from sfllm_core.layers.attention import AttentionBackend, BatchMetadata
from sfllm_core.models.common import ForwardContext
from sfllm_core.models.eagle3 import Eagle3DraftModel

logger = logging.getLogger("sfllm.engine")

# Stands in draft_ids between proposing (how many drafts) and drafting (which ones), once the
# scheduler has given the verify step its pages.
PLACEHOLDER = 0


class _HeadState:
    """Per sequence: the first draft and the head's hidden state after it, valid at num_tokens == length."""

    __slots__ = ("length", "first", "hidden")

    def __init__(self, length: int, first: int, hidden: torch.Tensor) -> None:
        self.length, self.first, self.hidden = length, first, hidden


class _DraftPasses:
    """Drafting passes (one row per sequence) on static buffers at a ladder of batch sizes, replayed
    from CUDA graphs on CUDA (an eager pass launches some 40 small kernels from the host); on the CPU
    the same buffers run eagerly. Padding rows sit at position 0 on the scratch page."""

    def __init__(self, proposer: "Eagle3Proposer", sizes: list[int], max_pages: int, max_seq_len: int) -> None:
        self.proposer, self.sizes, self.max_seq_len = proposer, sizes, max_seq_len
        dev, n = proposer.device, sizes[-1]
        head = proposer.head
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.hidden = torch.zeros(n, head.hidden_size, dtype=proposer.kv[0].dtype, device=dev)
        self.inputs = torch.zeros(3, n, dtype=torch.int64, device=dev)  # positions, slots, seq_lens
        self.seq_lens = torch.ones(n, dtype=torch.int32, device=dev)
        # Until a pass fills them, every row writes to and reads from the scratch page (the warm-up and capture).
        self.page_table = torch.full((n, max_pages), proposer.scratch_page, dtype=torch.int32, device=dev)
        self.inputs[1].fill_(proposer.scratch_page * proposer.page_size)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.logits_indices = torch.arange(n, dtype=torch.int64, device=dev)
        pinned = dev.type == "cuda"
        self.host_inputs = torch.zeros(3, n, dtype=torch.int64, pin_memory=pinned)
        self.host_table = torch.zeros(n, max_pages, dtype=torch.int32, pin_memory=pinned)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.num_passes = 0

    def meta(self, size: int, seq_lens_cpu: list[int] | None = None) -> BatchMetadata:
        return BatchMetadata(
            positions=self.inputs[0, :size],
            slot_mapping=self.inputs[1, :size],
            query_start_loc=self.query_start_loc[: size + 1],
            seq_lens=self.seq_lens[:size],
            page_table=self.page_table[:size],
            logits_indices=self.logits_indices[:size],
            page_size=self.proposer.page_size,
            num_decodes=size,
            max_query_len=1,
            max_seq_len=self.max_seq_len,
            seq_lens_cpu=seq_lens_cpu or [],
            query_lens_cpu=[1] * size if seq_lens_cpu else [],
        )

    def _forward(self, size: int, meta: BatchMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.proposer
        self.seq_lens[:size].copy_(self.inputs[2, :size])  # int32, in the graph
        p.backend.prepare(meta)
        ctx = ForwardContext(p.backend, meta, [])
        normed, prenorm = p.head(self.ids[:size], meta.positions, self.hidden[:size], ctx, p.kv)
        return p.head.greedy_tokens(normed), prenorm

    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.sizes):
            meta = self.meta(size)
            with torch.inference_mode():
                self._forward(size, meta)  # warm up: compiles kernels outside the capture
                torch.cuda.synchronize(self.proposer.device)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[size] = self._forward(size, meta)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.proposer.device)

    def fits(self, count: int) -> bool:
        return count <= self.sizes[-1]

    def run(
        self, seqs: list[RequestSequence], positions: list[int], tokens: torch.Tensor, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: each sequence's row at its position, fed its last draft; (next drafts, hidden states)."""
        p, b = self.proposer, len(seqs)
        size = next(s for s in self.sizes if s >= b)
        page_size, scratch = p.page_size, p.scratch_page
        inputs, table = self.host_inputs.numpy(), self.host_table.numpy()
        pos = np.array(positions, dtype=np.int64)
        np.stack([s.page_row for s in seqs], out=table[:b])
        inputs[0, :b] = pos
        inputs[1, :b] = table[np.arange(b), pos // page_size].astype(np.int64) * page_size + pos % page_size
        inputs[2, :b] = pos + 1
        inputs[:, b:size] = ((0,), (scratch * page_size,), (1,))
        table[b:size] = scratch
        self.inputs[:, :size].copy_(self.host_inputs[:, :size], non_blocking=True)
        self.page_table[:size].copy_(self.host_table[:size], non_blocking=True)
        self.ids[:b].copy_(tokens)
        self.hidden[:b].copy_(hidden)
        self.num_passes += 1
        if size in self.graphs:
            self.graphs[size].replay()
            out = self.outputs[size]
        else:
            out = self._forward(size, self.meta(size, (pos + 1).tolist() + [1] * (size - b)))
        return out[0][:b].clone(), out[1][:b].clone()


class Eagle3Proposer(DraftProposer):
    """Chain drafts of up to k tokens from an EAGLE-3 head over the target's hidden states."""

    needs_aux = True  # the engine reads the target's hidden states out in the steps it drafts for

    def __init__(
        self,
        num_speculative_tokens: int,
        head: Eagle3DraftModel,
        backend: AttentionBackend,
        num_slots: int,
        page_size: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        super().__init__(num_speculative_tokens)
        self.head = head
        self.backend = backend
        self.page_size = page_size
        self.device = device
        shape = (num_slots, head.num_kv_heads, head.head_dim)
        self.kv = (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        self.scratch_page = num_slots // page_size - 1  # the pool's: never handed out
        self.passes: _DraftPasses | None = None  # drafting passes on static buffers (enable_graphs)
        self.num_head_forwards = 0  # draft head passes run (catch-ups and drafting steps)
        self.head_seconds = 0.0  # host time spent in them (the device's too where it synchronises)

    # ---- the DraftProposer interface ------------------------------------------------------------

    def draft(self, seq: RequestSequence, limit: int) -> list[int]:
        """Placeholders for as many drafts as the head can make now (the tokens come in fill_drafts)."""
        state = seq.drafter_state.get("eagle3") if seq.drafter_state else None
        if state is None or state.length != seq.num_tokens or limit <= 0:
            return []
        return [PLACEHOLDER] * min(limit, self.k)

    def propose(self, seq: RequestSequence, limit: int) -> list[int]:
        # No first draft yet (a step without hidden states came between) is no miss: don't back off.
        return self.draft(seq, min(limit, self.k)) if limit > 0 else []

    def enable_graphs(self, max_batch: int, max_pages: int, max_seq_len: int) -> None:
        """Run drafting passes of up to max_batch sequences on static buffers: from CUDA graphs
        (captured here) on CUDA, eagerly elsewhere (where tests check the padding)."""
        self.passes = _DraftPasses(self, graph_batch_sizes(max_batch), max_pages, max_seq_len)
        if self.device.type == "cuda":
            self.passes.capture()

    # ---- the head's passes ----------------------------------------------------------------------

    def _meta(self, seqs: list[RequestSequence], firsts: list[int], counts: list[int]) -> BatchMetadata:
        page_size = self.page_size
        positions: list[int] = []
        slots: list[int] = []
        seq_lens = [f + n for f, n in zip(firsts, counts)]
        max_pages = -(-max(seq_lens) // page_size)
        for seq, first, n in zip(seqs, firsts, counts):
            pos = np.arange(first, first + n)
            positions += pos.tolist()
            slots += (seq.page_row[pos // page_size].astype(np.int64) * page_size + pos % page_size).tolist()
        query_start = np.concatenate([[0], np.cumsum(counts)]).tolist()
        dev = self.device
        decode = all(n == 1 for n in counts)
        return BatchMetadata(
            positions=torch.tensor(positions, dtype=torch.int64).to(dev),
            slot_mapping=torch.tensor(slots, dtype=torch.int64).to(dev),
            query_start_loc=torch.tensor(query_start, dtype=torch.int32).to(dev),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32).to(dev),
            page_table=torch.from_numpy(np.stack([s.page_row[:max_pages] for s in seqs])).to(dev),
            logits_indices=torch.tensor(np.array(query_start[1:]) - 1, dtype=torch.int64).to(dev),
            page_size=page_size,
            num_decodes=len(seqs) if decode else 0,
            max_query_len=max(counts),
            max_seq_len=max(seq_lens),
            seq_lens_cpu=seq_lens,
            query_lens_cpu=list(counts),
        )

    def _run(self, input_ids: "list[int] | torch.Tensor", hidden: torch.Tensor, meta: BatchMetadata):
        start = time.perf_counter()
        self.backend.prepare(meta)
        ids = input_ids if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, dtype=torch.int64)
        ids = ids.to(self.device)
        normed, prenorm = self.head(ids, meta.positions, hidden, ForwardContext(self.backend, meta, []), self.kv)
        self.num_head_forwards += 1
        self.head_seconds += time.perf_counter() - start
        return normed, prenorm

    @torch.inference_mode()
    def catch_up(self, entries: list[tuple[RequestSequence, int, torch.Tensor]]) -> None:
        """Feed the head the rows a target step kept: (seq, first position, the target's hidden
        states [n, 3 x hidden] at first..first + n - 1). Sequences whose last row is their newest
        position get their first draft for the next step."""
        if not entries:
            return
        seqs = [e[0] for e in entries]
        firsts = [e[1] for e in entries]
        counts = [e[2].shape[0] for e in entries]
        input_ids: list[int] = []
        for seq, first, n in zip(seqs, firsts, counts):
            input_ids += seq.token_ids[first + 1 : first + n + 1]
        meta = self._meta(seqs, firsts, counts)
        hidden = torch.cat([e[2] for e in entries]) if len(entries) > 1 else entries[0][2]
        normed, prenorm = self._run(input_ids, hidden, meta)
        last = meta.logits_indices
        boundary = [i for i, (s, f, n) in enumerate(zip(seqs, firsts, counts)) if f + n == s.num_tokens - 1]
        if not boundary:
            return
        rows = last[torch.tensor(boundary, dtype=torch.int64, device=last.device)]
        firsts_drafted = self.head.greedy_tokens(normed[rows]).tolist()
        hidden_rows = prenorm[rows]
        for j, i in enumerate(boundary):
            seq = seqs[i]
            if seq.drafter_state is None:
                seq.drafter_state = {}
            seq.drafter_state["eagle3"] = _HeadState(seq.num_tokens, firsts_drafted[j], hidden_rows[j])

    @torch.inference_mode()
    def fill_drafts(self, seqs: list[RequestSequence]) -> None:
        """Replace the placeholder drafts of scheduled sequences by the head's chain of drafts."""
        drafted = [s for s in seqs if s.draft_ids]
        if not drafted:
            return
        states = [s.drafter_state["eagle3"] for s in drafted]
        for seq, state in zip(drafted, states):
            seq.draft_ids[0] = state.first
        hidden = torch.stack([st.hidden for st in states])
        tokens = torch.tensor([st.first for st in states], dtype=torch.int64).to(self.device)
        live = list(range(len(drafted)))
        # Each pass feeds the last pass's drafts straight from the device: one read-back at the end.
        out: list[tuple[list[int], torch.Tensor]] = []
        for j in range(1, max(len(s.draft_ids) for s in drafted)):
            keep = [i for i, r in enumerate(live) if len(drafted[r].draft_ids) > j]
            if len(keep) < len(live):
                index = torch.tensor(keep, dtype=torch.int64, device=hidden.device)
                hidden, tokens = hidden[index], tokens[index]
                live = [live[i] for i in keep]
            group = [drafted[r] for r in live]
            # Row j of a sequence with L tokens sits at position L - 2 + j and feeds draft j.
            positions = [s.num_tokens - 2 + j for s in group]
            if self.passes is not None and self.passes.fits(len(group)):
                tokens, hidden = self.passes.run(group, positions, tokens, hidden)
            else:
                normed, hidden = self._run(tokens, hidden, self._meta(group, positions, [1] * len(group)))
                tokens = self.head.greedy_tokens(normed)
            out.append((live, tokens))
        for j, (rows, drafts) in enumerate(out, start=1):
            for r, token in zip(rows, drafts.tolist()):
                drafted[r].draft_ids[j] = token
