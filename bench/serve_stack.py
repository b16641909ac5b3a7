"""GPU serving benchmark: the engine offline, a worker over gRPC, and the gateway, on one workload, in one run.

For each model shape (random bf16 weights: `--load-format dummy` over a folder holding the shape's
config.json and a word-level tokenizer of its whole vocabulary) it measures:
  engine   in a child process, the engine alone (as bench/engine.py): offline throughput on the
           workload, decode step time at batch 1, 64 and 256, and a 128-token prefill;
  served   a worker (`python -m worker`, same engine settings) and a gateway (`--gateway-processes`
           of them) on loopback, loaded by bench/serve.py from `--client-processes` processes:
             256 streams of the nano-vllm workload (lengths uniform in [100, 1024]),
             64 streams of 1024-token prompts and 256 new tokens (ITL against the batch-64 step),
             one request at a time, 128-token prompt, 128 new tokens (TPOT and TTFT),
           each straight to the worker over gRPC and through the gateway over HTTP/SSE,
           with the CPU seconds per second of every process of the stack.
Prints a table last and writes --json.

Usage (device machine): PYTHONPATH=. python3 bench/serve_stack.py --models qwen3-0.6b gemma3-1b --json out.json
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import serve  # noqa: E402  (bench/serve.py, the load generator)

REPO = Path(__file__).resolve().parents[1]
ENGINE = {
    "dtype": "bfloat16",
    "max_context_length": 4096,
    "max_num_seqs": 256,
    "max_num_batched_tokens": 8192,
    "kv_cache_memory_gb": 48.0,
    "enable_prefix_caching": False,
}


def engine_settings() -> dict:
    """The engine settings of every part of the run (float32 and a small cache where there is no GPU)."""
    import torch

    if torch.cuda.is_available():
        return ENGINE
    return {**ENGINE, "dtype": "float32", "kv_cache_memory_gb": 1.0}


def shape(name: str):
    """A real model shape from bench/engine.py, or "tiny" (a 2-layer Qwen3, for trying this out on a CPU)."""
    import transformers
    from engine import SHAPES  # bench/engine.py

    if name == "tiny":
        return transformers.Qwen3Config(
            vocab_size=16384,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )
    return SHAPES[name]()


def model_folder(name: str, root: Path) -> Path:
    """A checkpoint folder without weights: the shape's config and a word-level tokenizer over its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config = shape(name)
    config.eos_token_id, config.bos_token_id = 1, 2
    folder = root / name
    config.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w1", bos_token="w2")
    fast.save_pretrained(folder)
    return folder


# -- the engine alone, in a child process --------------------------------------------------------


def engine_child(folder: str, workload_file: str, out_file: str, batch1: str = "1") -> None:
    """Offline figures for the engine with the worker's settings (runs in its own process, then frees the GPU)."""
    import torch
    from engine import copy_bandwidth, kv_read_bytes, weight_bytes

    from sfllm_core.config import EngineConfig
    from sfllm_core.engine.inference_engine import InferenceEngine
    from sfllm_core.sampling_params import SamplingParams

    cuda = torch.cuda.is_available()

    def timed(fn) -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    res: dict = {"copy_bandwidth_TBps": copy_bandwidth() / 1e12 if cuda else float("nan")}
    engine = InferenceEngine(config=EngineConfig(model_path=folder, load_format="dummy", **engine_settings()))
    greedy = dict(temperature=0.0, ignore_eos=True)
    work = json.loads(Path(workload_file).read_text())
    prompts, out_lens = work["prompts"], work["output_lens"]
    params = [SamplingParams(max_tokens=k, **greedy) for k in out_lens]
    # Decode steps at batch 64 and 256 with ~1k-token contexts, as bench/engine.py part (c).
    for batch in (64, 256):
        ps = [[(i * 7 + j) % 10000 for j in range(1024)] for i in range(batch)]
        for i, p in enumerate(ps):
            engine.add_request(f"c{batch}-{i}", p, SamplingParams(max_tokens=64, **greedy))
        while any(s.num_computed_tokens < s.num_tokens - 1 for s in engine._seqs.values()) or engine._inbox:
            engine.step()
        for _ in range(3):
            engine.step()
        res[f"b{batch}_step_ms"] = timed(lambda: [engine.step() for _ in range(20)]) / 20 * 1e3
        while engine.has_work():
            engine.step()
    # Offline last, after the same prompts with short outputs: kernels compile for new shapes on first use.
    engine.generate(prompts, [SamplingParams(max_tokens=32, **greedy)] * len(prompts))
    t = timed(lambda: engine.generate(prompts, params))
    res["offline_tok_s"] = sum(out_lens) / t
    config = engine.model_config
    bw = res["copy_bandwidth_TBps"] * 1e12
    res["b256_floor_ms"] = (weight_bytes(config) + 256 * kv_read_bytes(config, 1040)) / bw * 1e3
    if batch1 != "1":
        Path(out_file).write_text(json.dumps(res))
        return
    # Batch 1, warm: TPOT from a long and a short run; a 128-token prefill (the first token) alone.
    prompt = list(range(3, 131))
    engine.generate([prompt], SamplingParams(max_tokens=8, **greedy))
    prefill = sorted(timed(lambda: engine.generate([prompt], SamplingParams(max_tokens=1, **greedy))) for _ in range(9))
    res["prefill128_ms"] = prefill[4] * 1e3
    t257 = timed(lambda: engine.generate([prompt], SamplingParams(max_tokens=257, **greedy)))
    res["b1_step_ms"] = (t257 - prefill[4]) / 256 * 1e3
    Path(out_file).write_text(json.dumps(res))


