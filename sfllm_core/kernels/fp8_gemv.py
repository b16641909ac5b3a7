"""y = x @ (q * scale).T for 1-4 rows of x: FP8 weights streamed once, bfloat16 activations.

The decode-time projection of an FP8 model (layers/fp8.py). A step at batch 1-2 only reads weights,
so fp8 halves it against bfloat16. Each program owns BLOCK_N weight rows and walks K in chunks of
BLOCK_K, keeping the next two chunks' loads in flight while it multiplies one; its first two (and a
per-channel scale) are loaded before it waits on the previous kernel (kernels/pdl.py).

The loop has no barrier, shuffle or shared memory: x is read through the weight tile's own 2-D
offsets (every tile row reads the same columns, from L1), so it arrives in the tile's layout instead
of being converted to it; the column offsets are declared 8-contiguous so that fp8 weights (8 bytes
a load) and bfloat16 x (16 bytes) get one layout. Each thread sums its runs of 8 columns into a
[BLOCK_N, BLOCK_K / 8] accumulator (block scales multiply those runs: 8 divides 128), and the rows
are reduced across threads once, after the loop. (The first version converted x's layout through
shared memory and reduced across warps in every chunk: 2-10 bar.sync per 8 KB of weights in the
sm_90 PTX, and about 2 TB/s on the H200 as inferred from the batch-1 step.) A per-channel scale
applies per row at the end.

As kernels/gemv.py, the input can be produced inside the kernel:
- gated (activation "silu" / "gelu_tanh"): x is [gate | up] and the product uses act(gate) * up;
- normed (`fp8_gemv_normed`): x = RMSNorm(h + residual). Every program first sums the squares of
  its rows in one wide load (h and residual are a few KB, in L2), then normalises each chunk as it goes;
  program 0's first tile row alone writes the new residual stream, to a fresh buffer.
Both round where the eager model rounds (the activation dtype after the add, the norm, the act).
"""

import math

import torch
import triton
import triton.language as tl

from sfllm_core.kernels.pdl import pdl_launch

MAX_ROWS = 4
ACTIVATIONS = {None: 0, "silu": 1, "gelu_tanh": 2}
# Bytes (= elements) of the weight chunk a program loads per step (BLOCK_N x BLOCK_K): 8 KB, with two
# more in flight; with two programs per SM (~100 registers a thread at 8 warps, ptxas -v) that keeps
# 48 KB per SM in flight, past what Little's law asks of HBM3e at ~1 us latency.
_TILE = 8192
# Programs resident per SM at that register use: the unit of a wave.
_PROGRAMS_PER_SM = 2
# The norm's sums of squares read their rows in pieces this wide: one piece for the served models'
# hidden sizes, so the pass costs one L2 round trip while the first weight chunk streams in.
_STATS_BLOCK = 8192
_num_sms: dict[int, int] = {}


