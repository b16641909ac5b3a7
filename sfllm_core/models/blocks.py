"""The blocks Qwen3 and Gemma3 share: GQA attention with per-head q/k norms, and the gated MLP.

The models differ only in what they pass in: the norm class (Qwen3's RMSNorm or Gemma's
(1 + weight) flavour), the query scale (head_dim or query_pre_attn_scalar) and the activation
(SwiGLU or GeGLU-tanh). The layer around a block runs its fused input projection with the norm
before it (`qkv_proj.forward_normed`, `gate_up_proj.forward_normed`); the block does the rest.

`use_triton` is fixed at construction: the small layers (norms, activations, the decode GEMV)
then dispatch to the Triton kernels for CUDA inputs.

With a TensorParallel `tp` (Megatron style) each rank holds a slice: q|k|v and gate|up are split by
output rows (its query heads, its KV heads, its part of the intermediate size), o_proj and down_proj
by input columns, and their partial outputs are summed over the ranks (one all-reduce each), so
the residual stream is whole on every rank. With fewer KV heads than ranks, each rank holds the one
KV head its query heads read (Gemma3-1B's single KV head is on every rank).
"""

import torch
from torch import nn

from sfllm_core.distributed.parallel_state import TensorParallel
from sfllm_core.layers.activation import GatedActivation
from sfllm_core.layers.linear import Linear, merge_linears
from sfllm_core.layers.norms import RMSNorm
from sfllm_core.layers.rotary import RotaryEmbedding
from sfllm_core.models.common import ForwardContext


def head_dim_of(config) -> int:
    """A config's head_dim, which older configs leave to hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class Attention(nn.Module):
    """Self-attention over the paged KV cache: q/k/v (merged after loading), q/k norms, RoPE, o_proj."""

    def __init__(
        self,
        config,
        layer_id: int,
        rotary: RotaryEmbedding,
        sliding_window: int | None,
        *,
        norm: type[RMSNorm],
        scale: float,
        use_triton: bool = False,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = head_dim_of(config)
        self.use_triton = use_triton
        self.tp = tp
        if tp is not None:
            q_start, self.num_heads = tp.shard(self.num_heads, "num_attention_heads")
            kv_start, self.num_kv_heads = tp.kv_head_shard(self.num_kv_heads)
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * d, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * d, bias=bias)
        self.o_proj = Linear(self.num_heads * d, config.hidden_size, bias=bias, use_triton=use_triton)
        if tp is not None:
            tp.split(self.q_proj, 0, q_start * d, self.num_heads * d)
            tp.split(self.k_proj, 0, kv_start * d, self.num_kv_heads * d)
            tp.split(self.v_proj, 0, kv_start * d, self.num_kv_heads * d)
            tp.split(self.o_proj, 1, q_start * d, self.num_heads * d, bias="leader")
        self.q_norm = norm(self.head_dim, config.rms_norm_eps, use_triton=use_triton)
        self.k_norm = norm(self.head_dim, config.rms_norm_eps, use_triton=use_triton)
        self.rotary = rotary
        self.sliding_window = sliding_window
        self.scale = scale

    def fuse_projections(self) -> None:
        self.qkv_proj = merge_linears(self.q_proj, self.k_proj, self.v_proj, use_triton=self.use_triton)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, positions: torch.Tensor, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attention from the fused q|k|v projection (the layer runs qkv_proj, its norm fused in)."""
        n = qkv.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = ctx.kv_caches[self.layer_id]
        backend, meta = ctx.backend, ctx.meta_for(self.sliding_window)
        q = backend.rotate_and_store(positions, q, k, v, self.q_norm, self.k_norm, self.rotary, k_cache, v_cache, meta)
        o = backend.attend(q, k_cache, v_cache, meta, self.scale, self.sliding_window)
        out = self.o_proj(o.reshape(n, self.num_heads * self.head_dim))
        return out if self.tp is None else self.tp.all_reduce(out)


class GatedMLP(nn.Module):
    """down(act(gate) * up), gate|up merged into one projection after loading."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        act: type[GatedActivation],
        use_triton: bool = False,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.use_triton = use_triton
        self.tp = tp
        start, size = (0, intermediate_size) if tp is None else tp.shard(intermediate_size, "intermediate_size")
        self.gate_proj = nn.Linear(hidden_size, size, bias=False)
        self.up_proj = nn.Linear(hidden_size, size, bias=False)
        self.down_proj = Linear(size, hidden_size, bias=False, use_triton=use_triton)
        if tp is not None:
            tp.split(self.gate_proj, 0, start, size)
            tp.split(self.up_proj, 0, start, size)
            tp.split(self.down_proj, 1, start, size)
        self.act = act(use_triton=use_triton)

    def fuse_projections(self) -> None:
        self.gate_up_proj = merge_linears(self.gate_proj, self.up_proj, use_triton=self.use_triton)
        del self.gate_proj, self.up_proj

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP from the fused gate|up projection (the layer runs gate_up_proj, its norm fused in)."""
        out = self.down_proj.forward_gated(gate_up, self.act)
        return out if self.tp is None else self.tp.all_reduce(out)
