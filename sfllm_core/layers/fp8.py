"""FP8 weights (float8_e4m3fn) with float32 scales, per output channel or per block of the weight.

w[n, k] = q[n, k] * scale[n // block_n, k // block_k]. The three layouts in use:
- per channel: block_n 1, block_k = in_features (one scale per output row);
- Qwen's / DeepSeek's blocks: block_n = block_k = 128 (`weight_scale_inv` in their checkpoints);
- blocks spread over rows: block_n 1, block_k 128, which is what 128x128 blocks of parts whose row
  counts are not multiples of 128 become when merged (q|k|v of a small model), exactly.

On CUDA a forward of up to FP8_GEMV_MAX_ROWS rows runs the bf16 path's GEMV, kernels/gemv.py, given
the scales (weights read as fp8, activations kept in bfloat16, the norm or the activation before it
fused in); larger ones quantize
their activations per token (or per token and 128 columns) and run an FP8 GEMM
(kernels/fp8_gemm.py: torch._scaled_mm, or Triton). Elsewhere the weight is dequantized and the
matmul runs in the activation's dtype: slow, but exact to the stored weights (the tests' reference).
"""

import torch
import torch.nn.functional as F
from torch import nn

from sfllm_core.layers.quantization import QuantizedWeight

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCHEMES = ("channel", "block")
BLOCK = 128
# Up to this many rows the weight-streaming GEMV beats quantizing the activations for a GEMM: at
# these sizes a step only reads weights, and the GEMV reads each once for all rows.
FP8_GEMV_MAX_ROWS = 4
# Projections left in the activation dtype when quantizing a model: the output projection decides
# the ranking of every token, and Qwen's own FP8 checkpoints keep it (and the embeddings) in bfloat16.
UNQUANTIZED = ("lm_head",)


