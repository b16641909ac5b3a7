"""EAGLE-3 draft head (arXiv:2503.01840), in the checkpoint format SGLang and vLLM load.

The head is one Llama-style decoder layer. Its input row for position i is the embedding of the
token at i + 1 beside a hidden state for position i: the target's own (its residual stream at
three layers, low, middle and high, projected by `fc` from 3 x target_hidden to hidden) where
the target computed position i, or the head's own pre-norm output where position i was drafted.
So q/k/v read 2 x hidden. Its output goes through its own `norm` and `lm_head` over a reduced
draft vocabulary; `d2t` maps a draft id d to the target id d + d2t[d].

Checkpoint (config.json + *.safetensors): architectures ["LlamaForCausalLMEagle3"], the Llama
config keys, `draft_vocab_size`, optionally `target_hidden_size` and the target layers to read
(`eagle_aux_hidden_state_layer_ids`, top level or in `eagle_config`); tensors `fc.weight`,
`midlayer.{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj, input_layernorm, hidden_norm,
post_attention_layernorm}.weight` (or `layers.0.` for `midlayer.`), `norm.weight`,
`lm_head.weight`, `d2t`, `t2d` (unused here), and `embed_tokens.weight` only when the head does
not share the target's embedding.
"""

import json
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError, safe_open
from torch import nn

from sfllm_core.errors import UnsupportedModelError
from sfllm_core.layers.activation import SiluAndMul
from sfllm_core.layers.linear import Linear, merge_linears, project
from sfllm_core.layers.norms import RMSNorm
from sfllm_core.layers.rotary import RotaryEmbedding, apply_rope_reference
from sfllm_core.models.blocks import GatedMLP, head_dim_of
from sfllm_core.models.common import ForwardContext, rope_settings

EAGLE3_ARCHITECTURES = ("LlamaForCausalLMEagle3", "Eagle3LlamaForCausalLM")


def default_aux_layers(num_layers: int) -> tuple[int, int, int]:
    """The target layers whose input the head reads by default in SGLang and vLLM: 2, L // 2, L - 3."""
    return (2, num_layers // 2, num_layers - 3) if num_layers > 4 else (0, num_layers // 2, num_layers - 1)


def load_eagle3_config(path: str) -> transformers.PretrainedConfig:
    """The draft's config (a LlamaConfig carrying draft_vocab_size and the EAGLE-3 keys); refuses other heads."""
    file = Path(path) / "config.json"
    if not file.is_file():
        raise UnsupportedModelError(f"{path}: no config.json (expected an EAGLE-3 draft checkpoint folder)")
    raw = json.loads(file.read_text())
    architectures = raw.get("architectures") or []
    if not any(a in EAGLE3_ARCHITECTURES for a in architectures):
        raise UnsupportedModelError(
            f"{file}: architectures {architectures} is no EAGLE-3 draft head (expected {EAGLE3_ARCHITECTURES[0]})"
        )
    if raw.get("num_hidden_layers", 1) != 1:
        raise UnsupportedModelError(f"{file}: EAGLE-3 heads of {raw['num_hidden_layers']} layers are not supported")
    config = transformers.LlamaConfig.from_pretrained(path)
    if getattr(config, "draft_vocab_size", None) is None:
        config.draft_vocab_size = config.vocab_size
    return config


def aux_layers_of(config, target_num_layers: int) -> tuple[int, ...]:
    """The target layers (their inputs: the residual stream after the layer before) the head's fc reads."""
    eagle = getattr(config, "eagle_config", None) or {}
    ids = getattr(config, "eagle_aux_hidden_state_layer_ids", None) or eagle.get("eagle_aux_hidden_state_layer_ids")
    ids = tuple(ids) if ids else default_aux_layers(target_num_layers)
    if len(ids) != 3 or not all(0 <= i < target_num_layers for i in ids):
        raise UnsupportedModelError(f"EAGLE-3 aux layers {ids} do not fit a target of {target_num_layers} layers")
    return ids


def concat_aux(aux_layers: tuple[int, ...], captured: list[torch.Tensor]) -> torch.Tensor:
    """The head's fc input [T, 3 x hidden] from what a forward captured (one per distinct layer, in layer order)."""
    order = sorted(set(aux_layers))
    return torch.cat([captured[order.index(i)] for i in aux_layers], dim=-1)


class Eagle3Attention(nn.Module):
    """Llama attention (no per-head norms) whose q/k/v read the 2 x hidden concatenation."""

    def __init__(self, config, rotary: RotaryEmbedding, use_triton: bool) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.use_triton = use_triton
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim_of(config)
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(2 * hidden, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(2 * hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(2 * hidden, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = Linear(self.num_heads * self.head_dim, hidden, bias=bias, use_triton=use_triton)
        self.rotary = rotary
        self.scale = self.head_dim**-0.5

    def fuse_projections(self) -> None:
        self.qkv_proj = merge_linears(self.q_proj, self.k_proj, self.v_proj, use_triton=self.use_triton)
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, positions: torch.Tensor, x: torch.Tensor, ctx: ForwardContext, kv) -> torch.Tensor:
        n = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = apply_rope_reference(q.reshape(n, self.num_heads, self.head_dim), positions, self.rotary.cos_sin_cache)
        k = apply_rope_reference(k.reshape(n, self.num_kv_heads, self.head_dim), positions, self.rotary.cos_sin_cache)
        v = v.reshape(n, self.num_kv_heads, self.head_dim)
        k_cache, v_cache = kv
        ctx.backend.store_kv(k, v, k_cache, v_cache, ctx.meta)
        o = ctx.backend.attend(q, k_cache, v_cache, ctx.meta, self.scale, None)
        return self.o_proj(o.reshape(n, q_size))


class Eagle3MidLayer(nn.Module):
    def __init__(self, config, rotary: RotaryEmbedding, use_triton: bool) -> None:
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.self_attn = Eagle3Attention(config, rotary, use_triton)
        self.mlp = GatedMLP(hidden, config.intermediate_size, act=SiluAndMul, use_triton=use_triton)
        self.input_layernorm = RMSNorm(hidden, eps, use_triton=use_triton)  # the token embedding's
        self.hidden_norm = RMSNorm(hidden, eps, use_triton=use_triton)  # the hidden state's
        self.post_attention_layernorm = RMSNorm(hidden, eps, use_triton=use_triton)
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))


class Eagle3DraftModel(nn.Module):
    """The draft head: `forward` gives (normed, pre-norm) hidden rows; `draft_logits` the draft vocabulary's logits.

    embed_tokens is the target's unless the checkpoint has its own (see load_eagle3_weights).
    """

    def __init__(self, config, target_hidden_size: int, max_positions: int, *, use_triton: bool = False) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.hidden_size = hidden
        self.target_hidden_size = getattr(config, "target_hidden_size", None) or target_hidden_size
        self.fc = Linear(
            3 * self.target_hidden_size, hidden, bias=bool(getattr(config, "bias", False)), use_triton=use_triton
        )
        base, factor = rope_settings(config)
        # The target's positions: a head trained at a shorter context still sees them all.
        positions = max(max_positions, config.max_position_embeddings)
        self.rotary = RotaryEmbedding(head_dim_of(config), base, positions, factor)
        self.midlayer = Eagle3MidLayer(config, self.rotary, use_triton)
        self.norm = RMSNorm(hidden, config.rms_norm_eps, use_triton=use_triton)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64), persistent=False)
        self.embed_tokens: nn.Embedding | None = None

    @property
    def head_dim(self) -> int:
        return self.midlayer.self_attn.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.midlayer.self_attn.num_kv_heads

    def fuse_projections(self) -> None:
        self.midlayer.self_attn.fuse_projections()
        self.midlayer.mlp.fuse_projections()

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext, kv
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of (token at i + 1, hidden state for i) at positions i; hidden is the target's
        [T, 3 x target_hidden] (projected by fc here) or the head's own pre-norm output [T, hidden]."""
        layer = self.midlayer
        if hidden.shape[-1] != self.hidden_size:
            hidden = self.fc(hidden)
        embeds = layer.input_layernorm(self.embed_tokens(input_ids).to(hidden.dtype))
        normed = layer.hidden_norm(hidden)
        residual = normed if layer.norm_before_residual else hidden
        attn = layer.self_attn(positions, torch.cat([embeds, normed], dim=-1), ctx, kv)
        x, residual = layer.post_attention_layernorm.add_norm(attn, residual)
        out, prenorm = self.norm.add_norm(layer.mlp(layer.mlp.gate_up_proj(x)), residual)
        return out, prenorm

    def draft_logits(self, normed: torch.Tensor) -> torch.Tensor:
        return project(normed, self.lm_head.weight).float()

    def greedy_tokens(self, normed: torch.Tensor) -> torch.Tensor:
        """The likeliest target token of each row: argmax over the draft vocabulary, mapped through d2t."""
        ids = self.draft_logits(normed).argmax(dim=-1)
        return ids + self.d2t[ids]


