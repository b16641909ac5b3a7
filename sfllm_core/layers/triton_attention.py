"""Paged attention on CUDA through the Triton kernels: decode and extend, CUDA-graph safe for decode."""

from dataclasses import dataclass

import torch

from sfllm_core.kernels.decode_attention import decode_attention, decode_num_splits
from sfllm_core.kernels.extend_attention import extend_attention
from sfllm_core.kernels.kv_write import kv_write
from sfllm_core.kernels.qk_norm_rope import qk_norm_rope
from sfllm_core.layers.attention import AttentionBackend, BatchMetadata


@dataclass
class _StepViews:
    """The decode and extend parts of one step's metadata, sliced once and shared by all layers."""

    num_decodes: int
    num_extends: int
    decode_seq_lens: torch.Tensor
    decode_page_table: torch.Tensor
    extend_query_start_loc: torch.Tensor
    extend_seq_lens: torch.Tensor
    extend_page_table: torch.Tensor


class TritonAttention(AttentionBackend):
    """Decode kernel for the first num_decodes sequences, extend kernel for the rest.

    max_context_length bounds the contexts a captured decode graph may replay with; it alone sizes
    the decode split count, so a pure-decode forward reads no host copies of per-step data.
    """

    def __init__(self, max_context_length: int) -> None:
        self.max_context_length = max_context_length
        self._splits: dict[tuple[int, int, int | None, torch.device], int] = {}

    def prepare(self, meta: BatchMetadata) -> None:
        # Only tensor shapes and num_decodes: safe while a CUDA graph is being captured.
        nd = meta.num_decodes
        meta.backend_state["triton"] = _StepViews(
            num_decodes=nd,
            num_extends=meta.seq_lens.shape[0] - nd,
            decode_seq_lens=meta.seq_lens[:nd],
            decode_page_table=meta.page_table[:nd],
            extend_query_start_loc=meta.query_start_loc[nd:],
            extend_seq_lens=meta.seq_lens[nd:],
            extend_page_table=meta.page_table[nd:],
        )

    def _num_splits(self, batch: int, num_kv_heads: int, sliding_window: int | None, device: torch.device) -> int:
        key = (batch, num_kv_heads, sliding_window, device)
        if key not in self._splits:
            context = self.max_context_length
            if sliding_window is not None:
                context = min(context, sliding_window)
            self._splits[key] = decode_num_splits(batch, num_kv_heads, context, device)
        return self._splits[key]

    def store_kv(self, k, v, k_cache, v_cache, meta):
        kv_write(k, v, k_cache, v_cache, meta.slot_mapping)

    def rotate_and_store(self, positions, q, k, v, q_norm, k_norm, rotary, k_cache, v_cache, meta):
        # One kernel: q/k norms, RoPE, and the rotated k with v straight into their cache slots.
        qk_norm_rope(
            q,
            k,
            positions,
            rotary.cos_sin_cache,
            q_norm.weight,
            k_norm.weight,
            q_norm.eps,
            k_norm.eps,
            q_norm.gemma,
            v,
            k_cache,
            v_cache,
            meta.slot_mapping,
        )
        return q

    def attend(self, q, k_cache, v_cache, meta, scale, sliding_window):
        if "triton" not in meta.backend_state:
            self.prepare(meta)
        views: _StepViews = meta.backend_state["triton"]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        nd = views.num_decodes
        if nd > 0:
            decode_attention(
                q[:nd],
                k_cache,
                v_cache,
                views.decode_page_table,
                views.decode_seq_lens,
                out[:nd],
                meta.page_size,
                scale,
                sliding_window,
                self._num_splits(nd, k_cache.shape[1], sliding_window, q.device),
            )
        if views.num_extends > 0:
            extend_attention(
                q,
                k_cache,
                v_cache,
                out,
                views.extend_query_start_loc,
                views.extend_seq_lens,
                views.extend_page_table,
                meta.max_query_len,
                meta.page_size,
                scale,
                sliding_window,
            )
        return out
