"""Gateway overhead: the latency the gateway adds over calling a worker's gRPC API directly, in one run.

Starts one worker and one gateway as processes on loopback (or uses --worker HOST:PORT), then sends
the same streamed, greedy, ignore_eos request alternately straight to the worker (gRPC, blocking
client) and through the gateway (HTTP + SSE, parsed with plain httpx so no SDK cost is counted).
One request at a time, so queueing never mixes in. TTFT is the time to the first visible text;
per-token time is from there to the finish, over max_tokens - 1 tokens (both paths alike, since
the detokenizer may hold tokens back). Prints p50/p90 TTFT and p50 per-token time for both paths
and their difference, as a table, last.
Usage: .venv/bin/python bench/gateway_overhead.py [--model PATH] [--requests 50] [--max-tokens 32] [--json out.json]
"""

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

from worker.client import WorkerClient

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The history of lighthouses begins with fires kept burning on hilltops to guide ships home."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_worker(model: str | None, device: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [sys.executable, "-m", "worker", "--host", "127.0.0.1", "--port", str(port), "--metrics-port", "0"]
    args += ["--device", device, "--log-level", "warning"] + (["--model", model] if model else [])
    proc = subprocess.Popen(args, cwd=REPO)
    target = f"127.0.0.1:{port}"
    with WorkerClient(target, timeout=5) as client:
        client.wait_until_serving(timeout=600)
    return proc, target


def start_gateway(worker: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    args = [sys.executable, "-m", "gateway", "--workers", worker, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(args + ["--log-level", "warning"], cwd=REPO, env={**os.environ, "SFLLM_API_KEY": ""})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError("the gateway did not become healthy")
        time.sleep(0.1)


def direct_request(client: WorkerClient, max_tokens: int) -> tuple[float, float]:
    """(time to first text, time per token after it) for one gRPC stream."""
    start = time.perf_counter()
    first = end = 0.0
    for response in client.stream(PROMPT, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
        kind = response.WhichOneof("event")
        if kind == "delta" and response.delta.text and not first:
            first = time.perf_counter()
        elif kind == "finished":
            end = time.perf_counter()
    return first - start, (end - first) / (max_tokens - 1)


def gateway_request(http: httpx.Client, url: str, model: str, max_tokens: int) -> tuple[float, float]:
    """(time to first text, time per token after it) for one SSE stream through the gateway."""
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    body["stream"] = True
    start = time.perf_counter()
    first = end = 0.0
    with http.stream("POST", url + "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            choice = json.loads(line[6:])["choices"][0]
            if choice["text"] and not first:
                first = time.perf_counter()
            if choice["finish_reason"] is not None:
                end = time.perf_counter()
    return first - start, (end - first) / (max_tokens - 1)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint for the worker (default: the packaged Gemma 3 270M)")
    parser.add_argument("--worker", default=None, help="use this running worker instead of starting one")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--requests", type=int, default=50, help="requests per path")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    procs: list[subprocess.Popen[bytes]] = []
    try:
        if args.worker:
            target = args.worker
        else:
            worker_proc, target = start_worker(args.model, args.device)
            procs.append(worker_proc)
        gateway_proc, url = start_gateway(target)
        procs.append(gateway_proc)
        results: dict[str, dict[str, list[float]]] = {p: {"ttft": [], "tpot": []} for p in ("direct", "gateway")}
        with WorkerClient(target, timeout=600) as client, httpx.Client(timeout=600) as http:
            model = client.model_info().served_model_name
            for _ in range(3):  # warm-up: connections, caches, first-call costs
                direct_request(client, args.max_tokens)
                gateway_request(http, url, model, args.max_tokens)
            for _ in range(args.requests):  # interleaved, so drift in the machine's speed hits both alike
                for path in ("direct", "gateway"):
                    if path == "direct":
                        ttft, tpot = direct_request(client, args.max_tokens)
                    else:
                        ttft, tpot = gateway_request(http, url, model, args.max_tokens)
                    results[path]["ttft"].append(ttft)
                    results[path]["tpot"].append(tpot)
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    summary = {
        path: {
            "ttft_p50_ms": 1000 * statistics.median(r["ttft"]),
            "ttft_p90_ms": 1000 * percentile(r["ttft"], 0.9),
            "tpot_p50_ms": 1000 * statistics.median(r["tpot"]),
        }
        for path, r in results.items()
    }
    summary["added"] = {k: summary["gateway"][k] - summary["direct"][k] for k in summary["direct"]}
    meta = {"requests": args.requests, "max_tokens": args.max_tokens, "model": args.model or "gemma-3-270m (packaged)"}
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "summary": summary}, indent=2))
    print(f"\n{args.requests} sequential streamed requests per path, {args.max_tokens} tokens each, one worker")
    print(f"{'path':<10}{'TTFT p50 ms':>14}{'TTFT p90 ms':>14}{'per-token p50 ms':>19}")
    for path, row in summary.items():
        print(f"{path:<10}{row['ttft_p50_ms']:>14.2f}{row['ttft_p90_ms']:>14.2f}{row['tpot_p50_ms']:>19.3f}")


if __name__ == "__main__":
    main()
