"""RMSNorm of each row, optionally after adding x to the residual stream, in one launch."""

import torch
import triton
import triton.language as tl

from sfllm_core.kernels.pdl import pdl_launch


@triton.jit
def _normalize(x, w, eps, n_cols, dtype, GEMMA: tl.constexpr):
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    if GEMMA:
        out = (x * rstd) * (1.0 + w)
    else:
        # Qwen3 rounds the normalised row to the activation dtype before the weight multiplies it.
        out = w * (x * rstd).to(dtype).to(tl.float32)
    return out.to(dtype)


@triton.jit
def add_norm_row(
    h, r, w, xw, eps, x_eps, n_cols, dtype, HAS_RESIDUAL: tl.constexpr, NORM_X: tl.constexpr, GEMMA: tl.constexpr
):
    """One row: (norm(h + r), h + r), h first normed by xw if NORM_X; r unused without HAS_RESIDUAL.

    w and xw are float32; h and r in the activation dtype; both results in dtype.
    """
    x = h
    if NORM_X:
        x = _normalize(x.to(tl.float32), xw, x_eps, n_cols, dtype, GEMMA)
    if HAS_RESIDUAL:
        # The eager model adds in the activation dtype: round the sum before normalising it.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
    return _normalize(x.to(tl.float32), w, eps, n_cols, dtype, GEMMA), x


@triton.jit
def _rmsnorm_kernel(
    X,
    Residual,
    W,
    XW,
    Out,
    ResidualOut,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    n_cols,
    eps,
    x_eps,
    HAS_RESIDUAL: tl.constexpr,
    NORM_X: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    dtype = Out.dtype.element_ty
    w = tl.load(W + offs, mask=mask, other=0.0).to(tl.float32)
    xw = w
    if NORM_X:
        xw = tl.load(XW + offs, mask=mask, other=0.0).to(tl.float32)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0)
    r = x
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
    out, new_residual = add_norm_row(x, r, w, xw, eps, x_eps, n_cols, dtype, HAS_RESIDUAL, NORM_X, GEMMA)
    if HAS_RESIDUAL:
        tl.store(ResidualOut + row * stride_ro + offs, new_residual, mask=mask)
    tl.store(Out + row * stride_o + offs, out, mask=mask)


def rmsnorm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    gemma: bool,
    residual: torch.Tensor | None = None,
    x_weight: torch.Tensor | None = None,
    x_eps: float = 0.0,
    out: torch.Tensor | None = None,
    residual_out: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dim of x [..., N]: Qwen3's `weight * n(x)` or Gemma's `n(x) * (1 + weight)`.

    With a residual (same shape) it normalises x + residual and returns (out, x + residual); with
    x_weight, x is first normalised by it (Gemma's post-attention and post-MLP norms). out and
    residual_out, when given, are contiguous tensors shaped like x to write into.
    """
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n)
    if residual is not None:
        assert residual.shape == x.shape and residual.dtype == x.dtype
        r2 = residual.reshape(-1, n)
        if residual_out is None:
            residual_out = torch.empty_like(out)
        nr2 = residual_out.view(-1, n)
    else:
        assert x_weight is None, "x_weight only makes sense before a residual add"
        r2 = nr2 = x2  # unused by the kernel
    assert x2.stride(1) == 1 and r2.stride(1) == 1 and weight.is_contiguous() and weight.shape == (n,)
    assert x_weight is None or (x_weight.is_contiguous() and x_weight.shape == (n,))
    rows = x2.shape[0]
    if rows > 0:
        block = triton.next_power_of_2(n)
        _rmsnorm_kernel[(rows,)](
            x2,
            r2,
            weight,
            weight if x_weight is None else x_weight,
            out2,
            nr2,
            x2.stride(0),
            r2.stride(0),
            out2.stride(0),
            nr2.stride(0),
            n,
            eps,
            x_eps,
            HAS_RESIDUAL=residual is not None,
            NORM_X=x_weight is not None,
            GEMMA=gemma,
            BLOCK=block,
            num_warps=4 if block <= 1024 else 8 if block <= 4096 else 16,
            **pdl_launch(x.device),
        )
    if residual is None:
        return out
    return out, residual_out
