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
    trace, step = [], engine.step

    def traced_step():  # the rows the worker's --debug-step-trace writes (no send in-process)
        started = time.perf_counter()
        outputs = step()
        trace.append((started, time.perf_counter() - started, 0.0, len(outputs), len(engine.scheduler.running)))
        return outputs

    engine.step = traced_step
    spy = None
    if os.environ.get("SFLLM_BENCH_PY_SPY"):  # the offline run sampled as the served processes are
        out = os.environ["SFLLM_BENCH_PY_SPY"]
        cmd = ["py-spy", "record", "-p", str(os.getpid()), "-d", "6", "-r", "250", "--nonblocking", "--idle"]
        spy = subprocess.Popen([*cmd, "-f", "raw", "-o", out], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # py-spy attaches
    t = timed(lambda: engine.generate(prompts, params))
    if spy is not None:
        spy.wait()
    engine.step = step
    res["offline_trace"] = trace_summary(trace, trace[0][0], trace[-1][0] + trace[-1][1])
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


def engine_figures(
    folder: Path, workload: list[serve.Request], tmp: Path, batch1: bool, py_spy_dir: Path | None = None
) -> dict:
    workload_file, out_file = tmp / "workload.json", tmp / "engine.json"
    workload_file.write_text(
        json.dumps({"prompts": [r.prompt for r in workload], "output_lens": [r.output_len for r in workload]})
    )
    argv = ["x", str(folder), str(workload_file), str(out_file), "1" if batch1 else "0"]
    env = dict(os.environ)
    if py_spy_dir is not None:
        env["SFLLM_BENCH_PY_SPY"] = str(py_spy_dir / "offline_engine.txt")
    code = f"import sys; sys.argv = {argv!r}; "
    code += "import serve_stack; serve_stack.engine_child(*sys.argv[1:])"
    paths = [str(REPO), str(REPO / "bench"), os.environ.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
    return json.loads(out_file.read_text())


def trace_summary(rows: list, start: float, end: float) -> dict:
    """What the engine's loop did between start and end (perf_counter, which every process shares):
    busy fraction, steps, and the step time and loop period while the batch was nearly full."""
    rows = [r for r in rows if start <= r[0] <= end]
    arrivals = [r[0] for r in rows if r[1] < 0]
    rows = [r for r in rows if r[1] >= 0]
    if len(rows) < 2:
        return {}
    # From a request's arrival in the engine to the end of the first step after it (its prefill, when alone).
    first_out = []
    for t in arrivals:
        after = next((r for r in rows if r[0] >= t), None)
        if after is not None:
            first_out.append((after[0] + after[1] + after[2] - t) * 1e3)
    first_out.sort()
    full = [i for i in range(len(rows) - 1) if rows[i][4] >= 0.9 * max(r[4] for r in rows)]
    ms = lambda xs: 1e3 * sum(xs) / max(1, len(xs))  # noqa: E731
    return {
        "steps": len(rows),
        "busy": sum(r[1] + r[2] for r in rows) / (end - start),
        "first_step_ms": (rows[0][0] - start) * 1e3,
        "last_step_end_ms": (rows[-1][0] + rows[-1][1] - start) * 1e3,
        "full_steps": len(full),
        "full_step_ms": ms([rows[i][1] for i in full]),
        "full_send_ms": ms([rows[i][2] for i in full]),
        "full_period_ms": ms([rows[i + 1][0] - rows[i][0] for i in full]),
        "max_running": max(r[4] for r in rows),
        "arrivals": len(arrivals),
        "arrival_to_out_p50_ms": first_out[len(first_out) // 2] if first_out else float("nan"),
        "last_arrival_ms": (arrivals[-1] - start) * 1e3 if arrivals else float("nan"),
    }


# -- the served stack ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """A worker (front, engine, detokenizer processes) and a gateway (N processes) on loopback."""

    def __init__(self, folder: Path, gateway_processes: int, log_dir: Path, trace: Path | None = None) -> None:
        self.worker_port, self.gateway_port = free_port(), free_port()
        self.py_spy_dir: Path | None = None
        worker = [sys.executable, "-m", "worker", "--model", str(folder), "--load-format", "dummy"]
        worker += ["--host", "127.0.0.1", "--port", str(self.worker_port), "--metrics-port", "0"]
        settings = engine_settings()
        worker += ["--dtype", settings["dtype"], "--max-context-length", str(settings["max_context_length"])]
        worker += ["--max-num-seqs", "256", "--max-num-batched-tokens", "8192"]
        worker += ["--kv-cache-memory-gb", str(settings["kv_cache_memory_gb"])]
        worker += ["--no-prefix-caching", "--log-level", "warning"]
        if trace is not None:
            worker += ["--debug-step-trace", str(trace)]
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


def cgroup_throttled() -> float:
    """Seconds this container's CPU quota has throttled it so far (cgroup v2 or v1), or NaN."""
    for path, key, scale in (("/sys/fs/cgroup/cpu.stat", "throttled_usec", 1e-6),
                             ("/sys/fs/cgroup/cpu/cpu.stat", "throttled_time", 1e-9)):  # fmt: skip
        try:
            for line in Path(path).read_text().splitlines():
                name, value = line.split()
                if name == key:
                    return int(value) * scale
        except OSError:
            continue
    return float("nan")


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
    spies = []
    if stack.py_spy_dir is not None and workload.get("profile"):  # sampled stacks of every stack process
        for role, proc in stack.procs.items():
            out = stack.py_spy_dir / f"{path}_{workload['concurrency']}_{role}.txt"
            cmd = ["py-spy", "record", "-p", str(proc.pid), "-d", str(workload["profile"]), "-r", "250"]
            cmd += ["--nonblocking", "--idle", "-f", "raw", "-o", str(out)]
            with open(out.with_suffix(".log"), "wb") as log:
                spies.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT))
    before, t0 = stack.cpu(), time.monotonic()
    switches, throttled = stack.procs["engine"].num_ctx_switches().involuntary, cgroup_throttled()
    summary = serve.run(args, f"{path}: {workload['name']}")
    after, wall = stack.cpu(), time.monotonic() - t0
    summary["engine_involuntary_switches"] = stack.procs["engine"].num_ctx_switches().involuntary - switches
    summary["cgroup_throttled_s"] = cgroup_throttled() - throttled
    for spy in spies:
        spy.wait()
    summary.pop("_results")
    start = summary.pop("_start")
    summary["window"] = (start, start + summary["duration_s"])
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
    spy_dir = log_dir if args.py_spy else None
    res: dict = {"engine": engine_figures(folder, workload, tmp, "1" in args.workloads, spy_dir)}
    print(name, "engine", res["engine"], flush=True)
    trace_file = log_dir / "engine_trace.jsonl" if args.trace else None
    stack = Stack(folder, args.gateway_processes, log_dir, trace_file)
    if args.py_spy:
        stack.py_spy_dir = log_dir
    try:
        # Untimed, as the engine's own warm-up above: the timed runs' prompts with short outputs, since the
        # worker's kernels load for new shapes on first use (from Triton's cache, where the engine left them).
        # Both paths: a gateway process's first requests open its connections and warm its code.
        for key in args.workloads:
            if key != "1":
                for path in ("direct", "gateway"):
                    run_served(stack, path, {**WORKLOADS[key], "output": "32"}, args.client_processes)
        for key in args.workloads:
            for path in ("direct", "gateway"):
                if key == "1":  # warm the path's connections and first-call costs before timing one at a time
                    run_served(stack, path, {**WORKLOADS["1"], "n": 2}, 1)
                print(f"{time.strftime('%H:%M:%S')} timing {name} {path} {key}", flush=True)
                workload = {**WORKLOADS[key], "profile": args.py_spy if key == "256" else 0}
                res[f"{path}_{key}"] = run_served(stack, path, workload, args.client_processes)
    finally:
        stack.stop()
    if trace_file is not None and trace_file.exists():
        rows = [json.loads(line) for line in trace_file.read_text().splitlines()]
        for key, summary in res.items():
            if key != "engine":
                summary["trace"] = trace_summary(rows, *summary["window"])
        for key in ["engine"] + [k for k in res if k != "engine"]:
            got = res[key]["offline_trace"] if key == "engine" else res[key]["trace"]
            if key != "engine":
                got = {**got, "switches": res[key]["engine_involuntary_switches"]}
                got["throttled_s"] = res[key]["cgroup_throttled_s"]
            print(f"{name} trace {key}: " + " ".join(f"{k}={v:.3g}" for k, v in got.items()), flush=True)
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
    p.add_argument("--trace", action="store_true", help="time every engine step, offline and served, and summarize")
    p.add_argument(
        "--py-spy", type=int, default=0, metavar="S", help="py-spy each stack process for S s of the 256 runs"
    )
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