@triton.jit
def _row_sumsq(
    X, Residual, m, stride_xm, stride_rm, K: tl.constexpr, BLOCK_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr, dtype
):
    """Sum of squares of row m of (x + residual), the sum rounded to dtype first as the eager add does."""
    offs_k = tl.arange(0, BLOCK_K)
    sq = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs = k0 + offs_k
        v = tl.load(X + m * stride_xm + offs, mask=offs < K, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(Residual + m * stride_rm + offs, mask=offs < K, other=0.0)
            v = (v.to(tl.float32) + r.to(tl.float32)).to(dtype)
        v = v.to(tl.float32)
        sq += v * v
    return tl.sum(sq, axis=0)


@triton.jit
def _x_chunk(
    X,
    Residual,
    ResidualOut,
    NormWeight,
    m,
    offs,
    first_row,
    rstd,
    stride_xm,
    stride_rm,
    stride_rom,
    K: tl.constexpr,
    ACT: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    GEMMA: tl.constexpr,
    dtype,
):
    """Columns offs of row m of the GEMV's input, in float32 (normed, gated or as it is)."""
    k_mask = offs < K
    x_row = X + m * stride_xm
    if NORM:
        v = tl.load(x_row + offs, mask=k_mask, other=0.0)
        if HAS_RESIDUAL:
            r = tl.load(Residual + m * stride_rm + offs, mask=k_mask, other=0.0)
            v = (v.to(tl.float32) + r.to(tl.float32)).to(dtype)
            tl.store(ResidualOut + m * stride_rom + offs, v, mask=k_mask & first_row)
        nw = tl.load(NormWeight + offs, mask=k_mask, other=0.0).to(tl.float32)
        if GEMMA:
            x = (v.to(tl.float32) * rstd) * (1.0 + nw)
        else:
            # Qwen3 rounds the normalised row to the activation dtype before the weight multiplies it.
            x = nw * (v.to(tl.float32) * rstd).to(dtype).to(tl.float32)
        x = x.to(dtype).to(tl.float32)
    elif ACT == 0:
        x = tl.load(x_row + offs, mask=k_mask, other=0.0).to(tl.float32)
    else:
        gate = tl.load(x_row + offs, mask=k_mask, other=0.0).to(tl.float32)
        up = tl.load(x_row + K + offs, mask=k_mask, other=0.0).to(tl.float32)
        if ACT == 1:
            act = gate * tl.sigmoid(gate)
        else:
            # 0.5 * (1 + tanh(z)) == sigmoid(2z): GELU's tanh form without a tanh primitive.
            act = gate * tl.sigmoid(1.5957691216057308 * (gate + 0.044715 * gate * gate * gate))
        x = (act.to(dtype).to(tl.float32) * up).to(dtype).to(tl.float32)
    return x


@triton.jit
def _partial(w, x, sb, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCKWISE: tl.constexpr):
    """w * x summed over each run of 8 columns, [BLOCK_N, BLOCK_K // 8] (inside a thread: its 8 columns
    are one load), times the runs' block scales with BLOCKWISE."""
    part = tl.sum(tl.reshape(w * x, [BLOCK_N, BLOCK_K // 8, 8]), axis=2)
    if BLOCKWISE:
        part = part * sb
    return part


@triton.jit
def _fp8_gemv_kernel(
    X,
    W,
    Scale,
    Bias,
    Out,
    Residual,
    NormWeight,
    ResidualOut,
    N,
    stride_xm,
    stride_w,
    stride_s,
    stride_om,
    stride_rm,
    stride_rom,
    eps,
    M: tl.constexpr,
    K: tl.constexpr,
    SCALE_BN: tl.constexpr,
    SCALE_BK: tl.constexpr,
    BLOCKWISE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_STATS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    offs_k = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), 8), 8)
    w_rows = W + rows[:, None].to(tl.int64) * stride_w
    s_rows = Scale + (rows // SCALE_BN) * stride_s
    # Weights and scales are never written during a step: start streaming before waiting on x's producer.
    # Two chunks in flight ahead of the one being multiplied; both first ones before the wait.
    w = tl.load(w_rows + offs_k[None, :], mask=row_mask[:, None] & (offs_k[None, :] < K), other=0.0)
    second = offs_k + BLOCK_K
    w1 = tl.load(w_rows + second[None, :], mask=row_mask[:, None] & (second[None, :] < K), other=0.0)
    if not BLOCKWISE:
        s = tl.load(s_rows, mask=row_mask, other=0.0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    dtype = Out.dtype.element_ty
    rstd0 = 0.0
    rstd1 = 0.0
    rstd2 = 0.0
    rstd3 = 0.0
    if NORM:
        rstd0 = tl.rsqrt(
            _row_sumsq(X, Residual, 0, stride_xm, stride_rm, K, BLOCK_STATS, HAS_RESIDUAL, dtype) / K + eps
        )
        if M > 1:
            s1 = _row_sumsq(X, Residual, 1, stride_xm, stride_rm, K, BLOCK_STATS, HAS_RESIDUAL, dtype)
            rstd1 = tl.rsqrt(s1 / K + eps)
        if M > 2:
            s2 = _row_sumsq(X, Residual, 2, stride_xm, stride_rm, K, BLOCK_STATS, HAS_RESIDUAL, dtype)
            rstd2 = tl.rsqrt(s2 / K + eps)
        if M > 3:
            s3 = _row_sumsq(X, Residual, 3, stride_xm, stride_rm, K, BLOCK_STATS, HAS_RESIDUAL, dtype)
            rstd3 = tl.rsqrt(s3 / K + eps)
    acc0 = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
    acc1 = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
    acc2 = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
    acc3 = tl.zeros([BLOCK_N, BLOCK_K // 8], tl.float32)
    # The tile row of weight row 0 (program 0's first) writes the new residual stream.
    first_row = (rows == 0)[:, None]
    zero_rows = tl.zeros([BLOCK_N, 1], tl.int32)
    for k0 in range(0, K, BLOCK_K):
        offs = zero_rows + tl.max_contiguous(tl.multiple_of(k0 + offs_k, 8), 8)[None, :]
        ahead = offs + 2 * BLOCK_K
        w2 = tl.load(w_rows + ahead, mask=row_mask[:, None] & (ahead < K), other=0.0)
        wf = w.to(tl.float32)
        sb = 0.0
        if BLOCKWISE:
            # The block scale of every 8 columns (8 divides 128): one per thread's run of columns.
            runs = k0 + 8 * tl.arange(0, BLOCK_K // 8)
            run_mask = row_mask[:, None] & (runs[None, :] < K)
            sb = tl.load(s_rows[:, None] + runs[None, :] // SCALE_BK, mask=run_mask, other=0.0)
        x = _x_chunk(
            X, Residual, ResidualOut, NormWeight, 0, offs, first_row, rstd0, stride_xm, stride_rm, stride_rom,
            K, ACT, NORM, HAS_RESIDUAL, GEMMA, dtype,
        )  # fmt: skip
        acc0 += _partial(wf, x, sb, BLOCK_N, BLOCK_K, BLOCKWISE)
        if M > 1:
            x = _x_chunk(
                X, Residual, ResidualOut, NormWeight, 1, offs, first_row, rstd1, stride_xm, stride_rm, stride_rom,
                K, ACT, NORM, HAS_RESIDUAL, GEMMA, dtype,
            )  # fmt: skip
            acc1 += _partial(wf, x, sb, BLOCK_N, BLOCK_K, BLOCKWISE)
        if M > 2:
            x = _x_chunk(
                X, Residual, ResidualOut, NormWeight, 2, offs, first_row, rstd2, stride_xm, stride_rm, stride_rom,
                K, ACT, NORM, HAS_RESIDUAL, GEMMA, dtype,
            )  # fmt: skip
            acc2 += _partial(wf, x, sb, BLOCK_N, BLOCK_K, BLOCKWISE)
        if M > 3:
            x = _x_chunk(
                X, Residual, ResidualOut, NormWeight, 3, offs, first_row, rstd3, stride_xm, stride_rm, stride_rom,
                K, ACT, NORM, HAS_RESIDUAL, GEMMA, dtype,
            )  # fmt: skip
            acc3 += _partial(wf, x, sb, BLOCK_N, BLOCK_K, BLOCKWISE)
        w = w1
        w1 = w2
    bias = 0.0
    if HAS_BIAS:
        bias = tl.load(Bias + rows, mask=row_mask, other=0.0).to(tl.float32)
    out0 = tl.sum(acc0, axis=1)
    out1 = tl.sum(acc1, axis=1)
    out2 = tl.sum(acc2, axis=1)
    out3 = tl.sum(acc3, axis=1)
    if not BLOCKWISE:
        out0 = out0 * s
        out1 = out1 * s
        out2 = out2 * s
        out3 = out3 * s
    tl.store(Out + rows, (out0 + bias).to(dtype), mask=row_mask)
    if M > 1:
        tl.store(Out + stride_om + rows, (out1 + bias).to(dtype), mask=row_mask)
    if M > 2:
        tl.store(Out + 2 * stride_om + rows, (out2 + bias).to(dtype), mask=row_mask)
    if M > 3:
        tl.store(Out + 3 * stride_om + rows, (out3 + bias).to(dtype), mask=row_mask)


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: any small grid
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _num_sms:
        _num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _num_sms[index]


def launch_config(rows: int, n: int, k: int, blockwise: bool, sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): row blocks giving at least a full wave of programs (two per SM)
    and little idle in the last wave, the tile's width filled up to _TILE elements per row of x (at
    least 128 columns with block scales)."""
    slots = _PROGRAMS_PER_SM * sms

    def last_wave_idle(block_n: int) -> float:
        waves = triton.cdiv(n, block_n) / slots
        return 1.0 - waves / math.ceil(waves)

    # The largest row block leaving at most a tenth of the slots idle over the waves: Qwen3-8B's q|k|v
    # (6144 rows, 132 SMs) in 16-row blocks fills 1.45 waves (a quarter idle), in 8-row blocks 2.91.
    fitting = [b for b in (32, 16, 8, 4, 2) if triton.cdiv(n, b) >= slots] or [1]
    block_n = next((b for b in fitting if last_wave_idle(b) <= 0.1), min(fitting, key=last_wave_idle))
    # Rows of x reuse the same weight chunk one after another: only 3-4 rows shrink the chunk.
    budget = _TILE if rows <= 2 else _TILE // 2
    block_k = max(min(triton.next_power_of_2(k), max(budget // block_n, 64)), 8)
    if blockwise:
        block_k = max(block_k, 128)
        block_n = max(1, min(block_n, budget // block_k))
    num_warps = 4 if block_n * block_k <= 4096 else 8
    return block_n, block_k, num_warps


def _launch(
    x, weight, scale, block_n, block_k, bias, out, activation, residual, norm_weight, residual_out, eps, gemma, config
):
    m = x.shape[0]
    n, k = weight.shape
    blockwise = scale.shape[1] > 1
    bn, bk, num_warps = config or launch_config(m, n, k, blockwise, _sm_count(x.device))
    _fp8_gemv_kernel[(triton.cdiv(n, bn),)](
        x,
        weight,
        scale,
        weight if bias is None else bias,
        out,
        x if residual is None else residual,
        weight if norm_weight is None else norm_weight,
        out if residual_out is None else residual_out,
        n,
        x.stride(0),
        weight.stride(0),
        scale.stride(0),
        out.stride(0),
        0 if residual is None else residual.stride(0),
        0 if residual_out is None else residual_out.stride(0),
        eps,
        M=m,
        K=k,
        SCALE_BN=block_n,
        SCALE_BK=128,
        BLOCKWISE=blockwise,
        HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[activation],
        NORM=norm_weight is not None,
        HAS_RESIDUAL=residual is not None,
        GEMMA=gemma,
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_STATS=min(triton.next_power_of_2(k), _STATS_BLOCK),
        num_warps=num_warps,
        **pdl_launch(x.device),
    )


def _check(x, weight, scale, block_n, block_k, bias, width):
    n, k = weight.shape
    assert x.dim() == 2 and x.shape[1] == width, "x does not match the weight's input size"
    assert 1 <= x.shape[0] <= MAX_ROWS and x.stride(1) == 1 and weight.is_contiguous()
    assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.stride(1) == 1
    assert scale.shape == (triton.cdiv(n, block_n), triton.cdiv(k, block_k))
    assert scale.shape[1] == 1 or block_k == 128, "block scales cover 128 columns"
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())


def fp8_gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_n: int,
    block_k: int,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """x [M, K] @ (weight * scale)[N, K].T + bias for M <= 4, into a new [M, N] tensor in x's dtype.

    weight is float8_e4m3fn; scale float32 [ceil(N / block_n), ceil(K / block_k)] (one column: per
    row block; else block_k is 128). With activation "silu" or "gelu_tanh", x is [M, 2K] laid out
    [gate | up] and the product uses act(gate) * up in its place. config (BLOCK_N, BLOCK_K,
    num_warps) replaces `launch_config`'s choice (benchmarks sweep it).
    """
    k = weight.shape[1]
    _check(x, weight, scale, block_n, block_k, bias, k if activation is None else 2 * k)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(x, weight, scale, block_n, block_k, bias, out, activation, None, None, None, 0.0, False, config)
    return out


def fp8_gemv_normed(
    h: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    block_n: int,
    block_k: int,
    bias: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    gemma: bool,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h + residual) @ (weight * scale).T + bias, h + residual), as kernels/gemv.py gemv_normed.

    Without residual the norm applies to h alone and h is returned as the residual stream.
    """
    k = weight.shape[1]
    _check(h, weight, scale, block_n, block_k, bias, k)
    assert norm_weight.shape == (k,) and norm_weight.is_contiguous()
    assert residual is None or (residual.shape == h.shape and residual.stride(1) == 1)
    out = torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
    residual_out = None if residual is None else torch.empty_like(residual)
    _launch(h, weight, scale, block_n, block_k, bias, out, None, residual, norm_weight, residual_out, eps, gemma, None)
    return out, (h if residual is None else residual_out)
