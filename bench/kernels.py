"""GPU micro-benchmark of the Triton attention kernels against their memory-bandwidth floor.

Decode: batch 1/64/256 at 1k context, page size 16, bf16, for the Qwen3-0.6B shape (16 q heads,
8 kv heads, head dim 128) and Gemma3 shapes (head dim 256). The floor is the K/V bytes a step must
read divided by the measured device-to-device copy bandwidth (bytes read + written). Each timing is
the median replay of a CUDA graph that runs the kernel over several input sets, so launch gaps and
L2 residency stay out of the numbers. Also sweeps the split count (to check decode_num_splits) and
stage 1's (BLOCK_N, num_warps, num_stages) (to check _launch_config).
Prints a table last. Usage: python3 bench/kernels.py [--json out.json]
"""

import argparse
import json

import torch
import triton

from sfllm_core.kernels import decode_attention as decode_module
from sfllm_core.kernels import extend_attention as extend_module
from sfllm_core.kernels.decode_attention import decode_attention, decode_num_splits
from sfllm_core.kernels.extend_attention import extend_attention

SHAPES = {"qwen3-0.6b": (16, 8, 128), "gemma3-1b": (4, 1, 256), "gemma3-4b": (8, 4, 256)}
PAGE_SIZE = 16
CONTEXT = 1024


def copy_bandwidth() -> float:
    """Bytes read plus written per second by a large device-to-device copy."""
    x = torch.randn(512 * 1024 * 1024, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3)


