"""Attention over the paged KV cache: the batch metadata and the backend interface.

KV cache layout (one pair of tensors per layer, owned by MemoryPool):
    k_cache, v_cache: [num_slots, num_kv_heads, head_dim], num_slots = num_pages * page_size.
    A token at logical position p of a sequence lives in slot
    page_table[seq, p // page_size] * page_size + p % page_size.

A step's batch is ragged and flat: the new tokens of every sequence are concatenated, decode
sequences (exactly one new token) first, then extend/prefill sequences. Each new token attends to
every cached token of its sequence plus the new tokens up to and including itself; a sliding
window W further restricts it to keys at positions q_pos - W < k_pos <= q_pos.
"""

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch

from sfllm_core.kernels import cpu_decode_attention


@dataclass
class BatchMetadata:
    """Everything attention and RoPE need about one step's batch, passed explicitly."""

    positions: torch.Tensor  # int64 [T]: position of each new token in its sequence
    slot_mapping: torch.Tensor  # int64 [T]: cache slot each new token's K/V is written to
    query_start_loc: torch.Tensor  # int32 [B+1]: new tokens of seq i are [qsl[i], qsl[i+1])
    seq_lens: torch.Tensor  # int32 [B]: context length after this step (cached + new)
    page_table: torch.Tensor  # int32 [B, max_pages]: page ids per sequence, padded with 0
    logits_indices: torch.Tensor  # int64 [B]: index in the flat batch of each sequence's last token
    page_size: int
    num_decodes: int  # the first num_decodes sequences have exactly one new token
    max_query_len: int
    max_seq_len: int
    # Host copies, so the CPU backend can loop without device syncs.
    seq_lens_cpu: list[int] = field(default_factory=list)
    query_lens_cpu: list[int] = field(default_factory=list)
    # Per-step scratch an attention backend may fill in prepare() and reuse in every layer.
    backend_state: dict = field(default_factory=dict)
    # The same batch for sliding-window layers when they keep their K/V in pages of their own
    # (MemoryPool's window group): its own page_table and slot_mapping, all else shared.
    window: "BatchMetadata | None" = None

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_cpu)


class AttentionBackend(ABC):
    """Writes a layer's new K/V into the paged cache and attends over it.

    Models call `rotate_and_store` (per-head q/k norms, RoPE, K/V into the cache) and then `attend`;
    `forward` is store plus attend for callers whose q and k are ready. ModelRunner calls `prepare`
    once per step before the forward pass.
    """

    def prepare(self, meta: BatchMetadata) -> None:  # noqa: B027 (optional hook)
        """Per-step precomputation shared by all layers (default: nothing)."""

    def store_kv(self, k, v, k_cache, v_cache, meta: BatchMetadata) -> None:
        """Write the new tokens' keys and values to their cache slots."""
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)

    def rotate_and_store(self, positions, q, k, v, q_norm, k_norm, rotary, k_cache, v_cache, meta) -> torch.Tensor:
        """Norm and rotate q [T, Hq, D] and k per head, store k and v; returns the rotated q."""
        from sfllm_core.layers.rotary import norm_and_rotate

        q, k = norm_and_rotate(positions, q, k, q_norm, k_norm, rotary)
        self.store_kv(k, v, k_cache, v_cache, meta)
        return q

    @abstractmethod
    def attend(
        self,
        q: torch.Tensor,  # [T, num_heads, head_dim]
        k_cache: torch.Tensor,  # [num_slots, num_kv_heads, head_dim], this step's keys already stored
        v_cache: torch.Tensor,
        meta: BatchMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:  # [T, num_heads, head_dim]
        ...

    def forward(self, q, k, v, k_cache, v_cache, meta, scale, sliding_window) -> torch.Tensor:
        """store_kv, then attend."""
        self.store_kv(k, v, k_cache, v_cache, meta)
        return self.attend(q, k_cache, v_cache, meta, scale, sliding_window)


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor
) -> None:
    """Store new keys and values in their cache slots."""
    for new, cache in ((k, k_cache), (v, v_cache)):
        new = new.to(cache.dtype)
        if cache.dtype == torch.float8_e4m3fn:  # the CPU has no float8 index_copy_: copy the bytes
            cache, new = cache.view(torch.uint8), new.view(torch.uint8)
        cache.index_copy_(0, slots, new)


