"""What the model files share: the forward context, rope settings from a config, weight assignment."""

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from sfllm_core.errors import UnsupportedModelError
from sfllm_core.layers.attention import AttentionBackend, BatchMetadata


@dataclass
class ForwardContext:
    """One step's inputs beyond the token ids: attention backend, batch metadata, per-layer KV cache."""

    backend: AttentionBackend
    meta: BatchMetadata
    kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    # The residual stream entering each of these layers is appended to aux_hidden, [T, hidden] each
    # (an EAGLE-3 draft head reads three of them); empty, as in every step without one: nothing.
    aux_layers: tuple[int, ...] = ()
    aux_hidden: list[torch.Tensor] = field(default_factory=list)

    def meta_for(self, sliding_window: int | None) -> BatchMetadata:
        """The batch as a layer sees it: sliding-window layers may have their own pages (meta.window)."""
        return self.meta if sliding_window is None or self.meta.window is None else self.meta.window


def rope_settings(config, layer_type: str | None = None) -> tuple[float, float]:
    """(base, linear scaling factor) for a layer type, from transformers 5's rope_parameters."""
    params = getattr(config, "rope_parameters", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    rope_type = params.get("rope_type", "default")
    if rope_type not in ("default", "linear"):
        raise UnsupportedModelError(f"rope_type {rope_type!r} is not supported (default and linear are)")
    base = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    factor = params.get("factor", 1.0) if rope_type == "linear" else 1.0
    return float(base), float(factor)


def sliding_windows(config) -> list[int | None]:
    """Per-layer sliding window (None for full attention), from config.layer_types."""
    layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    return [window if t == "sliding_attention" and window else None for t in layer_types]


# What torch's layers call from reset_parameters to fill new parameters.
_INIT_FUNCTIONS = ("kaiming_uniform_", "uniform_", "normal_", "trunc_normal_", "xavier_uniform_", "zeros_", "ones_")


@contextlib.contextmanager
def uninitialized_parameters() -> Iterator[None]:
    """Build modules without filling their parameters (random init of Gemma 270M took 2.3 s of 8.4 on 2 cores).

    Only for models whose every parameter a checkpoint then overwrites: assign_weights refuses to
    leave any out. Buffers computed in __init__ (rotary tables) are built as usual.
    """
    saved = {name: getattr(nn.init, name) for name in _INIT_FUNCTIONS}
    try:
        for name in saved:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(nn.init, name, function)


def assign_weights(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor, str]],
    tied: bool,
    slices: dict[str, tuple[int, int, int] | None] | None = None,
) -> None:
    """Copy named tensors into the model's parameters, failing loudly on any mismatch.

    `weights` yields (name, tensor, source file). With tied embeddings lm_head shares embed_tokens,
    so an lm_head tensor in the checkpoint is ignored and its absence is fine. `slices` (a tensor-
    parallel rank's, distributed/parallel_state.py `shard_slices`) cuts named tensors to this rank's
    (dim, start, length), or zeros them (None).
    """
    slices = slices or {}
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor, source in weights:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if tied and name == "lm_head.weight":
            continue
        param = params.get(name)
        if param is None:
            raise UnsupportedModelError(f"{source}: unexpected tensor {name!r} for {type(model).__name__}")
        if name in slices:
            cut = slices[name]
            if cut is None:
                tensor = torch.zeros_like(tensor)
            elif tensor.shape[cut[0]] != cut[2]:  # whole (the loader did not cut it already)
                tensor = tensor.narrow(*cut)
        if param.shape != tensor.shape:
            raise UnsupportedModelError(
                f"{source}: tensor {name!r} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
            )
        with torch.no_grad():
            param.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded - ({"lm_head.weight"} if tied else set()))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise UnsupportedModelError(f"checkpoint is missing tensors: {shown}")
