"""Linear layers: decode-sized inputs through a GEMV kernel on CUDA, and merging of projections.

Projections that read the same input (q|k|v, gate|up) are merged into one GEMM after loading.
A Linear's weight is either a dense Parameter or a QuantizedWeight (layers/quantization.py), a
module that is its own matmul: `install_quantized_weights` puts those in place of a model's dense
projections and embeddings before the rest of a checkpoint loads.
"""

import itertools
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

from sfllm_core.errors import UnsupportedModelError
from sfllm_core.layers.activation import GatedActivation
from sfllm_core.layers.norms import RMSNorm
from sfllm_core.layers.quantization import QuantizedEmbedding, QuantizedWeight, concat_weights

# Where the GEMV kernel beats cuBLAS, measured on an H200 (bench/gemv.py, a whole model's layer
# projections chained in a CUDA graph): up to 2 rows of input and weights up to 32 MiB. Qwen3-0.6B
# layers: 14.9 us fused against 36.1 with cuBLAS at 1 row, 20.2 against 31.7 at 2, even at 4, cuBLAS
# ahead at 8; Qwen3-8B's 50-200 MB weights stream faster through cuBLAS (114 against 122 us).
GEMV_MAX_ROWS = 2
GEMV_MAX_WEIGHT_BYTES = 32 << 20


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) with a GEMV path for decode-sized batches.

    Built by `from_weight`, its weight is a QuantizedWeight instead, which computes x @ W^T itself.
    """

    def __init__(self, *args, use_triton: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.use_triton = use_triton  # decode-sized CUDA inputs go through kernels/gemv.py

    @classmethod
    def from_weight(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> "Linear":
        """A Linear computing x @ weight^T (+ bias) through the weight's own format."""
        layer = cls(weight.in_features, weight.out_features, bias=False, device="meta")
        del layer.weight
        layer.weight = weight  # a submodule under the parameter's name: state and repr stay readable
        layer.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)
        return layer

    @property
    def quantized(self) -> bool:
        return isinstance(self.weight, QuantizedWeight)

    def _gemv_fits(self, x: torch.Tensor) -> bool:
        return (
            self.use_triton
            and not self.quantized
            and x.is_cuda
            and x.dim() == 2
            and x.shape[0] <= GEMV_MAX_ROWS
            and self.weight.numel() * self.weight.element_size() <= GEMV_MAX_WEIGHT_BYTES
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quantized:
            y = self.weight(x)
            return y if self.bias is None else y + self.bias
        if self._gemv_fits(x) and x.shape[0] > 0:
            from sfllm_core.kernels.gemv import gemv

            return gemv(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)

    def forward_normed(
        self, h: torch.Tensor, norm: RMSNorm, residual: torch.Tensor | None = None, h_norm: RMSNorm | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(h + residual)), h + residual), as RMSNorm.add_norm; residual None: h is the stream.

        On the GEMV path the norm runs inside the GEMV's kernel (kernels/gemv.py `gemv_normed`); a
        quantized weight with a `normed` method (layers/fp8.py) may fuse it too.
        """
        if self.quantized and hasattr(self.weight, "normed"):
            fused = self.weight.normed(h, self.bias, norm, residual, h_norm)
            if fused is not None:
                return fused
        if self._gemv_fits(h) and h.shape[0] > 0 and norm.use_triton:
            from sfllm_core.kernels.gemv import gemv_normed

            assert h_norm is None or (residual is not None and h_norm.gemma == norm.gemma)
            return gemv_normed(
                h,
                self.weight,
                self.bias,
                norm.weight,
                norm.eps,
                norm.gemma,
                residual,
                None if h_norm is None else h_norm.weight,
                0.0 if h_norm is None else h_norm.eps,
            )
        if residual is None:
            assert h_norm is None, "h_norm only applies before a residual add"
            return self(norm(h)), h
        x, residual = norm.add_norm(h, residual, h_norm)
        return self(x), residual

    def forward_gated(self, gate_up: torch.Tensor, act: GatedActivation) -> torch.Tensor:
        """self(act(gate_up)); on the GEMV path the activation is computed inside the GEMV's loads."""
        if self.quantized and hasattr(self.weight, "gated"):
            fused = self.weight.gated(gate_up, self.bias, act.kind)
            if fused is not None:
                return fused
        if self._gemv_fits(gate_up) and gate_up.shape[0] > 0:
            from sfllm_core.kernels.gemv import gemv

            return gemv(gate_up, self.weight, self.bias, act.kind)
        return self(act(gate_up))


