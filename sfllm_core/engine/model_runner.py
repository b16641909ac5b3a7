"""ModelRunner: turns a scheduled batch into tensors, runs the model, returns last-token logits."""

import torch

from sfllm_core.engine.memory_pool import MemoryPool
from sfllm_core.engine.scheduler import ScheduledBatch
from sfllm_core.layers.attention import AttentionBackend, BatchMetadata
from sfllm_core.models.common import ForwardContext


class ModelRunner:
    """Owns the model, the attention backend and the device side of a step."""

    def __init__(self, model: torch.nn.Module, pool: MemoryPool, backend: AttentionBackend, device: torch.device):
        self.model = model
        self.pool = pool
        self.backend = backend
        self.device = device

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
        page_table = [s.pages + [0] * (max_pages - len(s.pages)) for s in batch.seqs]
        for row, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + n]
            for pos in range(start, start + n):
                positions.append(pos)
                slots.append(seq.pages[pos // page_size] * page_size + pos % page_size)
            query_start.append(query_start[-1] + n)
            seq_lens.append(start + n)
            query_lens.append(n)
            if start + n == seq.num_tokens:
                sample_rows.append(row)
                logits_indices.append(query_start[-1] - 1)
        num_decodes = sum(1 for n in batch.num_new_tokens if n == 1)
        dev = self.device

        def tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        meta = BatchMetadata(
            positions=tensor(positions, torch.int64),
            slot_mapping=tensor(slots, torch.int64),
            query_start_loc=tensor(query_start, torch.int32),
            seq_lens=tensor(seq_lens, torch.int32),
            page_table=tensor(page_table, torch.int32).view(len(batch.seqs), max_pages),
            logits_indices=tensor(logits_indices, torch.int64),
            page_size=page_size,
            num_decodes=num_decodes,
            max_query_len=max(query_lens),
            max_seq_len=max(seq_lens),
            seq_lens_cpu=seq_lens,
            query_lens_cpu=query_lens,
        )
        return tensor(input_ids, torch.int64), meta, sample_rows

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, list[int]]:
        """Run one step; returns logits [len(sample_rows), vocab] (float32) and sample_rows."""
        input_ids, meta, sample_rows = self.prepare(batch)
        self.backend.prepare(meta)
        ctx = ForwardContext(self.backend, meta, self.pool.kv_caches)
        hidden = self.model(input_ids, meta.positions, ctx)
        if not sample_rows:
            return None, sample_rows
        return self.model.compute_logits(hidden[meta.logits_indices]), sample_rows
