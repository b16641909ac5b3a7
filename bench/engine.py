"""GPU engine benchmark: SFLLM against transformers on the same card, same random-weight models.

(a) offline throughput, nano-vllm's workload: N sequences of random token ids, input and output
    lengths uniform in [100, 1024], ignore_eos, seed 0 (peer: generate_batch, paged sdpa);
(b) batch-1 decode: 128-token prompt, 256 new tokens, ms/token (peer: generate, static cache);
(c) decode step time at batch 64 and 256 with 1k-token contexts (peer: generate, static cache);
(d) 64 streams of 256 tokens through the asyncio API (engine loop in its own thread) vs offline;
(r) with --tensor-parallel-size N > 1: the all-reduce alone, NCCL over N GPUs at the decode shapes
    [batch, hidden] in bf16, replayed from a CUDA graph as the engine runs it (two per layer).
Each figure is printed beside its floor: bytes of weights + KV read per step over the copy
bandwidth measured in the same run; for N GPUs, 1/N of the bytes (the ideal split: rank 0 also
reads the whole lm_head, docs/ARCHITECTURE.md). Prints a table last and writes JSON.

Usage: python bench/engine.py [--models qwen3-0.6b qwen3-8b gemma3-1b] [--parts a b c] [--json out.json]
       [--fp8 channel block]  (also FP8 weights, each scheme, beside bf16; bench/fp8.py adds accuracy)
       [--tensor-parallel-size 1 2]  (each model at each size, same run; 1 absent: no single-GPU run)
Several GPUs: run with NCCL_NVLS_ENABLE=0 (NVLink multicast stays off on the lent machines).
"""

import argparse
import asyncio
import cProfile
import gc
import json
import os
import pstats
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers

from sfllm_core.config import EngineConfig
from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.sampling_params import SamplingParams

PROFILE_DIR = os.environ.get("SFLLM_PROFILE_DIR")

SHAPES = {
    "qwen3-0.6b": lambda: transformers.Qwen3Config(
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
    ),
    "qwen3-8b": lambda: transformers.Qwen3Config(
        vocab_size=151936,
        hidden_size=4096,
        intermediate_size=12288,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    ),
    # 65.5 GB of bf16 weights: little KV room left on one H200, the tensor-parallel shape.
    "qwen3-32b": lambda: transformers.Qwen3Config(
        vocab_size=151936,
        hidden_size=5120,
        intermediate_size=25600,
        num_hidden_layers=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        rms_norm_eps=1e-6,
    ),
    "gemma3-1b": lambda: transformers.Gemma3TextConfig(
        vocab_size=262144,
        hidden_size=1152,
        intermediate_size=6912,
        num_hidden_layers=26,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=256,
        max_position_embeddings=32768,
        sliding_window=512,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-6,
        layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(26)],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
    ),
}


