"""Gemma3 (text): sliding-window layers interleaved with global ones, four norms per layer, GELU-tanh MLP."""

import torch
from torch import nn

from sfllm_core.distributed.parallel_state import TensorParallel
from sfllm_core.layers.activation import GeluTanhAndMul
from sfllm_core.layers.linear import project
from sfllm_core.layers.norms import GemmaRMSNorm
from sfllm_core.layers.rotary import RotaryEmbedding
from sfllm_core.models.blocks import Attention, GatedMLP
from sfllm_core.models.common import ForwardContext, rope_settings, sliding_windows


class Gemma3DecoderLayer(nn.Module):
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
        # Gemma scales queries by query_pre_attn_scalar, not head_dim.
        self.self_attn = Attention(
            config,
            layer_id,
            rotary,
            sliding_window,
            norm=GemmaRMSNorm,
            scale=config.query_pre_attn_scalar**-0.5,
            use_triton=use_triton,
            tp=tp,
        )
        self.mlp = GatedMLP(
            config.hidden_size, config.intermediate_size, act=GeluTanhAndMul, use_triton=use_triton, tp=tp
        )
        eps, dim = config.rms_norm_eps, config.hidden_size
        self.input_layernorm = GemmaRMSNorm(dim, eps, use_triton=use_triton)
        self.post_attention_layernorm = GemmaRMSNorm(dim, eps, use_triton=use_triton)
        self.pre_feedforward_layernorm = GemmaRMSNorm(dim, eps, use_triton=use_triton)
        self.post_feedforward_layernorm = GemmaRMSNorm(dim, eps, use_triton=use_triton)

    def forward(
        self,
        positions: torch.Tensor,
        h: torch.Tensor,
        residual: torch.Tensor | None,
        h_norm: GemmaRMSNorm | None,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """h is the previous layer's MLP output, still to pass that layer's post-feedforward norm h_norm
        and join the residual stream (residual None: h is the embedding, joining as it is).

        Returns this layer's MLP output, likewise not yet normed or added, and the residual stream: each
        sandwich norm rides in the kernel of the norm that follows its add.
        """
        attn, mlp = self.self_attn, self.mlp
        qkv, residual = attn.qkv_proj.forward_normed(h, self.input_layernorm, residual, h_norm)
        gate_up, residual = mlp.gate_up_proj.forward_normed(
            attn(positions, qkv, ctx), self.pre_feedforward_layernorm, residual, self.post_attention_layernorm
        )
        return mlp(gate_up), residual


class Gemma3TextModel(nn.Module):
    def __init__(self, config, use_triton: bool = False, tp: TensorParallel | None = None) -> None:
        super().__init__()
        windows = sliding_windows(config)
        local_base, local_factor = rope_settings(config, "sliding_attention")
        global_base, global_factor = rope_settings(config, "full_attention")
        max_pos = config.max_position_embeddings
        self.rotary_local = RotaryEmbedding(config.head_dim, local_base, max_pos, local_factor)
        self.rotary_global = RotaryEmbedding(config.head_dim, global_base, max_pos, global_factor)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size**0.5
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(
                config,
                i,
                self.rotary_local if windows[i] is not None else self.rotary_global,
                windows[i],
                use_triton,
                tp,
            )
            for i in range(config.num_hidden_layers)
        )
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps, use_triton=use_triton)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        # The scale is rounded to the activation dtype first, as the reference does.
        h = h * torch.tensor(self.embed_scale, dtype=h.dtype)
        residual, h_norm = None, None
        for i, layer in enumerate(self.layers):
            if i in ctx.aux_layers:
                ctx.aux_hidden.append(h if residual is None else residual + h_norm(h))
            h, residual = layer(positions, h, residual, h_norm, ctx)
            h_norm = layer.post_feedforward_layernorm
        return self.norm.add_norm(h, residual, h_norm)[0]


class Gemma3ForCausalLM(nn.Module):
    """Token ids in, final hidden states out; `compute_logits` projects (and soft-caps) sampled rows.

    Weights load under the checkpoint's names; `fuse_projections` must then run before `forward`.
    use_triton: the small layers run Triton kernels on CUDA (the engine's Triton backend). tp: this
    rank's slice of a tensor-parallel model (models/blocks.py); embeddings and lm_head stay whole.
    """

    def __init__(self, config, *, use_triton: bool = False, tp: TensorParallel | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3TextModel(config, use_triton, tp)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if getattr(config, "tie_word_embeddings", True):
            self.lm_head.weight = self.model.embed_tokens.weight
        self.final_logit_softcapping = getattr(config, "final_logit_softcapping", None)

    def fuse_projections(self) -> None:
        """Merge q|k|v and gate|up into one GEMM each (fewer launches) and free the separate weights."""
        for layer in self.model.layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = project(hidden, self.lm_head.weight).float()
        if self.final_logit_softcapping:
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits
