"""The FP8 kernels compile for Hopper (sm_90) without a GPU, as the H200 will compile them.

Triton's interpreter, which runs the other kernel tests here, never compiles: a kernel can pass it
and still fail to build, or build into byte-wide loads. So a child process (the interpreter is on
in this one) compiles the GEMV, the GEMM and the activation quantization ahead of time for sm_90
and this test reads their PTX: 16-byte weight loads in the GEMV, wgmma in the large-tile GEMM.
"""

import json
import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from sfllm_core.kernels import fp8_gemm, fp8_gemv

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
    ResidualOut="*bf16", N="i32", stride_xm="i32", stride_w="i32", stride_s="i32", stride_om="i32",
    stride_rm="i32", stride_rom="i32", eps="fp32",
)
for name, (m, k, blockwise, act, norm, bn, bk, warps) in {
    "gemv_normed_channel": (1, 4096, False, 0, True, 16, 512, 8),
    "gemv_block": (2, 4096, True, 0, False, 16, 256, 4),
    "gemv_gated_block": (1, 12288, True, 1, False, 8, 1024, 8),
}.items():
    constexprs = dict(
        M=m, K=k, SCALE_BN=128 if blockwise else 1, SCALE_BK=128, BLOCKWISE=blockwise, HAS_BIAS=False, ACT=act,
        NORM=norm, HAS_RESIDUAL=norm, GEMMA=False, BLOCK_N=bn, BLOCK_K=bk, BLOCK_STATS=min(k, 8192), USE_PDL=True,
    )
    out[name] = build(fp8_gemv._fp8_gemv_kernel, gemv_types, constexprs, num_warps=warps)
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


def test_every_fp8_kernel_compiles_for_sm90(ptx):
    gemvs = {"gemv_normed_channel", "gemv_block", "gemv_gated_block"}
    assert set(ptx) == gemvs | {"gemm_block", "gemm_channel_small", "quant_gated_groups"}
    assert all(".target sm_90" in text for text in ptx.values())


def test_gemv_streams_weights_in_16_byte_loads(ptx):
    for name in ("gemv_normed_channel", "gemv_block", "gemv_gated_block"):
        assert "ld.global.v4.b32" in ptx[name] or "ld.global.nc.v4.b32" in ptx[name], name
        assert "ld.global.b8 " not in ptx[name] and "ld.global.u8 " not in ptx[name], name


def test_gemm_multiplies_fp8_on_tensor_cores(ptx):
    assert "wgmma.mma_async" in ptx["gemm_block"] and "e4m3" in ptx["gemm_block"]
    assert "mma.sync" in ptx["gemm_channel_small"] or "wgmma" in ptx["gemm_channel_small"]