class TorchPagedAttention(AttentionBackend):
    """Plain-PyTorch paged attention: the CPU path and the reference for the Triton kernels."""

    def prepare(self, meta: BatchMetadata) -> None:
        # Slot indices of every sequence's whole context, computed once and shared by all layers.
        slots, starts = [], []
        offsets = torch.arange(meta.page_size, device=meta.page_table.device)
        for i, length in enumerate(meta.seq_lens_cpu):
            num_pages = (length + meta.page_size - 1) // meta.page_size
            pages = meta.page_table[i, :num_pages].long()
            slots.append((pages[:, None] * meta.page_size + offsets).flatten()[:length])
            # Pages in one ascending run (a lone sequence's usually are): its keys are a slice of the cache.
            ids = pages.tolist() if not pages.is_cuda else []
            run = bool(ids) and ids[-1] - ids[0] == len(ids) - 1 and ids == list(range(ids[0], ids[-1] + 1))
            starts.append(ids[0] * meta.page_size if run else None)
        meta.backend_state["seq_slots"] = slots
        meta.backend_state["seq_slot_start"] = starts

    @staticmethod
    def _decode_index(meta: BatchMetadata, window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded [num_decodes, L] slot indices of the keys each decode attends to, and their mask."""
        key = ("decode", window)
        if key not in meta.backend_state:
            seq_slots = meta.backend_state["seq_slots"][: meta.num_decodes]
            lengths = meta.seq_lens_cpu[: meta.num_decodes]
            firsts = [max(0, n - window) if window is not None else 0 for n in lengths]
            width = max(n - f for n, f in zip(lengths, firsts))
            device = meta.page_table.device
            index = torch.zeros(len(lengths), width, dtype=torch.long, device=device)
            valid = torch.zeros(len(lengths), width, dtype=torch.bool, device=device)
            for i, (slots, first) in enumerate(zip(seq_slots, firsts)):
                index[i, : len(slots) - first] = slots[first:]
                index[i, len(slots) - first :] = slots[first]  # padding reads a real key, then is masked
                valid[i, : len(slots) - first] = True
            meta.backend_state[key] = (index, valid[:, None, None, :])
        return meta.backend_state[key]

    @staticmethod
    def _decode_one(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of one token's heads q [H, D] over keys and values [L, Hkv, D], no mask: [H, D]."""
        num_heads, dim = q.shape
        num_kv_heads = keys.shape[1]
        query = q.reshape(num_kv_heads, num_heads // num_kv_heads, dim)  # query heads grouped by their KV head
        scores = torch.bmm(query, keys.to(q.dtype).permute(1, 2, 0)) * scale  # [Hkv, G, L]
        return torch.bmm(scores.softmax(-1), values.to(q.dtype).transpose(0, 1)).view(num_heads, dim)

    def attend(self, q, k_cache, v_cache, meta, scale, sliding_window):
        if "seq_slots" not in meta.backend_state:
            self.prepare(meta)
        seq_slots, slot_starts = meta.backend_state["seq_slots"], meta.backend_state["seq_slot_start"]
        out = torch.empty_like(q)
        num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
        start = batched = 0  # start: next token row; batched: sequences already done together
        nd = meta.num_decodes
        if nd > 1 and not _cpu_kernel_fits(q, k_cache):
            # Decodes together: one padded gather and one attention call instead of one per sequence
            # (the CPU kernel below takes them one by one, reading the cache in place).
            index, valid = self._decode_index(meta, sliding_window)
            keys = k_cache[index].to(q.dtype).transpose(1, 2)  # [nd, Hkv, L, D]
            values = v_cache[index].to(q.dtype).transpose(1, 2)
            o = torch.nn.functional.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), keys, values, attn_mask=valid, scale=scale, enable_gqa=num_heads != num_kv_heads
            )
            out[:nd] = o.squeeze(2)
            start = batched = nd
        for i, (length, qlen) in enumerate(zip(meta.seq_lens_cpu, meta.query_lens_cpu)):
            if i < batched:
                continue
            slots = seq_slots[i]
            first_key = 0
            if sliding_window is not None:
                # Keys older than the window of the earliest query are never needed.
                first_key = max(0, length - qlen - sliding_window + 1)
                slots = slots[first_key:]
            if qlen == 1:
                # One query, every kept key visible (the window's older keys are cut above): grouped
                # matmuls, ~6x faster on the CPU than SDPA's masked GQA path (50 against 320 us at 192 keys).
                base = slot_starts[i]
                if _cpu_kernel_fits(q, k_cache):
                    cpu_decode_attention.decode_attention(
                        out[start],
                        q[start],
                        k_cache,
                        v_cache,
                        None if base is not None else slots,
                        0 if base is None else base + first_key,
                        length - first_key,
                        scale,
                    )
                    start += 1
                    continue
                if base is not None:  # a slice instead of a gather (two copies of the keys per layer)
                    keys, values = k_cache[base + first_key : base + length], v_cache[base + first_key : base + length]
                else:
                    keys, values = k_cache[slots], v_cache[slots]
                out[start] = self._decode_one(q[start], keys, values, scale)
                start += 1
                continue
            keys = k_cache[slots].to(q.dtype).transpose(0, 1)  # [Hkv, L, D]
            values = v_cache[slots].to(q.dtype).transpose(0, 1)
            query = q[start : start + qlen].transpose(0, 1)  # [H, n, D]
            mask = None
            if qlen > 1 or sliding_window is not None:
                q_pos = torch.arange(length - qlen, length, device=q.device)[:, None]
                k_pos = torch.arange(first_key, length, device=q.device)[None, :]
                mask = k_pos <= q_pos
                if sliding_window is not None:
                    mask &= k_pos > q_pos - sliding_window
            o = torch.nn.functional.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=scale, enable_gqa=num_heads != num_kv_heads
            )
            out[start : start + qlen] = o.transpose(0, 1)
            start += qlen
        return out


def _cpu_kernel_fits(q: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """float32 on the CPU outside autograd: kernels/cpu_decode_attention.py in one call instead of ~12 ops."""
    return (
        q.device.type == "cpu"
        and q.dtype == k_cache.dtype == torch.float32
        and q.is_contiguous()
        and k_cache.is_contiguous()
        and not q.requires_grad
        and cpu_decode_attention.available()
    )