def engine_figures(folder: Path, workload: list[serve.Request], tmp: Path, batch1: bool) -> dict:
    workload_file, out_file = tmp / "workload.json", tmp / "engine.json"
    workload_file.write_text(
        json.dumps({"prompts": [r.prompt for r in workload], "output_lens": [r.output_len for r in workload]})
    )
    argv = ["x", str(folder), str(workload_file), str(out_file), "1" if batch1 else "0"]
    code = f"import sys; sys.argv = {argv!r}; "
    code += "import serve_stack; serve_stack.engine_child(*sys.argv[1:])"
    paths = [str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
    return json.loads(out_file.read_text())


# -- the served stack ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """A worker (front, engine, detokenizer processes) and a gateway (N processes) on loopback."""

    def __init__(self, folder: Path, gateway_processes: int, log_dir: Path) -> None:
        self.worker_port, self.gateway_port = free_port(), free_port()
        worker = [sys.executable, "-m", "worker", "--model", str(folder), "--load-format", "dummy"]
        worker += ["--host", "127.0.0.1", "--port", str(self.worker_port), "--metrics-port", "0"]
        settings = engine_settings()
        worker += ["--dtype", settings["dtype"], "--max-context-length", str(settings["max_context_length"])]
        worker += ["--max-num-seqs", "256", "--max-num-batched-tokens", "8192"]
        worker += ["--kv-cache-memory-gb", str(settings["kv_cache_memory_gb"])]
        worker += ["--no-prefix-caching", "--log-level", "warning"]
        gateway = [sys.executable, "-m", "gateway", "--workers", f"127.0.0.1:{self.worker_port}"]
        gateway += ["--host", "127.0.0.1", "--port", str(self.gateway_port), "--log-level", "warning"]
        gateway += ["--processes", str(gateway_processes)]
        env = {**os.environ, "SFLLM_API_KEY": ""}
        self.logs = [open(log_dir / f"{n}.log", "wb") for n in ("worker", "gateway")]  # noqa: SIM115
        self.worker = subprocess.Popen(worker, cwd=REPO, env=env, stdout=self.logs[0], stderr=subprocess.STDOUT)
        self.gateway = subprocess.Popen(gateway, cwd=REPO, env=env, stdout=self.logs[1], stderr=subprocess.STDOUT)
        self._wait()
        self.procs = {"front": psutil.Process(self.worker.pid)}
        for child in self.procs["front"].children():
            role = "engine" if "engine_server" in " ".join(child.cmdline()) else "detokenizer"
            self.procs[role] = child
        gateways = psutil.Process(self.gateway.pid).children(recursive=True)
        for i, child in enumerate(c for c in gateways if "spawn_main" in " ".join(c.cmdline())):
            self.procs[f"gateway{i}"] = child
        if gateway_processes == 1:
            self.procs["gateway0"] = psutil.Process(self.gateway.pid)

    def _wait(self) -> None:
        import httpx

        from worker.client import WorkerClient

        with WorkerClient(f"127.0.0.1:{self.worker_port}", timeout=5) as client:
            client.wait_until_serving(timeout=600)
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.gateway_port}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not become healthy")
            time.sleep(0.2)

    def cpu(self) -> dict[str, float]:
        return {name: sum(p.cpu_times()[:2]) for name, p in self.procs.items()}

    def stop(self) -> None:
        for proc in (self.gateway, self.worker):
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self.logs:
            log.close()


def run_served(stack: Stack, path: str, workload: dict, clients: int) -> dict:
    """One workload through one path; the summary plus each process's CPU seconds per second."""
    argv = ["--num-prompts", str(workload["n"]), "--input-len", workload["input"], "--output-len", workload["output"]]
    argv += [
        "--max-concurrency",
        str(workload["concurrency"]),
        "--processes",
        str(min(clients, workload["concurrency"])),
    ]
    argv += ["--seed", str(workload.get("seed", 0)), "--no-progress"]
    if path == "direct":
        argv += ["--backend", "grpc", "--target", f"127.0.0.1:{stack.worker_port}"]
    else:
        argv += ["--backend", "openai", "--base-url", f"http://127.0.0.1:{stack.gateway_port}/v1"]
    args = serve.parser().parse_args(argv)
    before, t0 = stack.cpu(), time.monotonic()
    summary = serve.run(args, f"{path}: {workload['name']}")
    after, wall = stack.cpu(), time.monotonic() - t0
    summary.pop("_results")
    summary.pop("_start")
    summary["cpu_per_s"] = {k: (after[k] - before[k]) / wall for k in before}
    summary["client_cpu_per_s"] = sum(summary["client_cpu_s"]) / summary["duration_s"]
    return summary


