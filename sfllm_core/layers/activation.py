"""Gated MLP activations on the fused gate|up projection output: act(gate) * up."""

import torch
import torch.nn.functional as F
from torch import nn


class GatedActivation(nn.Module):
    """act(gate) * up for x [..., 2I] laid out gate first; returns [..., I]. `kind` names act for kernels."""

    kind = ""

    def __init__(self, *, use_triton: bool = False) -> None:
        super().__init__()
        self.use_triton = use_triton  # CUDA inputs go through kernels/activation.py

    def _act(self, gate: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton and x.is_cuda:
            from sfllm_core.kernels.activation import gated_act_and_mul

            return gated_act_and_mul(x, self.kind)
        gate, up = x.chunk(2, dim=-1)
        return self._act(gate) * up


class SiluAndMul(GatedActivation):
    """silu(gate) * up (SwiGLU: Qwen3)."""

    kind = "silu"

    def _act(self, gate: torch.Tensor) -> torch.Tensor:
        return F.silu(gate)


class GeluTanhAndMul(GatedActivation):
    """gelu_tanh(gate) * up (GeGLU: Gemma3)."""

    kind = "gelu_tanh"

    def _act(self, gate: torch.Tensor) -> torch.Tensor:
        return F.gelu(gate, approximate="tanh")
