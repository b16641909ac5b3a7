"""FP8 GEMM for prefill and large batches: activations quantized per token at run time, then W8A8.

`quantize_rows` turns x [M, K] into float8_e4m3fn with a float32 scale per row (per channel
weights) or per row and 128 columns (block weights), amax / 448 each: dynamic scales, as Qwen's
FP8 checkpoints specify (`activation_scheme: dynamic`). `fp8_matmul` then multiplies:
- per-channel weights: torch._scaled_mm with row-wise scales (cuBLASLt / CUTLASS on sm89+);
- block weights (and whatever the row-wise recipe does not take): `_fp8_gemm_kernel` below, per
  128-column step tl.dot of the fp8 tiles times both scales. It takes any shape and layout.
torch._scaled_mm's block-wise recipe (1x128 activations, 128x128 weights) is not used: on the H200
(torch 2.11+cu130) cuBLASLt's heuristic refused it (CUBLAS_STATUS_NOT_SUPPORTED) for row counts of
a real step (250-token prefills, an offline batch) after a 256-row probe had passed, and a step's
row count is any number, so no probe at load can cover them; an exception at serving time, or in a
graph capture, must not be the way to find out.
Everything is launched without host synchronisation, so it can be captured in a CUDA graph.
"""

import functools

import torch
import triton
import triton.language as tl

from sfllm_core.kernels.pdl import pdl_launch

FP8_MAX = 448.0
GROUP = 128