WORKLOADS = {
    "256": {"name": "256 streams, nano-vllm workload", "n": 256, "input": "100:1024", "output": "100:1024"},
    "64": {"name": "64 streams, 1024 in, 512 out", "n": 64, "input": "1024", "output": "512", "seed": 1},
    "1": {"name": "1 stream, 128 in, 128 out", "n": 24, "input": "128", "output": "128", "seed": 2},
}
for _key, _workload in WORKLOADS.items():
    _workload["concurrency"] = int(_key)


def bench_model(name: str, args: argparse.Namespace, tmp: Path) -> dict:
    folder = model_folder(name, tmp)
    log_dir = Path(args.log_dir or tmp) / name
    log_dir.mkdir(parents=True, exist_ok=True)
    lo, hi = serve.parse_range(WORKLOADS["256"]["input"])
    out = serve.parse_range(WORKLOADS["256"]["output"])
    workload = serve.random_requests(256, (lo, hi), out, "ids", id_range=10000, seed=0)
    res: dict = {"engine": engine_figures(folder, workload, tmp, "1" in args.workloads)}
    print(name, "engine", res["engine"], flush=True)
    stack = Stack(folder, args.gateway_processes, log_dir)
    try:
        # Untimed, as the engine's own warm-up above: the timed runs' prompts with short outputs, since the
        # worker's kernels load for new shapes on first use (from Triton's cache, where the engine left them).
        for key in args.workloads:
            if key != "1":
                run_served(stack, "direct", {**WORKLOADS[key], "output": "32"}, args.client_processes)
        for key in args.workloads:
            for path in ("direct", "gateway"):
                if key == "1":  # warm the path's connections and first-call costs before timing one at a time
                    run_served(stack, path, {**WORKLOADS["1"], "n": 2}, 1)
                print(f"{time.strftime('%H:%M:%S')} timing {name} {path} {key}", flush=True)
                res[f"{path}_{key}"] = run_served(stack, path, WORKLOADS[key], args.client_processes)
    finally:
        stack.stop()
    for log_file in stack.logs:  # stalls the processes reported (slow steps, long collections)
        for line in Path(log_file.name).read_text(errors="replace").splitlines():
            if "garbage collection" in line or "engine step took" in line:
                print(f"{name} {Path(log_file.name).stem}: {line[:300]}", flush=True)
    return res


def print_table(results: dict) -> None:
    columns = ("model", "path", "load", "out tok/s", "of offline", "ITL p50", "step", "TPOT p50", "TTFT p50", "prefill")
    widths = (11, 8, 4, 9, 10, 7, 6, 8, 8, 7)

    def row(*cells: object) -> str:
        text = [f"{c:.2f}" if isinstance(c, float) else str(c) for c in cells]
        return " | ".join(t.rjust(w) if i > 2 else t.ljust(w) for i, (t, w) in enumerate(zip(text, widths)))

    print(row(*columns) + " | chunks/token | CPU s per s")
    for name, res in results["models"].items():
        e = res["engine"]
        print(row(name, "engine", "256", f"{e['offline_tok_s']:.0f}", "100%", "", e["b256_step_ms"], "", "", ""))
        for key in ("256", "64", "1"):
            step = e.get(f"b{key}_step_ms", float("nan"))
            for path in ("direct", "gateway"):
                s = res.get(f"{path}_{key}")
                if s is None:
                    continue
                ratio = f"{s['output_throughput'] / e['offline_tok_s'] * 100:.1f}%" if key == "256" else ""
                prefill = e.get("prefill128_ms", "") if key == "1" else ""
                cells = (s["itl_ms"]["median"], step, s["tpot_ms"]["median"], s["ttft_ms"]["median"], prefill)
                cpu = " ".join(f"{k}={v:.2f}" for k, v in s["cpu_per_s"].items())
                line = row("", path, key, f"{s['output_throughput']:.0f}", ratio, *cells)
                print(f"{line} | {s['chunks_per_token']:.3f} | {cpu} clients={s['client_cpu_per_s']:.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b"])
    p.add_argument("--workloads", nargs="+", default=["256", "64", "1"], choices=list(WORKLOADS))
    p.add_argument("--gateway-processes", type=int, default=4)
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--json", default="bench_serve_stack.json")
    p.add_argument("--log-dir", default=None, help="keep the worker's and gateway's logs here")
    args = p.parse_args()
    import torch

    results = {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
        "settings": {
            **engine_settings(),
            "gateway_processes": args.gateway_processes,
            "client_processes": args.client_processes,
        },
        "models": {},
    }
    with tempfile.TemporaryDirectory(prefix="sfllm-serve-") as tmp:
        for name in args.models:
            results["models"][name] = bench_model(name, args, Path(tmp))
            Path(args.json).write_text(json.dumps(results, indent=1))
    print(f"\n{results['device']}, {results['cpus']} CPUs, {results['date']}")
    print_table(results)


if __name__ == "__main__":
    main()
