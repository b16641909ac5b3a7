"""Qwen3 (dense): GQA with per-head q/k RMSNorm, RoPE, SwiGLU MLP, tied or untied embeddings."""

import torch
from torch import nn

from sfllm_core.layers.activation import SiluAndMul
from sfllm_core.layers.linear import Linear, merge_linears, project
from sfllm_core.layers.norms import RMSNorm
from sfllm_core.layers.rotary import RotaryEmbedding
from sfllm_core.models.common import ForwardContext, rope_settings, sliding_windows


class Qwen3Attention(nn.Module):
    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.rotary = rotary
        self.sliding_window = sliding_window
        self.scale = self.head_dim**-0.5

    def fuse_projections(self) -> None:
        self.qkv_proj = merge_linears(self.q_proj, self.k_proj, self.v_proj)
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
        return self.o_proj(o.reshape(n, self.num_heads * self.head_dim))


class Qwen3MLP(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = SiluAndMul()

    def fuse_projections(self) -> None:
        self.gate_up_proj = merge_linears(self.gate_proj, self.up_proj)
        del self.gate_proj, self.up_proj

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The MLP from the fused gate|up projection (the layer runs gate_up_proj, its norm fused in)."""
        return self.down_proj.forward_gated(gate_up, self.act)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config, layer_id: int, rotary: RotaryEmbedding, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config, layer_id, rotary, sliding_window)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h is the previous layer's MLP output, not yet added to residual (None: h is the embedding).

        Returns this layer's MLP output and the residual stream before it, so the next norm adds them.
        """
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = attn.qkv_proj.forward_normed(h, self.input_layernorm, residual)
        gate_up, residual = mlp.gate_up_proj.forward_normed(
            attn(positions, qkv, ctx), self.post_attention_layernorm, residual
        )
        return mlp(gate_up), residual


class Qwen3Model(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        base, factor = rope_settings(config)
        self.rotary = RotaryEmbedding(head_dim, base, config.max_position_embeddings, factor)
        windows = sliding_windows(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, i, self.rotary, windows[i]) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, residual = layer(positions, h, residual, ctx)
        return self.norm.add_norm(h, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    """Token ids in, final hidden states out; `compute_logits` projects the rows that are sampled.

    Weights load under the checkpoint's names; `fuse_projections` must then run before `forward`.
    """

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def fuse_projections(self) -> None:
        """Merge q|k|v and gate|up into one GEMM each (fewer launches) and free the separate weights."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return project(hidden, self.lm_head.weight).float()