def graph_time_ms(calls: list) -> float:
    """Median time of one call, from replays of a graph holding all of them."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = triton.testing.do_bench(graph.replay, warmup=20, rep=200, return_mode="median")
    return ms / len(calls)


def decode_case(
    num_heads: int, num_kv_heads: int, head_dim: int, batch: int, splits: list[int], configs: list[tuple] = ()
) -> dict:
    kv_bytes = batch * CONTEXT * num_kv_heads * head_dim * 2 * 2  # K and V, bf16
    # Enough independent input sets that together they overflow L2 (50-60 MB).
    sets = max(1, min(64, triton.cdiv(256 * 2**20, kv_bytes)))
    pages_per_seq = CONTEXT // PAGE_SIZE
    num_pages = sets * batch * pages_per_seq + 1
    k_cache = torch.randn(num_pages * PAGE_SIZE, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    perm = (torch.randperm(num_pages - 1, device="cuda") + 1).to(torch.int32)
    tables = perm.view(sets, batch, pages_per_seq)
    seq_lens = torch.full((batch,), CONTEXT, dtype=torch.int32, device="cuda")
    qs = [torch.randn(batch, num_heads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(sets)]
    outs = [torch.empty_like(q) for q in qs]
    scale = head_dim**-0.5
    result = {"kv_bytes": kv_bytes, "times": {}}
    for num_splits in splits:

        def make(i: int, num_splits: int = num_splits):
            return lambda: decode_attention(
                qs[i], k_cache, v_cache, tables[i], seq_lens, outs[i], PAGE_SIZE, scale, None, num_splits
            )

        result["times"][num_splits] = graph_time_ms([make(i) for i in range(sets)])
    default = decode_module._launch_config
    chosen = decode_num_splits(batch, num_kv_heads, CONTEXT, torch.device("cuda"))
    result["configs"] = {}
    try:
        for config in configs:
            decode_module._launch_config = lambda *args, config=config: config
            result["configs"][config] = graph_time_ms([make(i, chosen) for i in range(sets)])
    finally:
        decode_module._launch_config = default
    return result


def extend_case(num_heads: int, num_kv_heads: int, head_dim: int, tokens: int, configs=()) -> tuple[float, float]:
    """One whole prefill of `tokens`; returns (ms, TFLOP/s counting only the causal half) of the default config."""
    pages = tokens // PAGE_SIZE
    k_cache = torch.randn((pages + 1) * PAGE_SIZE, num_kv_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    table = (torch.randperm(pages, device="cuda") + 1).to(torch.int32)[None]
    q = torch.randn(tokens, num_heads, head_dim, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    qsl = torch.tensor([0, tokens], dtype=torch.int32, device="cuda")
    seq_lens = torch.tensor([tokens], dtype=torch.int32, device="cuda")

    def call():
        extend_attention(q, k_cache, v_cache, out, qsl, seq_lens, table, tokens, PAGE_SIZE, head_dim**-0.5, None)

    flops = 4 * num_heads * head_dim * tokens * tokens / 2
    default = extend_module._launch_config
    times = {}
    try:
        for config in [default(head_dim, q.device), *configs]:
            extend_module._launch_config = lambda *args, config=config: config
            times[config] = graph_time_ms([call])
    finally:
        extend_module._launch_config = default
    print("prefill", num_heads, num_kv_heads, head_dim, {c: round(t * 1e3, 1) for c, t in times.items()}, flush=True)
    ms = times[default(head_dim, q.device)]
    return ms, flops / (ms * 1e-3) / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--json", help="also write the numbers here")
    args = parser.parse_args()
    device = torch.device("cuda")
    bandwidth = copy_bandwidth()
    rows, record = [], {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "decode": []}
    for name, (num_heads, num_kv_heads, head_dim) in SHAPES.items():
        for batch in (1, 64, 256):
            chosen = decode_num_splits(batch, num_kv_heads, CONTEXT, device)
            candidates = sorted({chosen, 1, 2, 4, 8, 16} if batch == 1 else {chosen, 1, 2, 4})
            configs = [(32, 4, 2), (64, 4, 3), (64, 8, 2), (128, 4, 2), (32, 4, 4), (16, 4, 3)]
            case = decode_case(num_heads, num_kv_heads, head_dim, batch, candidates, configs)
            floor_us = case["kv_bytes"] / bandwidth * 1e6
            best = min(case["times"], key=case["times"].get)
            ours_us = case["times"][chosen] * 1e3
            best_config = min(case["configs"], key=case["configs"].get)
            rows.append((name, batch, chosen, ours_us, best, case["times"][best] * 1e3, floor_us))
            configs_us = {str(c): t * 1e3 for c, t in case["configs"].items()}
            print(name, batch, "splits us", {k: round(v * 1e3, 1) for k, v in case["times"].items()}, flush=True)
            print(name, batch, "configs us", {k: round(v, 1) for k, v in configs_us.items()}, best_config, flush=True)
            record["decode"].append(
                {
                    "shape": name,
                    "batch": batch,
                    "kv_bytes": case["kv_bytes"],
                    "times_ms": case["times"],
                    "configs_us": configs_us,
                    "chosen": chosen,
                    "floor_us": floor_us,
                }
            )
    prefill = []
    sweeps = {
        "qwen3-0.6b": [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 2), (64, 32, 4, 3), (128, 64, 4, 2)],
        "gemma3-1b": [(64, 64, 8, 2), (64, 32, 4, 2), (64, 32, 8, 3), (32, 64, 4, 2), (128, 32, 8, 2)],
    }
    for name, configs in sweeps.items():
        ms, tflops = extend_case(*SHAPES[name], tokens=4096, configs=configs)
        prefill.append((name, ms, tflops))
    record["prefill"] = prefill
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)

    print(f"\n{record['device']}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    print(
        "prefill 4096 tokens (extend kernel): "
        + ", ".join(f"{n} {ms:.3f} ms {tf:.0f} TFLOP/s" for n, ms, tf in prefill)
    )
    print(f"decode, context {CONTEXT}, page {PAGE_SIZE}, bf16 (per call, from graph replays)")
    print(f"{'shape':<11} {'batch':>5} {'splits':>6} {'us':>8} {'best':>12} {'floor us':>9} {'of floor':>8}")
    for name, batch, chosen, ours, best, best_us, floor_us in rows:
        print(
            f"{name:<11} {batch:>5} {chosen:>6} {ours:>8.1f} {best:>3}:{best_us:>8.1f} {floor_us:>9.1f} "
            f"{floor_us / ours:>8.0%}"
        )


if __name__ == "__main__":
    main()