@torch.no_grad()
def merge_linears(*parts: nn.Linear, use_triton: bool = False) -> Linear:
    """One Linear whose output is the parts' outputs concatenated in order; the parts are left as they are."""
    has_bias = parts[0].bias is not None
    assert all((p.bias is not None) == has_bias for p in parts)
    if any(isinstance(p.weight, QuantizedWeight) for p in parts):
        bias = torch.cat([p.bias for p in parts]) if has_bias else None
        return Linear.from_weight(concat_weights([p.weight for p in parts]), bias)
    weight = torch.cat([p.weight for p in parts])
    # Built on the meta device so no throwaway weights are allocated and initialised.
    merged = Linear(weight.shape[1], weight.shape[0], bias=has_bias, device="meta", use_triton=use_triton)
    merged.weight = nn.Parameter(weight, requires_grad=False)
    if has_bias:
        merged.bias = nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    return merged


# On the CPU, MKL runs x @ W^T for a few rows of x far below memory speed, while W @ x^T streams W:
# for Gemma3's 262144 x 640 float32 output projection at 8 rows, 49-90 ms against 121-149 ms
# (2 cores, torch 2.13). Both compute the same dot products.
CPU_STREAMED_MAX_ROWS = 64
# For one row MKL's matrix-vector product runs on one core (11 GB/s on that projection); splitting
# the weight's rows over the cores doubles it on two (33 ms against 61 ms). Small weights are not
# worth the hand-off.
CPU_SPLIT_MIN_BYTES = 64 << 20
_cpu_pool: ThreadPoolExecutor | None = None


def project(x: torch.Tensor, weight: torch.Tensor | QuantizedWeight) -> torch.Tensor:
    """x @ weight^T, taking the faster route for decode-sized batches on the CPU."""
    if isinstance(weight, QuantizedWeight):
        return weight(x)
    if x.is_cuda or x.dim() != 2 or x.shape[0] > CPU_STREAMED_MAX_ROWS:
        return F.linear(x, weight)
    threads = torch.get_num_threads()
    if x.shape[0] == 1 and threads > 1 and weight.numel() * weight.element_size() >= CPU_SPLIT_MIN_BYTES:
        return _split_rows_matvec(x[0], weight, threads)[None]
    if x.shape[0] > 1:
        return (weight @ x.t()).t()
    return F.linear(x, weight)


def _split_rows_matvec(x: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    global _cpu_pool
    if _cpu_pool is None:
        _cpu_pool = ThreadPoolExecutor(parts, thread_name_prefix="sfllm-matvec")
    out = torch.empty(weight.shape[0], dtype=torch.result_type(x, weight))
    bounds = [weight.shape[0] * i // parts for i in range(parts + 1)]

    inference = torch.is_inference_mode_enabled()  # thread-local: carry the caller's into the pool

    def run(i: int) -> None:
        with torch.inference_mode(inference):
            torch.mv(weight[bounds[i] : bounds[i + 1]], x, out=out[bounds[i] : bounds[i + 1]])

    list(_cpu_pool.map(run, range(parts)))  # torch releases the GIL inside mv
    return out


def install_quantized_weights(
    model: nn.Module, weights: Iterable[tuple[str, "torch.Tensor | QuantizedWeight", str]], tied: bool
) -> Iterator[tuple[str, torch.Tensor, str]]:
    """Puts the quantized weights that lead `weights` into the model; returns the dense rest, still to load.

    A loader yields its quantized tensors first. Each replaces its nn.Linear by a Linear holding it
    and its nn.Embedding by a QuantizedEmbedding; with tied embeddings, the layers sharing the
    embedding's weight (lm_head) take the same QuantizedWeight. Runs eagerly up to the first dense
    tensor, so that a loader called afterwards (assign_weights) sees the model as it will be.
    """
    stream = iter(weights)
    for name, value, source in stream:
        if not isinstance(value, QuantizedWeight):
            return itertools.chain([(name, value, source)], stream)
        _install(model, name, value, source, tied)
    return iter(())


def _install(model: nn.Module, name: str, weight: QuantizedWeight, source: str, tied: bool) -> None:
    path = name.removesuffix(".weight")
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise UnsupportedModelError(f"{source}: unexpected tensor {name!r} for {type(model).__name__}") from None
    if not isinstance(module, nn.Linear | nn.Embedding) or tuple(module.weight.shape) != tuple(weight.shape):
        raise UnsupportedModelError(
            f"{source}: quantized tensor {name!r} {tuple(weight.shape)} does not fit {module.__class__.__name__}"
        )
    if isinstance(module, nn.Embedding):
        sharing = [
            n for n, m in model.named_modules() if m is not module and getattr(m, "weight", None) is module.weight
        ]
        _replace(model, path, QuantizedEmbedding(weight, module.weight.dtype))
        for other in sharing if tied else []:
            _replace(model, other, Linear.from_weight(weight))
        return
    _replace(model, path, Linear.from_weight(weight, module.bias))


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