@triton.jit
def _quant_rows_kernel(
    X,
    Q,
    S,
    stride_x,
    stride_q,
    stride_sm,
    stride_sg,
    K: tl.constexpr,
    GROUP_K: tl.constexpr,
    BLOCK: tl.constexpr,
    ACT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    offs = group * GROUP_K + tl.arange(0, BLOCK)
    mask = (tl.arange(0, BLOCK) < GROUP_K) & (offs < K)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    dtype = X.dtype.element_ty
    if ACT == 0:
        x = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        gate = tl.load(X + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(X + row * stride_x + K + offs, mask=mask, other=0.0).to(tl.float32)
        if ACT == 1:
            act = gate * tl.sigmoid(gate)
        else:
            act = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
        # Rounded where the eager activation layer rounds.
        x = (act.to(dtype).to(tl.float32) * up).to(dtype).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    # Correctly rounded divisions (Triton's "/" is the approximate one): the same q as torch's x / scale.
    scale = tl.div_rn(tl.maximum(amax, 1e-12), 448.0)
    q = tl.clamp(tl.div_rn(x, scale), -448.0, 448.0)
    tl.store(Q + row * stride_q + offs, q.to(Q.dtype.element_ty), mask=mask)
    tl.store(S + row * stride_sm + group * stride_sg, scale)


def quantize_rows(x: torch.Tensor, grouped: bool, activation: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(q float8_e4m3fn [M, K], scale float32): x = q * scale per row ([M, 1]) or per row and 128
    columns ([M, ceil(K / 128)], column-major: the Triton GEMM reads a column of them per K step).

    With activation "silu" / "gelu_tanh", x is [M, 2K] laid out [gate | up] and act(gate) * up is quantized.
    """
    from sfllm_core.kernels.gemv import ACTIVATIONS

    m, width = x.shape
    k = width if activation is None else width // 2
    assert x.stride(1) == 1
    q = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    if grouped:
        groups, group_k = triton.cdiv(k, GROUP), GROUP
        scale = torch.empty(groups, m, dtype=torch.float32, device=x.device).t()
    else:
        groups, group_k = 1, k
        scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m == 0:
        return q, scale
    block = triton.next_power_of_2(group_k)
    _quant_rows_kernel[(m, groups)](
        x,
        q,
        scale,
        x.stride(0),
        q.stride(0),
        scale.stride(0),
        scale.stride(1),
        K=k,
        GROUP_K=group_k,
        BLOCK=block,
        ACT=ACTIVATIONS[activation],
        num_warps=4 if block <= 2048 else 8 if block <= 8192 else 16,
        **pdl_launch(x.device),
    )
    return q, scale


@triton.jit
def _fp8_gemm_kernel(
    A,
    B,
    SA,
    SB,
    C,
    Bias,
    M,
    N,
    K,
    stride_am,
    stride_bn,
    stride_cm,
    stride_sam,
    stride_sag,
    stride_sbn,
    stride_sbk,
    SCALE_BN: tl.constexpr,
    GROUPED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Programs walk the output in groups of GROUP_M row tiles, so neighbours share B tiles in L2.
    pid = tl.program_id(0)
    tiles_m, tiles_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    a_ptrs = A + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = B + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    sb_rows = SB + (offs_n // SCALE_BN) * stride_sbn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k + kb * BLOCK_K < K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if GROUPED:
            sa = tl.load(SA + offs_m * stride_sam + kb * stride_sag, mask=m_mask, other=0.0)
            sb = tl.load(sb_rows + kb * stride_sbk, mask=n_mask, other=0.0)
            acc += tl.dot(a, b) * sa[:, None] * sb[None, :]
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if not GROUPED:
        sa = tl.load(SA + offs_m * stride_sam, mask=m_mask, other=0.0)
        sb = tl.load(sb_rows, mask=n_mask, other=0.0)
        acc = acc * sa[:, None] * sb[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def triton_fp8_gemm(
    q: torch.Tensor,
    q_scale: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_n: int,
    out_dtype: torch.dtype,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """(q * q_scale) @ (weight * scale).T: q [M, K] fp8 with scales [M, 1] or [M, ceil(K / 128)],
    weight [N, K] fp8 with scales [ceil(N / block_n), 1 or ceil(K / 128)], both grouped or neither."""
    m, k = q.shape
    n = weight.shape[0]
    grouped = scale.shape[1] > 1 or q_scale.shape[1] > 1
    if grouped and (scale.shape[1] == 1 or q_scale.shape[1] == 1):
        # A per-channel scale repeats over the groups of the other side.
        groups = triton.cdiv(k, GROUP)
        scale, q_scale = scale.expand(-1, groups), q_scale.expand(-1, groups)
    out = torch.empty(m, n, dtype=out_dtype, device=q.device)
    if m == 0:
        return out
    block_m = 128 if m > 64 else max(16, triton.next_power_of_2(m))
    block_n_tile = 128
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n_tile),)
    _fp8_gemm_kernel[grid](
        q,
        weight,
        q_scale,
        scale,
        out,
        weight if bias is None else bias,
        m,
        n,
        k,
        q.stride(0),
        weight.stride(0),
        out.stride(0),
        q_scale.stride(0),
        q_scale.stride(1),
        scale.stride(0),
        scale.stride(1),
        SCALE_BN=block_n,
        GROUPED=grouped,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n_tile,
        BLOCK_K=GROUP,
        GROUP_M=8,
        num_warps=8 if block_m == 128 else 4,
        num_stages=4 if q.is_cuda else 1,
    )
    return out


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def uses_rowwise_scaled_mm(
    n: int, k: int, block_n: int, grouped: bool, out_dtype: torch.dtype, capability: tuple[int, int] | None
) -> bool:
    """Whether fp8_matmul hands W [n, k] to torch._scaled_mm (row-wise scales) rather than to the Triton
    kernel; capability None: not on CUDA. Block-scaled weights never go to _scaled_mm."""
    return (
        capability is not None
        and capability >= (8, 9)
        and not grouped
        and block_n == 1
        and out_dtype == torch.bfloat16
        and k % 16 == 0
        and n % 16 == 0
    )


def fp8_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_n: int,
    block_k: int,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """x [M, K] @ (weight * scale).T (+ bias) in x's dtype, activations quantized per token (and 128 columns).

    With activation, x is [M, 2K] laid out [gate | up] and act(gate) * up is the input.
    """
    grouped = scale.shape[1] > 1
    q, q_scale = quantize_rows(x, grouped, activation)
    out_dtype = x.dtype
    n, k = weight.shape
    capability = None
    if q.is_cuda:
        capability = _capability(q.device.index if q.device.index is not None else torch.cuda.current_device())
    if uses_rowwise_scaled_mm(n, k, block_n, grouped, out_dtype, capability):
        y = torch._scaled_mm(q, weight.t(), scale_a=q_scale, scale_b=scale.t(), out_dtype=out_dtype)
        return y if bias is None else y + bias
    return triton_fp8_gemm(q, q_scale, weight, scale, block_n, out_dtype, bias)