def copy_bandwidth() -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    src = torch.randn(512 * 1024 * 1024 // 2, dtype=torch.bfloat16, device="cuda")  # 512 MiB
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(20):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * src.numel() * src.element_size() / times[len(times) // 2]


def weight_bytes(config, fp8: bool = False, tp: int = 1) -> int:
    """Bytes of weights a decode step reads; fp8: the layers' projections at one byte (lm_head stays bf16).
    tp: per GPU of an ideal tp-way split."""
    h, v, layers = config.hidden_size, config.vocab_size, config.num_hidden_layers
    heads, kv, d, inter = (
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
        config.intermediate_size,
    )
    per_layer = h * (heads * d + 2 * kv * d) + heads * d * h + 3 * h * inter
    lm_head = v * h  # read whole every step; the embedding lookup reads only a few rows
    return ((1 if fp8 else 2) * layers * per_layer + 2 * lm_head) // tp


def kv_bytes_per_token(config) -> int:
    return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 2


def kv_read_bytes(config, context: int) -> int:
    """KV bytes one decode step reads for one sequence (sliding layers read only their window)."""
    per_layer = 2 * config.num_key_value_heads * config.head_dim * 2
    types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
    window = getattr(config, "sliding_window", None) or context
    return sum(per_layer * (min(context, window) if t == "sliding_attention" else context) for t in types)


def sync_time(fn) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start


def workload(n: int, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    g = torch.Generator().manual_seed(seed)
    in_lens = torch.randint(100, 1025, (n,), generator=g).tolist()
    out_lens = torch.randint(100, 1025, (n,), generator=g).tolist()
    prompts = [torch.randint(0, 10000, (k,), generator=g).tolist() for k in in_lens]
    return prompts, out_lens


def ours(name: str, config, parts: list[str], n_seqs: int, bw: float, c_batches=(64, 256), **overrides) -> dict:
    """SFLLM's figures; overrides go to EngineConfig (quantization="fp8", fp8_scheme=... for FP8)."""
    start = time.perf_counter()
    engine = InferenceEngine(
        config=EngineConfig(
            dtype="bfloat16",
            max_context_length=4096,
            max_num_seqs=256,
            max_num_batched_tokens=8192,
            enable_prefix_caching=False,
            **{"kv_cache_memory_gb": 48.0, **overrides},
        ),
        hf_config=config,
    )
    res = {"startup_s": time.perf_counter() - start, "graph_capture_s": getattr(engine.runner, "capture_seconds", None)}
    tp = overrides.get("tensor_parallel_size", 1)
    res["kv_pages"] = engine.pool.num_pages
    wb = weight_bytes(config, fp8=overrides.get("quantization") == "fp8", tp=tp)
    # Rank 0's graph replayed alone would wait for the other ranks' all-reduces: no graph-only figures.
    solo = tp == 1
    if "b" in parts:
        prompt = torch.randint(0, 10000, (128,)).tolist()
        greedy = dict(temperature=0.0, ignore_eos=True)
        engine.generate([prompt], SamplingParams(max_tokens=8, **greedy))
        t1 = sync_time(lambda: engine.generate([prompt], SamplingParams(max_tokens=1, **greedy)))
        tn = sync_time(lambda: engine.generate([prompt], SamplingParams(max_tokens=256, **greedy)))
        res["b_ms_per_token"] = (tn - t1) / 255 * 1e3
        # The same with logprobs (top 5) returned for every token, as evaluation clients ask.
        lp = dict(logprobs=True, top_logprobs=5, **greedy)
        engine.generate([prompt], SamplingParams(max_tokens=8, **lp))  # first use of its kernels
        t1 = sync_time(lambda: engine.generate([prompt], SamplingParams(max_tokens=1, **lp)))
        tn = sync_time(lambda: engine.generate([prompt], SamplingParams(max_tokens=256, **lp)))
        res["b_logprobs_ms_per_token"] = (tn - t1) / 255 * 1e3
        res["b_floor_ms"] = (wb + kv_read_bytes(config, 256) // tp) / bw * 1e3
        graphs = engine.runner.graphs
        if graphs is not None and solo:
            # The same decode step with no host work: replaying the captured graph back to back.
            graphs.graphs[1].replay()
            res["b_graph_only_ms"] = sync_time(lambda: [graphs.graphs[1].replay() for _ in range(100)]) * 10
            if PROFILE_DIR:
                # Kernel by kernel: where the GPU time of one batch-1 decode step goes.
                activities = [torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=activities) as prof:
                    for _ in range(10):
                        graphs.graphs[1].replay()
                    torch.cuda.synchronize()
                with open(f"{PROFILE_DIR}/{name}-b1-kernels.txt", "w") as f:
                    f.write(
                        prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
                    )
    if "c" in parts:
        for batch in c_batches:
            prompts = [torch.randint(0, 10000, (1024,)).tolist() for _ in range(batch)]
            for i, p in enumerate(prompts):
                engine.add_request(f"c{batch}-{i}", p, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))
            while any(s.num_computed_tokens < s.num_tokens - 1 for s in engine._seqs.values()) or engine._inbox:
                engine.step()
            for _ in range(3):
                engine.step()
            steps = 20
            t = sync_time(lambda steps=steps: [engine.step() for _ in range(steps)])
            # The same step with no host work: the captured graph replayed back to back on the
            # live batch (it rewrites the K/V of the current position with the same values).
            size = next(s for s in engine.runner.graphs.sizes if s >= batch)
            replay = engine.runner.graphs.graphs[size].replay
            if solo:
                res[f"c{batch}_graph_only_ms"] = (
                    sync_time(lambda replay=replay, steps=steps: [replay() for _ in range(steps)]) / steps * 1e3
                )
            if PROFILE_DIR:
                # Where the host time of a step goes (the GPU part is graph_only above).
                profiler = cProfile.Profile()
                profiler.runcall(lambda: [engine.step() for _ in range(10)])
                with open(f"{PROFILE_DIR}/{name}-step-b{batch}.prof.txt", "w") as f:
                    pstats.Stats(profiler, stream=f).sort_stats("tottime").print_stats(25)
            while engine.has_work():
                engine.step()
            res[f"c{batch}_step_ms"] = t / steps * 1e3
            res[f"c{batch}_floor_ms"] = (wb + batch * kv_read_bytes(config, 1040) // tp) / bw * 1e3
    if "a" in parts:
        prompts, out_lens = workload(n_seqs)
        params = [SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True) for k in out_lens]
        engine.generate(prompts[:4], [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)] * 4)
        t = sync_time(lambda: engine.generate(prompts, params))
        res["a_tok_s"] = sum(out_lens) / t
        res["a_seconds"] = t
    if "d" in parts:
        # The worker's path: requests streamed from an asyncio loop while the engine steps in its
        # own thread, against the same load run offline in one thread (the most a separate engine
        # process could reach, before its IPC costs).
        prompts = [torch.randint(0, 10000, (512,)).tolist() for _ in range(64)]
        params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
        engine.generate(prompts, params)  # warm-up at this batch size: kernels compile for new shapes
        t_offline = sync_time(lambda: engine.generate(prompts, params))

        async def stream_all() -> int:
            async def one(prompt: list[int]) -> int:
                return sum([len(out.token_ids) async for out in engine.stream(prompt, params)])

            return sum(await asyncio.gather(*(one(p) for p in prompts)))

        counted = []
        t_stream = sync_time(lambda: counted.append(asyncio.run(stream_all())))
        res["d_offline_tok_s"] = 64 * 256 / t_offline
        res["d_stream_tok_s"] = counted[0] / t_stream
    engine.shutdown()
    gc.collect()
    torch.cuda.empty_cache()
    return res


class _TokenClock:
    """A generate() streamer that only records when each step's tokens reach the host."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def ms_per_step(self) -> float:
        # times[0] is the prompt, times[1] the first token (prefill); the rest are decode steps.
        steps = self.times[1:]
        return (steps[-1] - steps[0]) / (len(steps) - 1) * 1e3


def peer(name: str, config, parts: list[str], n_seqs: int) -> dict:
    res: dict = {}
    # Built on the GPU: random-initialising 8B parameters on the host takes minutes.
    with torch.device("cuda"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    gen = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    static = dict(cache_implementation="static", **gen)

    def decode_ms(batch: int, prompt_len: int, new_tokens: int) -> float:
        ids = torch.randint(0, 10000, (batch, prompt_len), device="cuda")
        kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, **static)
        with torch.inference_mode():
            model.generate(ids, **kw)  # same shapes as the timed run: nothing left to compile
            clock = _TokenClock()
            model.generate(ids, streamer=clock, **kw)
        return clock.ms_per_step()

    if "b" in parts:
        res["b_ms_per_token"] = decode_ms(1, 128, 256)
        print(name, "transformers (b)", res["b_ms_per_token"], flush=True)
    if "c" in parts:
        for batch in (64, 256):
            res[f"c{batch}_step_ms"] = decode_ms(batch, 1024, 32)
            print(name, f"transformers (c) batch {batch}", res[f"c{batch}_step_ms"], flush=True)
    if "a" in parts:
        prompts, out_lens = workload(n_seqs)
        mean_out = sum(out_lens) // len(out_lens)
        cfg = transformers.GenerationConfig(max_new_tokens=mean_out, **gen)
        for impl in ("paged|sdpa", "sdpa_paged"):
            try:
                model.set_attn_implementation(impl)
                res["a_impl"] = impl
                break
            except Exception as exc:  # the name changed across transformers 5.x releases
                res["a_impl_error"] = repr(exc)
        model.generate_batch(prompts[:4], generation_config=cfg, progress_bar=False)
        outputs = {}
        t = sync_time(lambda: outputs.update(model.generate_batch(prompts, generation_config=cfg, progress_bar=False)))
        generated = sum(len(o.generated_tokens) for o in outputs.values())
        res["a_tok_s"] = generated / t
        res["a_seqs"] = n_seqs
    gc.collect()
    torch.cuda.empty_cache()
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(SHAPES))
    parser.add_argument("--parts", nargs="+", default=["a", "b", "c"])
    parser.add_argument("--seqs", type=int, default=256, help="sequences in workload (a) for SFLLM")
    parser.add_argument("--peer-seqs", type=int, default=64, help="sequences in workload (a) for transformers")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--no-ours", action="store_true", help="transformers only (its figures, no ratios)")
    parser.add_argument("--json", default="bench_engine.json")
    parser.add_argument(
        "--fp8", nargs="*", choices=["channel", "block"], help="also run SFLLM with FP8 weights (these schemes)"
    )
    parser.add_argument(
        "--tensor-parallel-size", nargs="+", type=int, default=[1], help="run SFLLM at each (GPUs per engine)"
    )
    parser.add_argument("--kv-cache-memory-gb", type=float, default=48.0, help="KV cache per GPU")
    args = parser.parse_args()
    tps = args.tensor_parallel_size

    bw = copy_bandwidth()
    device = torch.cuda.get_device_name()
    results = {
        "device": device,
        "copy_bandwidth_TBps": bw / 1e12,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "models": {},
    }
    if "r" in args.parts and max(tps) > 1:
        hidden = sorted({SHAPES[name]().hidden_size for name in args.models})
        results["all_reduce"] = {n: all_reduce_bench(n, hidden) for n in tps if n > 1}
        print("all-reduce", results["all_reduce"], flush=True)
    for name in args.models:
        config = SHAPES[name]()
        entry = {}
        if 1 in tps:
            entry["sfllm"] = (
                {}
                if args.no_ours
                else ours(name, config, args.parts, args.seqs, bw, kv_cache_memory_gb=args.kv_cache_memory_gb)
            )
            print(name, "sfllm", entry["sfllm"], flush=True)
        for n in (n for n in tps if n > 1 and not args.no_ours):
            entry[f"sfllm-tp{n}"] = ours(
                name,
                config,
                args.parts,
                args.seqs,
                bw,
                tensor_parallel_size=n,
                kv_cache_memory_gb=args.kv_cache_memory_gb,
            )
            print(name, f"sfllm-tp{n}", entry[f"sfllm-tp{n}"], flush=True)
        for scheme in args.fp8 or []:
            entry[f"sfllm-fp8-{scheme}"] = ours(
                name, config, args.parts, args.seqs, bw, quantization="fp8", fp8_scheme=scheme
            )
            print(name, f"sfllm-fp8-{scheme}", entry[f"sfllm-fp8-{scheme}"], flush=True)
        if not args.no_peer:
            try:
                entry["transformers"] = peer(name, config, args.parts, args.peer_seqs)
            except Exception as exc:
                entry["transformers"] = {"error": repr(exc)}
            print(name, "transformers", entry["transformers"], flush=True)
        results["models"][name] = entry
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2)

    print(
        f"\n{device}, copy bandwidth {bw / 1e12:.2f} TB/s, torch {torch.__version__}, "
        f"transformers {transformers.__version__}"
    )
    print(
        f"{'model':<22} | {'figure':<26} | {'sfllm':>9} | {'transformers':>12} | {'speedup':>7} | "
        f"{'floor':>8} | {'% floor':>7}"
    )
    rows = [
        ("a", "a_tok_s", "(a) offline out tok/s", None),
        ("b", "b_ms_per_token", "(b) batch-1 ms/token", "b_floor_ms"),
        ("b", "b_graph_only_ms", "(b) graph replay alone ms", "b_floor_ms"),
        ("b", "b_logprobs_ms_per_token", "(b) same, with logprobs", "b_floor_ms"),
        ("c", "c64_step_ms", "(c) step ms, batch 64", "c64_floor_ms"),
        ("c", "c256_step_ms", "(c) step ms, batch 256", "c256_floor_ms"),
        ("c", "c256_graph_only_ms", "(c) graph alone, batch 256", "c256_floor_ms"),
        ("d", "d_offline_tok_s", "(d) 64x256 offline tok/s", None),
        ("d", "d_stream_tok_s", "(d) same, streamed tok/s", None),
    ]
    for model_name, entry in results["models"].items():
        variants = [v for v in entry if v != "transformers"]
        for variant in variants:
            s, p = entry[variant], entry.get("transformers", {})
            name = model_name if variant == "sfllm" else f"{model_name} {variant.removeprefix('sfllm-')}"
            _print_rows(name, s, p, rows, args.parts)
    for n, figures in results.get("all_reduce", {}).items():
        print(f"\nall-reduce over {n} GPUs, bf16 [batch, hidden], us per call (graph / eager), per layer (2 calls):")
        for key, f in figures.items():
            print(f"  {key:<12} {f['graph_us']:>7.1f} / {f['eager_us']:>7.1f}   per layer {f['per_layer_us']:>7.1f}")


def all_reduce_bench(n: int, hidden_sizes: list[int], batches=(1, 8, 64, 256)) -> dict:
    """NCCL all-reduce over n GPUs of [batch, hidden] bf16: us per call, replayed from a CUDA graph of
    100 calls (as the engine's decode graphs run them) and eager; rank 0's figures."""
    with tempfile.TemporaryDirectory() as folder:
        out = mp.get_context("spawn").Manager().dict()
        mp.spawn(_all_reduce_rank, (n, f"{folder}/rendezvous", hidden_sizes, batches, out), nprocs=n, join=True)
        return dict(out)


def _all_reduce_rank(rank: int, n: int, init_file: str, hidden_sizes, batches, out) -> None:
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{init_file}", rank=rank, world_size=n)
    calls = 100
    for h in hidden_sizes:
        for b in batches:
            x = torch.randn(b, h, dtype=torch.bfloat16, device="cuda")
            for _ in range(10):
                dist.all_reduce(x)
            torch.cuda.synchronize()
            eager = sync_time(lambda x=x: [dist.all_reduce(x) for _ in range(calls)]) / calls
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(calls):
                    dist.all_reduce(x)
            graph.replay()
            replayed = min(sync_time(graph.replay) for _ in range(5)) / calls
            if rank == 0:
                us = replayed * 1e6
                out[f"h{h}_b{b}"] = {"graph_us": us, "eager_us": eager * 1e6, "per_layer_us": 2 * us}
    dist.destroy_process_group()


def _print_rows(name: str, s: dict, p: dict, rows: list, parts: list[str]) -> None:
    """One model variant's rows of the table: ours, the peer's, speedup, floor."""
    for part, key, label, floor_key in rows:
        if part not in parts or (key not in s and key not in p):
            continue
        ours_v, peer_v = s.get(key, float("nan")), p.get(key)
        higher_better = key.endswith("tok_s")
        speedup = (ours_v / peer_v if higher_better else peer_v / ours_v) if peer_v else None
        floor = s.get(floor_key) if floor_key else None
        pct = floor / ours_v * 100 if floor else None
        print(
            f"{name:<22} | {label:<26} | {ours_v:>9.2f} | {peer_v if peer_v else float('nan'):>12.2f} | "
            f"{speedup if speedup else float('nan'):>6.1f}x | {floor if floor else float('nan'):>8.3f} | "
            f"{pct if pct else float('nan'):>6.0f}%"
        )


if __name__ == "__main__":
    main()
