"""GPU micro-benchmark of the decode GEMV (kernels/gemv.py) against cuBLAS, with and without PDL.

One decoder layer's projections chained as in a decode step (norm+q|k|v, o, norm+gate|up, gated
down), for every layer of the model with its own random bf16 weights, so weights stream from HBM
as they do in the engine; then the output projection. Each figure is the median replay of a CUDA
graph holding the whole chain, per layer, beside the floor: weight bytes over the copy bandwidth
measured in the same run. "separate" is the same chain without the fusions: the Triton norm and
activation kernels around cuBLAS (F.linear). Each runs with PDL (kernels/pdl.py set_pdl) and without.
Prints a table last. Usage: python3 bench/gemv.py [--json out.json]
"""

import argparse
import json

import torch
import torch.nn.functional as F
import triton

from sfllm_core.kernels.activation import silu_and_mul
from sfllm_core.kernels.gemv import gemv, gemv_normed
from sfllm_core.kernels.pdl import set_pdl
from sfllm_core.kernels.rmsnorm import rmsnorm

# hidden, q heads, kv heads, head dim, intermediate, layers, vocab
SHAPES = {"qwen3-0.6b": (1024, 16, 8, 128, 3072, 28, 151936), "qwen3-8b": (4096, 32, 8, 128, 12288, 36, 151936)}


def copy_bandwidth() -> float:
    x = torch.randn(512 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def make_weights(shape, gen):
    hidden, hq, hkv, d, inter, layers, vocab = shape

    def w(n, k):
        return (torch.randn(n, k, device="cuda", generator=gen) / k**0.5).to(torch.bfloat16)

    weights = [
        (w((hq + 2 * hkv) * d, hidden), w(hidden, hq * d), w(2 * inter, hidden), w(hidden, inter))
        for _ in range(layers)
    ]
    return weights, w(vocab, hidden)


def graph_ms(fn) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median")


_weights: dict = {}


def layer_chain(shape, rows: int):
    hidden, hq, hkv, d, inter, layers, vocab = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    if shape not in _weights:
        _weights.clear()
        torch.cuda.empty_cache()
        _weights[shape] = make_weights(shape, gen)
    weights, lm_head = _weights[shape]

    norm_w = torch.ones(hidden, device="cuda", dtype=torch.bfloat16)
    h0 = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    layer_bytes = sum(t.numel() * 2 for t in weights[0])

    def fused():
        h, residual = h0, h0
        for qkv_w, o_w, gu_w, down_w in weights:
            qkv, residual = gemv_normed(h, qkv_w, None, norm_w, 1e-6, False, residual)
            o = gemv(qkv[:, : hq * d], o_w)
            gate_up, residual = gemv_normed(o, gu_w, None, norm_w, 1e-6, False, residual)
            h = gemv(gate_up, down_w, activation="silu")

    def separate():
        h, residual = h0, h0
        for qkv_w, o_w, gu_w, down_w in weights:
            x, residual = rmsnorm(h, norm_w, 1e-6, False, residual)
            qkv = F.linear(x, qkv_w)
            o = F.linear(qkv[:, : hq * d], o_w)
            x, residual = rmsnorm(o, norm_w, 1e-6, False, residual)
            h = F.linear(silu_and_mul(F.linear(x, gu_w)), down_w)

    head_x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    return (
        fused,
        separate,
        lambda: gemv(head_x, lm_head),
        lambda: F.linear(head_x, lm_head),
        layer_bytes,
        layers,
        lm_head.numel() * 2,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json")
    args = parser.parse_args()
    bw = copy_bandwidth()
    rows_out = []
    for name, shape in SHAPES.items():
        for rows in (1, 2, 4, 8):
            fused, separate, head_ours, head_cublas, layer_bytes, layers, head_bytes = layer_chain(shape, rows)
            res = {"shape": name, "rows": rows}
            for pdl in ("1", "0"):
                set_pdl(pdl == "1")
                res[f"fused_pdl{pdl}_us"] = graph_ms(fused) * 1e3 / layers
                res[f"separate_pdl{pdl}_us"] = graph_ms(separate) * 1e3 / layers
                res[f"head_ours_pdl{pdl}_us"] = graph_ms(head_ours) * 1e3
            res["head_cublas_us"] = graph_ms(head_cublas) * 1e3
            res["layer_floor_us"] = layer_bytes / bw * 1e6
            res["head_floor_us"] = head_bytes / bw * 1e6
            print(res, flush=True)
            rows_out.append(res)
            del fused, separate, head_ours, head_cublas
            torch.cuda.empty_cache()
    set_pdl(True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bw, "rows": rows_out}, f, indent=1)
    print(f"\n{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s; us per layer (4 projections)")
    print(
        f"{'shape':<11} {'M':>2} {'fused+pdl':>9} {'fused':>7} {'sep+pdl':>8} {'sep':>7} {'floor':>6} "
        f"{'head ours+pdl':>13} {'head ours':>9} {'head cublas':>11} {'floor':>6}"
    )
    for r in rows_out:
        print(
            f"{r['shape']:<11} {r['rows']:>2} {r['fused_pdl1_us']:>9.1f} {r['fused_pdl0_us']:>7.1f} "
            f"{r['separate_pdl1_us']:>8.1f} {r['separate_pdl0_us']:>7.1f} {r['layer_floor_us']:>6.1f} "
            f"{r['head_ours_pdl1_us']:>13.1f} {r['head_ours_pdl0_us']:>9.1f} {r['head_cublas_us']:>11.1f} "
            f"{r['head_floor_us']:>6.1f}"
        )


if __name__ == "__main__":
    main()
