"""RMSNorm in the two flavours the served models use; both normalise in float32.

`add_norm` carries the residual stream: it returns norm(x + residual) and x + residual, so on
CUDA the add rides in the norm's kernel instead of costing a launch of its own; on the CPU float32
rows take one call of kernels/cpu_norm_rope.py instead of a dozen small ops.
"""

import torch
from torch import nn

from sfllm_core.kernels import cpu_norm_rope


class RMSNorm(nn.Module):
    """Qwen3's RMSNorm: weight * normalised(x), the weight applied in the input dtype."""

    gemma = False

    def __init__(self, dim: int, eps: float, *, use_triton: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.use_triton = use_triton  # CUDA inputs go through kernels/rmsnorm.py

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_triton and x.is_cuda:
            from sfllm_core.kernels.rmsnorm import rmsnorm

            return rmsnorm(x, self.weight, self.eps, self.gemma)
        if _cpu_kernel_fits(x):
            return cpu_norm_rope.add_norm(x, self.weight, self.eps, self.gemma)[0]
        return self._reference(x)

    def add_norm(
        self, x: torch.Tensor, residual: torch.Tensor, x_norm: "RMSNorm | None" = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x), the sum in the activation dtype.

        x_norm, if given, normalises x before the add (Gemma's sandwich norms), in the same kernel.
        """
        if self.use_triton and x.is_cuda:
            from sfllm_core.kernels.rmsnorm import rmsnorm

            if x_norm is None:
                return rmsnorm(x, self.weight, self.eps, self.gemma, residual)
            assert x_norm.gemma == self.gemma
            return rmsnorm(x, self.weight, self.eps, self.gemma, residual, x_norm.weight, x_norm.eps)
        if _cpu_kernel_fits(x) and (x_norm is None or x_norm.gemma == self.gemma):
            x_weight, x_eps = (None, 0.0) if x_norm is None else (x_norm.weight, x_norm.eps)
            return cpu_norm_rope.add_norm(x, self.weight, self.eps, self.gemma, residual, x_weight, x_eps)
        if x_norm is not None:
            x = x_norm(x)
        residual = residual + x
        return self._reference(residual), residual


def _cpu_kernel_fits(x: torch.Tensor) -> bool:
    """float32 rows on the CPU outside autograd: one call of kernels/cpu_norm_rope.py instead of ~10 ops."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and x.dim() == 2
        and not x.requires_grad
        and cpu_norm_rope.available()
    )


class GemmaRMSNorm(RMSNorm):
    """Gemma's RMSNorm: normalised(x) * (1 + weight), all in float32, then back to the input dtype."""

    gemma = True

    def __init__(self, dim: int, eps: float, *, use_triton: bool = False) -> None:
        super().__init__(dim, eps, use_triton=use_triton)
        nn.init.zeros_(self.weight)

    def _reference(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x * (1.0 + self.weight.float())).to(dtype)
