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

FP8 weights (layers/fp8.py) run the same kernel given their float32 scales. With one row of x a
program walks several row blocks (`one_row_fp8_config`), making its input once for all of them: an
input made per block (a gated [gate | up] row of Qwen3-8B's down projection is 48 KB) read more
from L2 than the weights from HBM; where it pays it loads the next block while it sums one.
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
# FP8 launches with one row of x take one_row_fp8_config's tile, row walk and prefetch; the earlier
# rule (launch_config's 16 KB tile, row_iters) stays for several rows and for configs given by hand.

ACTIVATIONS = {None: 0, "silu": 1, "gelu_tanh": 2}
_num_sms: dict[int, int] = {}


@triton.jit
def _load_rows(W, Scale, rows_w, offs_k, N, stride_w, stride_s, K, SCALE, SCALE_BN, BLOCK_K):
    """A tile of whole weight rows and, for FP8 weights (w = q * scale), their scales: one per row
    block, applied to the row sums, or one per row block and 128 columns, applied to each run's sum."""
    w = tl.load(
        W + rows_w[:, None].to(tl.int64) * stride_w + offs_k[None, :],
        mask=(rows_w[:, None] < N) & (offs_k[None, :] < K),
        other=0.0,
    )
    s = 1.0
    if SCALE == 1:
        s = tl.load(Scale + (rows_w // SCALE_BN) * stride_s, mask=rows_w < N, other=0.0)
    if SCALE == 2:
        runs = tl.arange(0, BLOCK_K // 128)
        s = tl.load(
            Scale + (rows_w // SCALE_BN)[:, None] * stride_s + runs[None, :],
            mask=(rows_w[:, None] < N) & (runs[None, :] * 128 < K),
            other=0.0,
        )
    return w, s


@triton.jit
def _input_row(
    X, Residual, ResidualOut, m, offs_k, norm_w, x_norm_w, stride_xm, stride_rm, stride_rom, eps, x_eps, first,
    K, ACT, NORM, HAS_RESIDUAL, NORM_X, GEMMA, dtype,
):  # fmt: skip
    """Row m of the GEMV's input in float32: x as it is, act(gate) * up, or RMSNorm(h + residual) (the
    program holding row 0 of the weight also writes the new residual stream)."""
    k_mask = offs_k < K
    x_row = X + m * stride_xm
    if NORM:
        r = tl.load(Residual + m * stride_rm + offs_k, mask=k_mask, other=0.0)
        h = tl.load(x_row + offs_k, mask=k_mask, other=0.0)
        x, new_residual = add_norm_row(h, r, norm_w, x_norm_w, eps, x_eps, K, dtype, HAS_RESIDUAL, NORM_X, GEMMA)
        if HAS_RESIDUAL:
            if first:
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
    return x


@triton.jit
def _store_rows(
    Out, Bias, w, s, x, m, rows_w, N, stride_om, SCALE, HAS_BIAS, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype
):
    if SCALE == 2:
        out = tl.sum(tl.sum(tl.reshape(w * x[None, :], [BLOCK_N, BLOCK_K // 128, 128]), axis=2) * s, axis=1)
    else:
        out = tl.sum(w * x[None, :], axis=1)
    if SCALE == 1:
        out = out * s
    if HAS_BIAS:
        out += tl.load(Bias + rows_w, mask=rows_w < N, other=0.0).to(tl.float32)
    tl.store(Out + m * stride_om + rows_w, out.to(dtype), mask=rows_w < N)


@triton.jit
def _gemv_kernel(
    X,
    W,
    Scale,
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
    stride_s,
    K: tl.constexpr,
    SCALE: tl.constexpr,
    SCALE_BN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACT: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    NORM_X: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ROW_ITERS: tl.constexpr,
    PREFETCH: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    first_row = pid * ROW_ITERS * BLOCK_N
    rows_w = first_row + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    # Weights are never written during a step: stream them in before waiting on the producer of x.
    w, s = _load_rows(W, Scale, rows_w, offs_k, N, stride_w, stride_s, K, SCALE, SCALE_BN, BLOCK_K)
    if PREFETCH:
        w_next, s_next = _load_rows(
            W, Scale, rows_w + BLOCK_N, offs_k, N, stride_w, stride_s, K, SCALE, SCALE_BN, BLOCK_K
        )
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    dtype = Out.dtype.element_ty
    norm_w = 0.0
    x_norm_w = 0.0
    if NORM:
        norm_w = tl.load(NormWeight + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        if NORM_X:
            x_norm_w = tl.load(XNormWeight + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        else:
            x_norm_w = norm_w
    if ROW_ITERS == 1:
        w = w.to(tl.float32)
        for m in range(M):
            x = _input_row(
                X, Residual, ResidualOut, m, offs_k, norm_w, x_norm_w, stride_xm, stride_rm, stride_rom, eps,
                x_eps, pid == 0, K, ACT, NORM, HAS_RESIDUAL, NORM_X, GEMMA, dtype,
            )  # fmt: skip
            _store_rows(Out, Bias, w, s, x, m, rows_w, N, stride_om, SCALE, HAS_BIAS, BLOCK_N, BLOCK_K, dtype)
    else:
        # One row of x (M == 1): its input (a norm, an activation) is made once for ROW_ITERS row
        # blocks, not once per block: for a gated or normed input that is wider than the weight rows
        # a program holds, making it per block read more from L2 than the weights from HBM.
        x = _input_row(
            X, Residual, ResidualOut, 0, offs_k, norm_w, x_norm_w, stride_xm, stride_rm, stride_rom, eps,
            x_eps, pid == 0, K, ACT, NORM, HAS_RESIDUAL, NORM_X, GEMMA, dtype,
        )  # fmt: skip
        for i in tl.static_range(ROW_ITERS):
            if i > 0:
                rows_w = first_row + i * BLOCK_N + tl.arange(0, BLOCK_N)
                if PREFETCH:
                    w, s = w_next, s_next
                else:
                    w, s = _load_rows(W, Scale, rows_w, offs_k, N, stride_w, stride_s, K, SCALE, SCALE_BN, BLOCK_K)
            if PREFETCH and i + 1 < ROW_ITERS and i > 0:
                # The next block's load is in flight while this one is summed: without it a program
                # kept one block's bytes in flight, each block waiting for its own load alone.
                w_next, s_next = _load_rows(
                    W, Scale, rows_w + BLOCK_N, offs_k, N, stride_w, stride_s, K, SCALE, SCALE_BN, BLOCK_K
                )
            _store_rows(
                Out, Bias, w.to(tl.float32), s, x, 0, rows_w, N, stride_om, SCALE, HAS_BIAS, BLOCK_N, BLOCK_K, dtype
            )


def launch_config(n: int, k: int, element_size: int, tile: int | None = None) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps): whole rows, as many as fill `tile` elements (default: _TILE for
    16-bit weights, twice that for FP8, so a program holds 16 KB either way)."""
    tile = tile or _TILE * max(1, 2 // element_size)
    block_k = triton.next_power_of_2(k)
    block_n = max(1, min(tile // block_k, 16))
    num_warps = 4 if block_n * block_k <= _TILE else 8
    return block_n, block_k, num_warps


def row_iters(num_rows: int, num_blocks: int, sms: int) -> int:
    """Row blocks per program for FP8 weights with several rows of x or a config given by hand: with
    one row of x as many (up to 8) as leave two programs per SM; with more rows, 1."""
    if num_rows != 1:
        return 1
    return next((r for r in (8, 4, 2) if num_blocks // r >= 2 * sms), 1)


def one_row_fp8_config(n: int, k: int, made_input: bool, sms: int) -> tuple[int, int, int, int, bool]:
    """(BLOCK_N, BLOCK_K, num_warps, ROW_ITERS, PREFETCH) for FP8 weights and one row of x, from an
    H200 sweep of Qwen3-8B's and 0.6B's projections (docs/PERFORMANCE.md, FP8):

    - 4 warps up to 8192 columns, 8 beyond, each thread holding 128 weights of a row block, except
      where x is read as it is into a grid of under 16 programs per SM (o_proj): there 64, in more,
      smaller programs (Qwen3-8B's o_proj 6.2 -> 5.7 us);
    - a program walks row blocks until it holds 16 rows where it makes its input (normed or gated,
      read from L2 and made in registers once for all of them), 4 rows where it reads x as it is
      and is not one of many waves; fewer while the grid would be under one wave;
    - PREFETCH (the next row block loaded while one is summed) where it won: a program walking 4 or
      more blocks of at most 16 KB, in a grid of at most 4 programs per SM (q|k|v: 9.1 -> 8.4 us);
      with more programs, or 32 KB blocks, the doubled registers cost more than it hides.
    """
    block_k = triton.next_power_of_2(k)
    num_warps = 4 if block_k <= 8192 else 8
    block_n = max(1, min(128 * 32 * num_warps // block_k, 16))
    many_waves = triton.cdiv(n, block_n) >= 16 * sms
    if not made_input and not many_waves:
        block_n = max(1, block_n // 2)
    blocks = triton.cdiv(n, block_n)
    iters = max(1, (16 if made_input else 1 if many_waves else 4) // block_n)
    while iters > 1 and blocks // iters < sms:
        iters //= 2
    prefetch = iters >= 4 and block_n * block_k <= 16384 and triton.cdiv(blocks, iters) <= 4 * sms
    return block_n, block_k, num_warps, iters, prefetch


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: any small grid
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _num_sms:
        _num_sms[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _num_sms[index]


def _launch(
    x, weight, bias, out, activation, residual, norm_weight, x_norm_weight, residual_out, eps, x_eps, gemma,
    scale=None, scale_block_n=1, config=None, iters=None, prefetch=None,
):  # fmt: skip
    num_rows = x.shape[0]
    n, k = weight.shape
    sms = _sm_count(x.device)
    auto_prefetch = False
    if config is None and scale is not None and num_rows == 1:
        made_input = activation is not None or norm_weight is not None
        block_n, block_k, num_warps, auto_iters, auto_prefetch = one_row_fp8_config(n, k, made_input, sms)
        iters = iters or auto_iters
    else:
        block_n, block_k, num_warps = config or launch_config(n, k, weight.element_size())
    blocks = triton.cdiv(n, block_n)
    # Row sharing measured faster for FP8 weights only (H200: Qwen3-8B's gated down 43.0 -> 22.4 us);
    # bf16 rows, twice the bytes, lost with it (its down 25.3 -> 36.8 us), so they keep a block a program.
    iters = iters or (row_iters(num_rows, blocks, sms) if scale is not None else 1)
    assert iters == 1 or num_rows == 1, "row blocks share a program only for one row of x"
    normed = norm_weight is not None
    scale_mode = 0 if scale is None else (1 if scale.shape[1] == 1 else 2)
    _gemv_kernel[(triton.cdiv(blocks, iters),)](
        x,
        weight,
        weight if scale is None else scale,
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
        0 if scale is None else scale.stride(0),
        K=k,
        SCALE=scale_mode,
        SCALE_BN=scale_block_n,
        HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[activation],
        NORM=normed,
        HAS_RESIDUAL=residual is not None,
        NORM_X=x_norm_weight is not None,
        GEMMA=gemma,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        ROW_ITERS=iters,
        PREFETCH=iters > 1 and (auto_prefetch if prefetch is None else prefetch),
        num_warps=num_warps,
        **pdl_launch(x.device),
    )


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, width: int) -> None:
    num_rows = x.shape[0]
    n, k = weight.shape
    assert x.dim() == 2 and x.shape[1] == width, "x does not match the weight's input size"
    assert 1 <= num_rows <= MAX_ROWS and x.stride(1) == 1 and weight.stride(1) == 1
    assert bias is None or (bias.shape == (n,) and bias.is_contiguous())


def _check_scale(weight: torch.Tensor, scale: torch.Tensor | None, block_n: int) -> None:
    if scale is None:
        return
    n, k = weight.shape
    assert weight.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32 and scale.stride(1) == 1
    assert scale.shape in ((triton.cdiv(n, block_n), 1), (triton.cdiv(n, block_n), triton.cdiv(k, 128))), (
        "scales are one per row block, or one per row block and 128 columns"
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    *,
    scale: torch.Tensor | None = None,
    scale_block_n: int = 1,
    config: tuple[int, int, int] | None = None,
    iters: int | None = None,
    prefetch: bool | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight[N, K].T + bias for small M (at most 8), into a new [M, N] tensor.

    With activation "silu" or "gelu_tanh", x is [M, 2K] laid out [gate | up] and the product
    uses act(gate) * up in its place, so the activation costs no launch of its own.
    An FP8 weight (float8_e4m3fn) comes with float32 `scale`s of blocks of scale_block_n rows and
    all columns ([ceil(N / scale_block_n), 1]) or 128 columns ([.., ceil(K / 128)]): layers/fp8.py's
    layouts. config (BLOCK_N, BLOCK_K, num_warps) and iters (row blocks per program) replace
    `launch_config`'s and `row_iters`' choices (benchmarks).
    """
    k = weight.shape[1]
    _check(x, weight, bias, k if activation is None else 2 * k)
    _check_scale(weight, scale, scale_block_n)
    out = torch.empty(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    _launch(
        x, weight, bias, out, activation, None, None, None, None, 0.0, 0.0, False, scale, scale_block_n, config, iters,
        prefetch,
    )  # fmt: skip
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
    *,
    scale: torch.Tensor | None = None,
    scale_block_n: int = 1,
    config: tuple[int, int, int] | None = None,
    iters: int | None = None,
    prefetch: bool | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(h + residual) @ weight.T + bias, h + residual): the norm of kernels/rmsnorm.py, fused.

    Without residual the norm applies to h alone and h is returned as the residual stream; with
    x_norm_weight, h is first normalised by it (Gemma's sandwich norms), as in `rmsnorm`. FP8
    weights come with `scale` as in `gemv`.
    """
    k = weight.shape[1]
    _check(h, weight, bias, k)
    _check_scale(weight, scale, scale_block_n)
    assert norm_weight.shape == (k,) and norm_weight.is_contiguous()
    assert residual is None or (residual.shape == h.shape and residual.stride(1) == 1)
    assert x_norm_weight is None or (residual is not None and x_norm_weight.is_contiguous())
    out = torch.empty(h.shape[0], weight.shape[0], dtype=h.dtype, device=h.device)
    residual_out = None if residual is None else torch.empty_like(residual)
    _launch(
        h, weight, bias, out, None, residual, norm_weight, x_norm_weight, residual_out, eps, x_eps, gemma,
        scale, scale_block_n, config, iters, prefetch,
    )  # fmt: skip
    return out, (h if residual is None else residual_out)
