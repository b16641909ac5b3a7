"""Qwen3 (dense): GQA with per-head q/k RMSNorm, RoPE, SwiGLU MLP, tied or untied embeddings."""

import torch
from torch import nn

from sfllm_core.distributed.parallel_state import TensorParallel
from sfllm_core.layers.activation import SiluAndMul
from sfllm_core.layers.linear import project
from sfllm_core.layers.norms import RMSNorm
from sfllm_core.layers.rotary import RotaryEmbedding
from sfllm_core.models.blocks import Attention, GatedMLP, head_dim_of
from sfllm_core.models.common import ForwardContext, rope_settings, sliding_windows


class Qwen3DecoderLayer(nn.Module):
    def __init__(
        self,
        config,
        layer_id: int,
        rotary: RotaryEmbedding,
        sliding_window: int | None,
        use_triton: bool = False,
        tp: TensorParallel | None = None,
    ) -> None:
        super().__init__()
        self.self_attn = Attention(
            config,
            layer_id,
            rotary,
            sliding_window,
            norm=RMSNorm,
            scale=head_dim_of(config) ** -0.5,
            use_triton=use_triton,
            tp=tp,
        )
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, act=SiluAndMul, use_triton=use_triton, tp=tp)
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, use_triton=use_triton)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, use_triton=use_triton)

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
    def __init__(self, config, use_triton: bool = False, tp: TensorParallel | None = None) -> None:
        super().__init__()
        base, factor = rope_settings(config)
        self.rotary = RotaryEmbedding(head_dim_of(config), base, config.max_position_embeddings, factor)
        windows = sliding_windows(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            Qwen3DecoderLayer(config, i, self.rotary, windows[i], use_triton, tp)
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, use_triton=use_triton)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        for i, layer in enumerate(self.layers):
            if i in ctx.aux_layers:
                ctx.aux_hidden.append(h if residual is None else h + residual)
            h, residual = layer(positions, h, residual, ctx)
        return self.norm.add_norm(h, residual)[0]


class Qwen3ForCausalLM(nn.Module):
    """Token ids in, final hidden states out; `compute_logits` projects the rows that are sampled.

    Weights load under the checkpoint's names; `fuse_projections` must then run before `forward`.
    use_triton: the small layers run Triton kernels on CUDA (the engine's Triton backend). tp: this
    rank's slice of a tensor-parallel model (models/blocks.py); embeddings and lm_head stay whole.
    """

    def __init__(self, config, *, use_triton: bool = False, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config, use_triton, tp)
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
