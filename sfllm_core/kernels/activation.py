"""Gated MLP activations on a fused gate|up projection: act(gate) * up in one launch."""

import torch
import triton
import triton.language as tl

from sfllm_core.kernels.pdl import pdl_launch


@triton.jit
def _act_and_mul_kernel(
    X, Out, stride_x, stride_o, n_cols, GELU: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    dtype = Out.dtype.element_ty
    gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    if GELU:
        # 0.5 * (1 + tanh(z)) == sigmoid(2z): GELU's tanh form without a tanh primitive.
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = gate * tl.sigmoid(2.0 * z)
    else:
        act = gate * tl.sigmoid(gate)
    # The eager model rounds the activation to the activation dtype before the product.
    out = act.to(dtype).to(tl.float32) * up
    tl.store(Out + row * stride_o + offs, out.to(dtype), mask=mask)


def _act_and_mul(x: torch.Tensor, gelu: bool, out: torch.Tensor | None) -> torch.Tensor:
    n = x.shape[-1] // 2
    assert x.shape[-1] == 2 * n
    x2 = x.reshape(-1, 2 * n)
    assert x2.stride(1) == 1
    if out is None:
        out = torch.empty((*x.shape[:-1], n), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, n)
    rows = x2.shape[0]
    if rows > 0:
        block = min(1024, triton.next_power_of_2(n))
        _act_and_mul_kernel[(rows, triton.cdiv(n, block))](
            x2, out2, x2.stride(0), out2.stride(0), n, GELU=gelu, BLOCK=block, num_warps=4, **pdl_launch(x.device)
        )
    return out


def silu_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """silu(gate) * up for gate_up [..., 2I] (gate first); returns [..., I] (into out, if given)."""
    return _act_and_mul(gate_up, False, out)


def gelu_tanh_and_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """gelu_tanh(gate) * up for gate_up [..., 2I] (gate first); returns [..., I] (into out, if given)."""
    return _act_and_mul(gate_up, True, out)


def gated_act_and_mul(gate_up: torch.Tensor, kind: str) -> torch.Tensor:
    """The activation named kind ("silu" or "gelu_tanh") times up."""
    if kind not in ("silu", "gelu_tanh"):
        raise ValueError(f"unknown gated activation {kind!r}")
    return _act_and_mul(gate_up, kind == "gelu_tanh", None)
