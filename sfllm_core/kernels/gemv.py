"""y = x @ W.T (+ bias) for a few rows of x: the decode-time GEMM, with its input's producer fused in.

cuBLAS picks kernels for small one-row GEMMs that run far off the weights' bandwidth (e.g. 11.6 us
for Qwen3-0.6B's o_proj on an H200, where this kernel takes 3.4 us). Each program holds a tile of
whole weight rows in registers, loaded before it waits on the previous kernel (see pdl.py), then
multiplies every row of x against it, so the weights are read once for all rows.

The input can be produced inside the kernel instead of by a launch of its own:
- gated (activation "silu" / "gelu_tanh"): x is [gate | up] and the product uses act(gate) * up;
- normed (`gemv_normed`): x = RMSNorm(h + residual), the norm before q|k|v and gate|up. Every
  program normalises the row itself (it is a few KB, read from L2); program 0 alone writes the
  new residual stream, to a fresh buffer so no program reads a half-written one.
Both round where the eager model rounds, so outputs match the unfused layers bit for bit in float32.
"""

import torch
import triton
import triton.language as tl

from sfllm_core.kernels.pdl import pdl_launch
from sfllm_core.kernels.rmsnorm import add_norm_row

# Weight elements one program holds: rows of the tile times the input width rounded up to a power
# of two. 8192 bf16 values is 64 per thread at 4 warps.
_TILE = 8192
MAX_ROWS = 8

ACTIVATIONS = {None: 0, "silu": 1, "gelu_tanh": 2}


@triton.jit
def _gemv_kernel(
    X,
    W,
    Bias,
    Out,
    Residual,
    NormWeight,
    XNormWeight,
    ResidualOut,
    M,
    N,
    stride_xm,
    stride_w,
    stride_om,
    stride_rm,
    stride_rom,
    eps,
    x_eps,
    K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM_X: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows_w = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    # Weights are never written during a step: stream them in before waiting on the producer of x.
    w = tl.load(
        W + rows_w[:, None].to(tl.int64) * stride_w + offs_k[None, :],
        mask=(rows_w[:, None] < N) & k_mask[None, :],
        other=0.0,
    )
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    dtype = Out.dtype.element_ty
    w = w.to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(Bias + rows_w, mask=rows_w < N, other=0.0).to(tl.float32)
    if NORM:
        norm_w = tl.load(NormWeight + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if NORM_X:
            x_norm_w = tl.load(XNormWeight + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        else:
            x_norm_w = norm_w
    for m in range(M):
        x_row = X + m * stride_xm
        if NORM:
            r = tl.load(Residual + m * stride_rm + offs_k, mask=k_mask, other=0.0)
            h = tl.load(x_row + offs_k, mask=k_mask, other=0.0)
            x, new_residual = add_norm_row(h, r, norm_w, x_norm_w, eps, x_eps, K, dtype, HAS_RESIDUAL, NORM_X, GEMMA)
            if HAS_RESIDUAL:
                if pid == 0:
                    tl.store(ResidualOut + m * stride_rom + offs_k, new_residual, mask=k_mask)
            x = x.to(tl.float32)
        elif ACT == 0:
            x = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        else:
            gate = tl.load(x_row + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            up = tl.load(x_row + K + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            if ACT == 1:
                act = gate * tl.sigmoid(gate)
            else:
                # 0.5 * (1 + tanh(z)) == sigmoid(2z): GELU's tanh form without a tanh primitive.
                act = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
            x = (act.to(dtype).to(tl.float32) * up).to(dtype).to(tl.float32)
        out = tl.sum(w * x[None, :], axis=1)
        if HAS_BIAS:
            out += bias
        tl.store(Out + m * stride_om + rows_w, out.to(dtype), mask=rows_w < N)


def _launch(x, weight, bias, out, activation, residual, norm_weight, x_norm_weight, residual_out, eps, x_eps, gemma):
    num_rows = x.shape[0]
    n, k = weight.shape
    block_k = triton.next_power_of_2(k)
    block_n = max(1, min(_TILE // block_k, 16))
    num_warps = 4 if block_n * block_k <= _TILE else 8
    normed = norm_weight is not None
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        weight,
        weight if bias is None else bias,
        out,
        x if residual is None else residual,
        weight if norm_weight is None else norm_weight,
        weight if x_norm_weight is None else x_norm_weight,
        out if residual_out is None else residual_out,
        num_rows,
        n,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        0 if residual is None else residual.stride(0),
        0 if residual_out is None else residual_out.stride(0),
        eps,
        x_eps,
        K=k,
        HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[activation],
        NORM=normed,
        HAS_RESIDUAL=residual is not None,
        NORM_X=x_norm_weight is not None,
        GEMMA=gemma,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
        **pdl_launch(x.device),
    )


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, width: int) -> None:
    num_rows = x.shape[0]
    n, k = weight.shape
    assert x.dim() == 2 and x.shape[1] == width, "x does not match the weight's input size"
    assert 1 <= num_rows <= MAX_ROWS and x.stride(1) == 1 and weight.stride(1) == 1
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())


def gemv(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T + bias for small M (at most 8), into a new [M, N] tensor.

    With activation "silu" or "gelu_tanh", x is [M, 2K] laid out [gate | up] and the product
    uses act(gate) * up in its place, so the activation costs no launch of its own.
    """
    k = weight.shape[1]
    _check(x, weight, bias, k if activation is None else 2 * k)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, weight, bias, out, activation, None, None, None, None, 0.0, 0.0, False)
    return out


def gemv_normed(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    gemma: bool,
    residual: torch.Tensor | None = None,
    x_norm_weight: torch.Tensor | None = None,
    x_eps: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h + residual) @ weight.T + bias, h + residual): the norm of kernels/rmsnorm.py, fused.

    Without residual the norm applies to h alone and h is returned as the residual stream; with
    x_norm_weight, h is first normalised by it (Gemma's sandwich norms), as in `rmsnorm`.
    """
    k = weight.shape[1]
    _check(h, weight, bias, k)
    assert norm_weight.shape == (k,) and norm_weight.is_contiguous()
    assert residual is None or (residual.shape == h.shape and residual.stride(1) == 1)
    assert x_norm_weight is None or (residual is not None and x_norm_weight.is_contiguous())
    out = torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
    residual_out = None if residual is None else torch.empty_like(residual)
    _launch(h, weight, bias, out, None, residual, norm_weight, x_norm_weight, residual_out, eps, x_eps, gemma)
    return out, (h if residual is None else residual_out)