class Fp8Weight(QuantizedWeight):
    """A weight [N, K] as float8_e4m3fn values times float32 scales of blocks block_n x block_k."""

    kind = "fp8"

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, *, block_n: int, block_k: int) -> None:
        super().__init__(*weight.shape)
        n, k = weight.shape
        assert weight.dtype == FP8_DTYPE and weight.is_contiguous()
        assert scale.shape == (-(-n // block_n), -(-k // block_k)), (scale.shape, weight.shape, block_n, block_k)
        assert block_k >= k or block_k == BLOCK, "the kernels read block scales over 128 columns"
        self.block_n, self.block_k = block_n, block_k
        self.register_buffer("weight", weight)
        self.register_buffer("scale", scale.float().contiguous())

    @property
    def per_channel(self) -> bool:
        return self.scale.shape[1] == 1 and self.block_n == 1

    @classmethod
    def from_dense(cls, w: torch.Tensor, scheme: str = "channel") -> "Fp8Weight":
        """Symmetric quantization of a dense weight: scale = amax / 448 per row ("channel") or per 128x128 block."""
        if scheme not in SCHEMES:
            raise ValueError(f"fp8 scheme must be one of {', '.join(SCHEMES)}; got {scheme!r}")
        n, k = w.shape
        w = w.float()
        if scheme == "channel":
            scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
            q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
            return cls(q, scale, block_n=1, block_k=k)
        nb, kb = -(-n // BLOCK), -(-k // BLOCK)
        padded = F.pad(w, (0, kb * BLOCK - k, 0, nb * BLOCK - n)).view(nb, BLOCK, kb, BLOCK)
        scale = (padded.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=torch.finfo(torch.float32).tiny)
        q = (padded / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(nb * BLOCK, kb * BLOCK)
        return cls(q[:n, :k].to(FP8_DTYPE).contiguous(), scale, block_n=BLOCK, block_k=BLOCK)

    def expanded_scale(self) -> torch.Tensor:
        """The scale of every weight element, [N, K] float32."""
        n, k = self.shape
        s = self.scale.repeat_interleave(self.block_n, dim=0)[:n]
        return s.repeat_interleave(self.block_k, dim=1)[:, :k]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.expanded_scale()).to(dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        flat = ids.reshape(-1)
        scale = self.scale[torch.div(flat, self.block_n, rounding_mode="floor")]
        out = self.weight[flat].float() * scale.repeat_interleave(self.block_k, dim=1)[:, : self.in_features]
        return out.to(dtype).view(*ids.shape, self.in_features)

    def row_spread(self) -> "Fp8Weight":
        """The same weight with its block scales repeated for every row (block_n 1): rows then concatenate."""
        if self.block_n == 1:
            return self
        scale = self.scale.repeat_interleave(self.block_n, dim=0)[: self.out_features]
        return Fp8Weight(self.weight, scale, block_n=1, block_k=self.block_k)

    @classmethod
    def concat(cls, parts: list["QuantizedWeight"]) -> "Fp8Weight":
        assert all(isinstance(p, Fp8Weight) and p.in_features == parts[0].in_features for p in parts)
        first = parts[0]
        aligned = all(p.out_features % p.block_n == 0 for p in parts[:-1])
        if len({(p.block_n, p.block_k) for p in parts}) == 1 and aligned:
            weight, scale = torch.cat([p.weight for p in parts]), torch.cat([p.scale for p in parts])
            return cls(weight, scale, block_n=first.block_n, block_k=first.block_k)
        # Row counts off the blocks, or mixed layouts: every row gets its own scales, per 128
        # columns wherever a part has blocks (a per-channel row's scale repeats across them), so
        # the merged weight stands for exactly the parts' values.
        spread = [p.row_spread() for p in parts]
        block_k = min(p.block_k for p in spread)
        columns = -(-first.in_features // block_k)
        scales = [p.scale.expand(-1, columns) if p.scale.shape[1] == 1 else p.scale for p in spread]
        return cls(torch.cat([p.weight for p in spread]), torch.cat(scales), block_n=1, block_k=block_k)

    @classmethod
    def _buffer_names(cls) -> tuple[str, ...]:
        return ("weight", "scale")

    @classmethod
    def _init_args(cls, meta: dict) -> dict:
        return {"block_n": meta["block_n"], "block_k": meta["block_k"]}

    def to_tensors(self) -> tuple[dict, dict[str, torch.Tensor]]:
        meta, tensors = super().to_tensors()
        return {**meta, "block_n": self.block_n, "block_k": self.block_k}, tensors

    # ---- the matmuls --------------------------------------------------------------------------

    def _gemv_fits(self, x: torch.Tensor) -> bool:
        return x.is_cuda and x.dim() == 2 and 0 < x.shape[0] <= FP8_GEMV_MAX_ROWS

    def _gemv(self, x: torch.Tensor, bias: torch.Tensor | None = None, kind: str | None = None) -> torch.Tensor:
        from sfllm_core.kernels.gemv import gemv

        return gemv(x, self.weight, bias, kind, scale=self.scale, scale_block_n=self.block_n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not x.is_cuda:
            return F.linear(x, self.dequantize(x.dtype))
        if self._gemv_fits(x):
            return self._gemv(x)
        from sfllm_core.kernels.fp8_gemm import fp8_matmul

        lead = x.shape[:-1]
        y = fp8_matmul(x.reshape(-1, self.in_features), self.weight, self.scale, self.block_n, self.block_k)
        return y.view(*lead, self.out_features)

    def normed(
        self,
        h: torch.Tensor,
        bias: torch.Tensor | None,
        norm: nn.Module,
        residual: torch.Tensor | None,
        h_norm: nn.Module | None,
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(self(norm(h + residual)), h + residual) with the norm inside the GEMV; None where it does not apply."""
        if not self._gemv_fits(h) or (h_norm is not None and (residual is None or h_norm.gemma != norm.gemma)):
            return None
        from sfllm_core.kernels.gemv import gemv_normed

        return gemv_normed(
            h, self.weight, bias, norm.weight, norm.eps, norm.gemma, residual,
            None if h_norm is None else h_norm.weight, 0.0 if h_norm is None else h_norm.eps,
            scale=self.scale, scale_block_n=self.block_n,
        )  # fmt: skip

    def gated(self, gate_up: torch.Tensor, bias: torch.Tensor | None, kind: str) -> torch.Tensor | None:
        """self(act(gate) * up) with the activation inside the GEMV, or inside the activations' quantization
        before a GEMM; None off CUDA."""
        if not gate_up.is_cuda or gate_up.dim() != 2:
            return None
        if self._gemv_fits(gate_up):
            return self._gemv(gate_up, bias, kind)
        from sfllm_core.kernels.fp8_gemm import fp8_matmul

        return fp8_matmul(gate_up, self.weight, self.scale, self.block_n, self.block_k, bias, kind)

    def extra_repr(self) -> str:
        return f"{self.out_features}, {self.in_features}, block={self.block_n}x{self.block_k}"


@torch.no_grad()
def quantize_linears(model: nn.Module, scheme: str, skip: tuple[str, ...] = UNQUANTIZED) -> int:
    """Replaces every dense nn.Linear of the model (but `skip`) by a Linear holding its FP8 weight; returns how many."""
    from sfllm_core.layers.linear import Linear

    targets = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and isinstance(module.weight, nn.Parameter)
        and name.rpartition(".")[2] not in skip
    ]
    for name, module in targets:
        layer = Linear.from_weight(Fp8Weight.from_dense(module.weight, scheme), module.bias)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        del module.weight  # the dense copy goes now, not when the last layer is done
    return len(targets)
