"""The FP8 kernels compile for Hopper (sm_90) without a GPU, as the H200 will compile them.

Triton's interpreter, which runs the other kernel tests here, never compiles: a kernel can pass it
and still fail to build, or build into byte-wide loads. So a child process (the interpreter is on
in this one) compiles the GEMV (kernels/gemv.py with FP8 weights, at the launch configs Qwen3-8B's
projections get at batch 1), the GEMM and the activation quantization ahead of time for sm_90 and this test
reads their PTX: wide weight loads in the GEMV, wgmma in the large-tile GEMM.
"""

import json
import os
import re
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sfllm_core.kernels import fp8_gemm, gemv
from sfllm_core.kernels.gemv import one_row_fp8_config

TARGET = GPUTarget("cuda", 90, 32)


def build(fn, types, constexprs, **options):
    names = fn.arg_names
    signature = {n: "constexpr" if n in constexprs else types[n] for n in names}
    # As a launch specializes them: pointers and strides of real tensors are multiples of 16.
    attrs = {
        (names.index(n),): [["tt.divisibility", 16]]
        for n in names
        if n not in constexprs and (types[n].startswith("*") or n.startswith("stride"))
    }
    positions = {(names.index(k),): v for k, v in constexprs.items()}
    source = ASTSource(fn=fn, signature=signature, constexprs=positions, attrs=attrs)
    return triton.compile(source, target=TARGET, options=options).asm["ptx"]


out = {}
gemv_types = dict(
    X="*bf16", W="*fp8e4nv", Scale="*fp32", Bias="*bf16", Out="*bf16", Residual="*bf16", NormWeight="*bf16",
    XNormWeight="*bf16", ResidualOut="*bf16", M="i32", N="i32", stride_xm="i32", stride_w="i32", stride_om="i32",
    stride_rm="i32", stride_rom="i32", eps="fp32", x_eps="fp32", stride_s="i32",
)
# Qwen3-8B's projections as layers/fp8.py launches them (scales per channel, or 128x128 blocks).
for name, (n, k, blockwise, act, norm) in {
    "8b_qkv": (6144, 4096, False, 0, True),
    "8b_o": (4096, 4096, False, 0, False),
    "8b_gate_up_block": (24576, 4096, True, 0, True),
    "8b_down_block": (4096, 12288, True, 1, False),
    "8b_lm_head": (151936, 4096, False, 0, False),
}.items():
    bn, bk, warps, iters, prefetch = one_row_fp8_config(n, k, bool(act or norm), 132)
    constexprs = dict(
        K=k, SCALE=2 if blockwise else 1, SCALE_BN=128 if blockwise else 1, HAS_BIAS=False, ACT=act, NORM=norm,
        HAS_RESIDUAL=norm, NORM_X=False, GEMMA=False, BLOCK_N=bn, BLOCK_K=bk, USE_PDL=True,
        ROW_ITERS=iters, PREFETCH=prefetch,
    )
    out[name] = build(gemv._gemv_kernel, gemv_types, constexprs, num_warps=warps)
gemm_types = dict(
    A="*fp8e4nv", B="*fp8e4nv", SA="*fp32", SB="*fp32", C="*bf16", Bias="*bf16", M="i32", N="i32", K="i32",
    stride_am="i32", stride_bn="i32", stride_cm="i32", stride_sam="i32", stride_sag="i32", stride_sbn="i32",
    stride_sbk="i32",
)
for name, (bm, grouped, warps) in {"gemm_block": (128, True, 8), "gemm_channel_small": (16, False, 4)}.items():
    constexprs = dict(SCALE_BN=128, GROUPED=grouped, HAS_BIAS=False, BLOCK_M=bm, BLOCK_N=128, BLOCK_K=128, GROUP_M=8)
    out[name] = build(fp8_gemm._fp8_gemm_kernel, gemm_types, constexprs, num_warps=warps, num_stages=4)
quant_types = dict(X="*bf16", Q="*fp8e4nv", S="*fp32", stride_x="i32", stride_q="i32", stride_sm="i32", stride_sg="i32")
constexprs = dict(K=12288, GROUP_K=128, BLOCK=128, ACT=1, USE_PDL=True)
out["quant_gated_groups"] = build(fp8_gemm._quant_rows_kernel, quant_types, constexprs, num_warps=4)
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def ptx() -> dict[str, str]:
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default launches use; silences Triton 3.9's warning
    done = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


GEMVS_8B = {"8b_qkv", "8b_o", "8b_gate_up_block", "8b_down_block", "8b_lm_head"}


def test_every_fp8_kernel_compiles_for_sm90(ptx):
    assert set(ptx) == GEMVS_8B | {"gemm_block", "gemm_channel_small", "quant_gated_groups"}
    assert all(".target sm_90" in text for text in ptx.values())


def test_gemv_streams_weights_in_wide_loads(ptx):
    # At least 8 fp8 weights a load (v2.b32 or v4.b32): never byte by byte.
    for name in GEMVS_8B:
        assert re.search(r"ld\.global(?:\.nc)?(?:\.L1::\S+)?\.v[24]\.b32", ptx[name]), name
        assert "ld.global.b8 " not in ptx[name] and "ld.global.u8 " not in ptx[name], name


def test_gemm_multiplies_fp8_on_tensor_cores(ptx):
    assert "wgmma.mma_async" in ptx["gemm_block"] and "e4m3" in ptx["gemm_block"]
    assert "mma.sync" in ptx["gemm_channel_small"] or "wgmma" in ptx["gemm_channel_small"]
