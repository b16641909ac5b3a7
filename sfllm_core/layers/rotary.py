"""Rotary position embedding (rotate-half / NeoX layout), as Qwen3 and Gemma3 use it."""

import torch

from sfllm_core.layers.norms import RMSNorm


def rope_cos_sin_cache(head_dim: int, base: float, max_positions: int, scaling_factor: float = 1.0) -> torch.Tensor:
    """[max_positions, head_dim] float32: cos in the first half of the last dim, sin in the second.

    scaling_factor > 1 is linear position interpolation (rope_type "linear", e.g. Gemma3's global layers).
    """
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    positions = torch.arange(max_positions, dtype=torch.int64).float() / scaling_factor
    freqs = torch.outer(positions, inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def apply_rope_reference(x: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, heads, head_dim] by its positions; returns a new tensor in x's dtype."""
    half = x.shape[-1] // 2
    cos_sin = cos_sin_cache[positions]  # [T, head_dim]
    cos = cos_sin[:, None, :half]
    sin = cos_sin[:, None, half:]
    x1 = x[..., :half].float()
    x2 = x[..., half:].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class RotaryEmbedding(torch.nn.Module):
    """Holds one cos/sin table; rotates q and k by token position."""

    def __init__(self, head_dim: int, base: float, max_positions: int, scaling_factor: float = 1.0) -> None:
        super().__init__()
        self.register_buffer(
            "cos_sin_cache", rope_cos_sin_cache(head_dim, base, max_positions, scaling_factor), persistent=False
        )

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            apply_rope_reference(q, positions, self.cos_sin_cache),
            apply_rope_reference(k, positions, self.cos_sin_cache),
        )


def norm_and_rotate(
    positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, q_norm: RMSNorm, k_norm: RMSNorm, rotary: RotaryEmbedding
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head RMSNorm of q [T, Hq, D] and k [T, Hk, D], then RoPE (the reference; on CUDA the Triton
    backend's rotate_and_store does this and the KV write in one kernel; float32 on the CPU, one call
    of kernels/cpu_norm_rope.py per tensor)."""
    if q.device.type == "cpu" and q.dtype == k.dtype == torch.float32 and not q.requires_grad:
        from sfllm_core.kernels import cpu_norm_rope

        if q_norm.gemma == k_norm.gemma and cpu_norm_rope.available():
            cache = rotary.cos_sin_cache
            return (
                cpu_norm_rope.norm_rope(q, q_norm.weight, q_norm.eps, q_norm.gemma, cache, positions),
                cpu_norm_rope.norm_rope(k, k_norm.weight, k_norm.eps, k_norm.gemma, cache, positions),
            )
    return rotary(positions, q_norm(q), k_norm(k))