def _checkpoint_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{folder} has no *.safetensors weight files")
    return files


def _draft_name(name: str) -> str:
    name = name.removeprefix("model.")
    if name.startswith("layers.0."):
        name = "midlayer." + name[len("layers.0.") :]
    return name


@torch.no_grad()
def load_eagle3_weights(model: Eagle3DraftModel, path: str, target_embedding: nn.Embedding, dtype) -> None:
    """Fill the head from its checkpoint; without embed_tokens in it, the head shares the target's."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    d2t_seen = False
    for file in _checkpoint_files(Path(path)):
        try:
            with safe_open(str(file), framework="pt") as shard:
                for key in shard.keys():
                    name = _draft_name(key)
                    if name == "t2d":
                        continue
                    tensor = shard.get_tensor(key)
                    if name == "d2t":
                        if tensor.shape != model.d2t.shape:
                            raise UnsupportedModelError(
                                f"{file}: d2t has shape {tuple(tensor.shape)}, expected {tuple(model.d2t.shape)}"
                            )
                        model.d2t.copy_(tensor.to(torch.int64))
                        d2t_seen = True
                        continue
                    if name == "embed_tokens.weight":
                        model.embed_tokens = nn.Embedding(*tensor.shape, device=model.fc.weight.device, dtype=dtype)
                        params[name] = model.embed_tokens.weight
                    param = params.get(name)
                    if param is None:
                        raise UnsupportedModelError(f"{file}: unexpected tensor {key!r} for an EAGLE-3 head")
                    if param.shape != tensor.shape:
                        raise UnsupportedModelError(
                            f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                        )
                    param.copy_(tensor.to(dtype))
                    loaded.add(name)
        except (SafetensorError, OSError) as exc:
            raise UnsupportedModelError(f"{file}: cannot read safetensors ({exc})") from exc
    missing = sorted(set(params) - loaded)
    if missing:
        raise UnsupportedModelError(f"{path}: the EAGLE-3 head is missing tensors: {', '.join(missing[:5])}")
    if not d2t_seen and model.config.draft_vocab_size != model.config.vocab_size:
        raise UnsupportedModelError(f"{path}: a reduced draft vocabulary needs its d2t map")
    if model.embed_tokens is None:
        if target_embedding.weight.shape[1] != model.hidden_size:
            raise UnsupportedModelError(f"{path}: the head has no embed_tokens and the target's width differs")
        model.embed_tokens = target_embedding
