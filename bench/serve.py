"""Online serving benchmark: a load generator for any OpenAI-compatible server, or an SFLLM worker over gRPC.

Load: a fixed number of requests in flight (--max-concurrency) or Poisson arrivals (--request-rate),
spread over --processes client processes so that the client is never the bottleneck.
Datasets: random (lengths fixed or uniform in a range, prompts as token ids or text) or
ShareGPT-format JSON (--dataset sharegpt --dataset-path FILE).
Reports vLLM's `bench serve` figures: request and token throughput; TTFT, TPOT, ITL and E2E
latency (mean, median, p90, p99). TTFT is to the first chunk with text; ITL is the gap between
chunks with text; TPOT is (E2E - TTFT) / (output tokens - 1) per request. Output tokens are the
server's usage count (stream_options.include_usage), or the chunk count where a server sends none.
Writes --json (summary and per-request records) and --plot (a PNG: latency CDFs, throughput over time).

  python bench/serve.py --base-url http://localhost:8000/v1 --model gemma3-270m \\
      --num-prompts 256 --input-len 100:1024 --output-len 100:1024 --max-concurrency 256 --processes 4
  python bench/serve.py --backend grpc --target localhost:50051 ...   # straight to a worker
"""

import argparse
import asyncio
import json
import math
import multiprocessing as mp
import random
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import orjson

BACKENDS = ("openai", "openai-chat", "grpc")
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her one all we can there been if more when will would who so no time people into year some two"
).split()


@dataclass
class Request:
    prompt: str | list[int]
    prompt_len: int  # tokens, as the dataset knows it (the server's usage count wins where it sends one)
    output_len: int


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    start: float = 0.0
    ttft: float = 0.0
    end: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk with text
    output_tokens: int = 0
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache (usage.prompt_tokens_details)

    @property
    def latency(self) -> float:
        return self.end - self.start

    @property
    def itls(self) -> list[float]:
        t = self.chunk_times
        return [b - a for a, b in zip(t, t[1:])]


# -- datasets --------------------------------------------------------------------------------------


def parse_range(text: str) -> tuple[int, int]:
    """ "128" -> (128, 128); "100:1024" -> (100, 1024), both ends included."""
    low, _, high = text.partition(":")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi:
        raise argparse.ArgumentTypeError(f"expected N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return lo, hi


def load_tokenizer(path: str | None):
    if path is None:
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def random_requests(
    n: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    prompt_format: str,
    tokenizer=None,
    id_range: int = 10000,
    seed: int = 0,
    shared_prefixes: int = 0,
    prefix_len: int = 0,
) -> list[Request]:
    """Random prompts: token ids uniform in [0, id_range), or text (decoded ids; common words without a tokenizer).

    With shared_prefixes N, each starts with one of N fixed random prefixes of prefix_len tokens (system
    prompts, say), picked at random, before its own input_len tokens.

    Prompts depend only on the seed and the input lengths, not on the output lengths, so that a
    warm-up run with short outputs sends exactly the prompts of the run it warms up.
    """
    lengths, outputs, ids = random.Random(seed), random.Random(seed + 1), random.Random(seed + 2)
    shared = random.Random(seed + 3)
    prefixes = [[shared.randrange(id_range) for _ in range(prefix_len)] for _ in range(shared_prefixes)]
    requests = []
    for _ in range(n):
        k, out = lengths.randint(*input_len), outputs.randint(*output_len)
        prompt = [ids.randrange(id_range) for _ in range(k)]
        if prefixes:
            prompt = shared.choice(prefixes) + prompt
            k += prefix_len
        if prompt_format == "ids":
            requests.append(Request(prompt, k, out))
        elif tokenizer is not None:
            text = tokenizer.decode(prompt, skip_special_tokens=True)
            requests.append(Request(text, len(tokenizer.encode(text, add_special_tokens=False)), out))
        else:
            requests.append(Request(" ".join(WORDS[t % len(WORDS)] for t in prompt), k, out))
    return requests


def sharegpt_requests(
    path: str, n: int, tokenizer=None, seed: int = 0, fixed_output_len: int | None = None
) -> list[Request]:
    """First human turn as the prompt, the reply's length as the output length (vLLM's filters: 4..1024, total 2048)."""
    data = json.loads(Path(path).read_text())
    rng = random.Random(seed)
    rng.shuffle(data)

    def count(text: str) -> int:
        return (
            len(tokenizer.encode(text, add_special_tokens=False))
            if tokenizer
            else max(1, round(len(text.split()) * 1.3))
        )

    requests = []
    for entry in data:
        turns = entry.get("conversations") or entry.get("conversation") or []
        if len(turns) < 2:
            continue
        prompt, reply = turns[0].get("value", ""), turns[1].get("value", "")
        prompt_len = count(prompt)
        out = fixed_output_len or count(reply)
        if prompt_len < 4 or out < 4 or prompt_len > 1024 or prompt_len + out > 2048:
            continue
        requests.append(Request(prompt, prompt_len, out))
        if len(requests) == n:
            break
    if not requests:
        raise SystemExit(f"no usable conversations in {path}")
    return requests


# -- one request per backend ------------------------------------------------------------------------


async def sse_lines(response) -> AsyncIterator[bytes]:
    """The lines of an SSE body, split at LF (and CRLF) only: a token's text in a JSON string may hold U+0085 or
    U+2028 unescaped, which splitters of text lines (str.splitlines) would break at."""
    buffer = b""
    async for chunk in response.content.iter_any():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            yield line.removesuffix(b"\r")
    if buffer:
        yield buffer


def openai_session():
    """The HTTP client of openai_request: aiohttp, as vLLM's `bench serve` uses. On an H200 host it had the first SSE
    event of a stream 1.2 ms sooner than httpx's AsyncClient (client-side work), time that belongs to no server."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=0)  # as many connections as requests in flight
    return aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None))


async def openai_request(http, conf: dict, req: Request, result: Result | None = None) -> Result:
    """One streamed request; `result`, when given, is filled in place (a caller that gives up early keeps what
    came so far)."""
    chat = conf["backend"] == "openai-chat"
    body = {
        "model": conf["model"],
        "max_tokens": req.output_len,
        "temperature": conf["temperature"],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if conf["ignore_eos"]:
        body["ignore_eos"] = True
    if chat:
        text = req.prompt if isinstance(req.prompt, str) else " ".join(map(str, req.prompt))
        body["messages"] = [{"role": "user", "content": text}]
    else:
        body["prompt"] = req.prompt
    url = conf["base_url"].rstrip("/") + ("/chat/completions" if chat else "/completions")
    headers = {"Content-Type": "application/json"}
    if conf.get("api_key"):
        headers["Authorization"] = f"Bearer {conf['api_key']}"
    if result is None:
        result = Result()
    result.start, result.prompt_tokens = time.monotonic(), req.prompt_len
    usage_tokens = None
    try:
        async with http.post(url, data=orjson.dumps(body), headers=headers) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.read())[:200]!r}"
                result.end = time.monotonic()
                return result
            async for line in sse_lines(response):
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                now = time.monotonic()
                chunk = orjson.loads(line[6:])
                if "error" in chunk:
                    result.error = str(chunk["error"])[:200]
                    return result
                for choice in chunk.get("choices") or ():
                    text = choice["delta"].get("content") if chat else choice.get("text")
                    if text:
                        result.chunk_times.append(now)
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
                    result.cached_tokens = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0)
    except Exception as exc:  # a broken connection is a failed request, not a failed benchmark
        result.error = f"{type(exc).__name__}: {exc}"
        result.end = time.monotonic()
        return result
    return _finish(result, usage_tokens)


async def grpc_request(client, conf: dict, req: Request) -> Result:
    from worker.client import build_request

    kwargs = {"max_tokens": req.output_len, "temperature": conf["temperature"], "ignore_eos": conf["ignore_eos"]}
    if isinstance(req.prompt, str):
        request = build_request(req.prompt, **kwargs)
    else:
        request = build_request(token_ids=req.prompt, **kwargs)
    result = Result(start=time.monotonic(), prompt_tokens=req.prompt_len)
    tokens = 0
    try:
        async for response in client.stream(request=request):
            if response.HasField("prompt"):
                result.prompt_tokens = response.prompt.num_prompt_tokens
            kind = response.WhichOneof("event")
            if kind == "delta" and response.delta.token_ids:
                result.chunk_times.append(time.monotonic())
                tokens += len(response.delta.token_ids)
            elif kind == "finished" and response.finished.finish_reason not in (1, 2):  # STOP, LENGTH
                result.error = f"finish_reason {response.finished.finish_reason}: {response.finished.error}"
                return result
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    return _finish(result, tokens)


def _finish(result: Result, tokens: int | None) -> Result:
    result.end = time.monotonic()
    if not result.chunk_times:
        result.error = "no output"
        return result
    result.ttft = result.chunk_times[0] - result.start
    result.output_tokens = tokens if tokens is not None else len(result.chunk_times)
    result.ok = True
    return result


# -- one client process ----------------------------------------------------------------------------


async def _drive(conf: dict, requests: list[Request], start_at: float, done_counter) -> tuple[list[Result], float]:
    backend = conf["backend"]
    if backend == "grpc":
        from worker.client import AsyncWorkerClient

        session = AsyncWorkerClient(conf["target"])
    else:
        session = openai_session()
    send = grpc_request if backend == "grpc" else openai_request
    results: list[Result | None] = [None] * len(requests)
    await asyncio.sleep(max(0.0, start_at - time.monotonic()))
    cpu_start = time.process_time()

    async def one(i: int) -> None:
        results[i] = await send(session, conf, requests[i])
        if done_counter is not None:
            with done_counter.get_lock():
                done_counter.value += 1

    if conf["request_rate"] == math.inf:
        queue = iter(range(len(requests)))
        concurrency = conf["concurrency"] or len(requests)

        async def loop() -> None:
            for i in queue:
                await one(i)

        await asyncio.gather(*(loop() for _ in range(min(concurrency, len(requests)))))
    else:
        rng = random.Random(conf["seed"])
        semaphore = asyncio.Semaphore(conf["concurrency"] or len(requests))
        tasks = []

        async def limited(i: int) -> None:
            async with semaphore:
                await one(i)

        for i in range(len(requests)):
            tasks.append(asyncio.create_task(limited(i)))
            await asyncio.sleep(rng.expovariate(conf["request_rate"]))
        await asyncio.gather(*tasks)
    cpu = time.process_time() - cpu_start
    await session.close()
    return [r for r in results if r is not None], cpu


def _child(conf: dict, requests: list[Request], start_at: float, done_counter, out_queue) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    results, cpu = asyncio.run(_drive(conf, requests, start_at, done_counter))
    out_queue.put(([asdict(r) for r in results], cpu))


def run_load(
    conf: dict, requests: list[Request], processes: int = 1, progress: bool = True
) -> tuple[list[Result], float, list[float]]:
    """Send the requests from `processes` client processes: the results, the start time, each process's CPU seconds."""
    processes = max(1, min(processes, len(requests)))
    shares = [requests[p::processes] for p in range(processes)]
    total = conf["concurrency"]
    ctx = mp.get_context("spawn")
    counter = ctx.Value("i", 0)
    out_queue = ctx.Queue()
    start_at = time.monotonic() + 1.0 + 0.3 * processes  # every process starts at once, after its imports
    children = []
    for p, share in enumerate(shares):
        child_conf = dict(conf)
        if total:
            child_conf["concurrency"] = total // processes + (1 if p < total % processes else 0)
        if conf["request_rate"] != math.inf:
            child_conf["request_rate"] = conf["request_rate"] / processes
            child_conf["seed"] = conf["seed"] + p
        proc = ctx.Process(target=_child, args=(child_conf, share, start_at, counter, out_queue), daemon=True)
        proc.start()
        children.append(proc)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(requests), desc="requests", file=sys.stderr)
    gathered: list[tuple[list[dict], float]] = []
    while len(gathered) < len(children):
        try:
            gathered.append(out_queue.get(timeout=0.2))
        except Exception:
            if not any(c.is_alive() for c in children) and out_queue.empty():
                raise RuntimeError("a client process died") from None
        if bar is not None:
            bar.n = counter.value
            bar.refresh()
    if bar is not None:
        bar.n = counter.value
        bar.close()
    for c in children:
        c.join()
    results = [Result(**r) for records, _ in gathered for r in records]
    return results, start_at, [cpu for _, cpu in gathered]


# -- figures ---------------------------------------------------------------------------------------


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {"mean": math.nan, "median": math.nan, "p90": math.nan, "p99": math.nan}
    a = np.asarray(values) * scale
    return {
        "mean": float(a.mean()),
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "p99": float(np.percentile(a, 99)),
    }


def summarize(results: list[Result], start: float) -> dict:
    ok = [r for r in results if r.ok]
    duration = (max(r.end for r in ok) - start) if ok else math.nan
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if not r.ok})[:5],
        "duration_s": duration,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration if ok else 0.0,
        "output_throughput": out_tokens / duration if ok else 0.0,
        "total_token_throughput": (in_tokens + out_tokens) / duration if ok else 0.0,
        # Of the prompt tokens, those served from a prefix cache (openai backends: usage.prompt_tokens_details).
        "prefix_cache_hit_rate": sum(r.cached_tokens for r in ok) / in_tokens if in_tokens else 0.0,
        "chunks_per_token": sum(len(r.chunk_times) for r in ok) / out_tokens if out_tokens else math.nan,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpots),
        "itl_ms": _stats([g for r in ok for g in r.itls]),
        "e2e_ms": _stats([r.latency for r in ok]),
    }


def print_summary(summary: dict, title: str = "") -> None:
    print(f"\n{'=' * 20} {title or 'Serving benchmark'} {'=' * 20}")
    rows = [
        ("Successful requests", f"{summary['completed']}"),
        ("Failed requests", f"{summary['failed']}"),
        ("Benchmark duration (s)", f"{summary['duration_s']:.2f}"),
        ("Total input tokens", f"{summary['total_input_tokens']}"),
        ("Total output tokens", f"{summary['total_output_tokens']}"),
        ("Request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("Output token throughput (tok/s)", f"{summary['output_throughput']:.1f}"),
        ("Total token throughput (tok/s)", f"{summary['total_token_throughput']:.1f}"),
        ("Prompt tokens from prefix caches", f"{summary.get('prefix_cache_hit_rate', 0.0):.1%}"),
        ("Chunks per output token", f"{summary['chunks_per_token']:.3f}"),
    ]
    for name in ("ttft", "tpot", "itl", "e2e"):
        s = summary[f"{name}_ms"]
        rows.append(
            (f"{name.upper()} mean / median / p99 (ms)", f"{s['mean']:.2f} / {s['median']:.2f} / {s['p99']:.2f}")
        )
    for label, value in rows:
        print(f"{label:<40}{value:>28}")
    for error in summary["errors"]:
        print(f"error: {error}")


def plot(results: list[Result], start: float, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.ok]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    series = {
        "TTFT": [r.ttft for r in ok],
        "TPOT": tpots,
        "ITL": [g for r in ok for g in r.itls],
        "E2E": [r.latency for r in ok],
    }
    ax = axes[0]
    for name, values in series.items():
        if values:
            x = np.sort(np.asarray(values) * 1000.0)
            ax.plot(np.maximum(x, 1e-3), np.arange(1, len(x) + 1) / len(x), label=name)
    ax.set_xscale("log")
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of samples")
    ax.set_title("latency CDFs")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax = axes[1]
    if ok:
        end = max(r.end for r in ok) - start
        width = min(1.0, max(0.05, end / 50))  # about 50 bins, whatever the run's length
        edges = np.arange(0.0, end + width, width)
        times, weights = [], []
        for r in ok:
            per_chunk = r.output_tokens / len(r.chunk_times)
            times += [t - start for t in r.chunk_times]
            weights += [per_chunk] * len(r.chunk_times)
        counts, _ = np.histogram(times, bins=edges, weights=weights)
        centers = (edges[:-1] + edges[1:]) / 2
        ax.plot(centers, counts / width, label="output tok/s")
        running = [sum(1 for r in ok if r.start - start <= t < r.end - start) for t in centers]
        twin = ax.twinx()
        twin.plot(centers, running, color="tab:orange", label="requests in flight")
        twin.set_ylabel("requests in flight")
        twin.set_ylim(bottom=0)
        ax.set_ylim(bottom=0)
    ax.set_xlabel("time (s)")
    ax.set_ylabel("output tokens per second")
    ax.set_title("throughput over time")
    ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# -- command line ----------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=BACKENDS, default="openai")
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1", help="an OpenAI API root (backends openai*)")
    p.add_argument("--target", default="127.0.0.1:50051", help="a worker's host:port (backend grpc)")
    p.add_argument("--model", default=None, help="the model name to send (default: the server's first model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", choices=("random", "sharegpt"), default="random")
    p.add_argument("--dataset-path", default=None, help="ShareGPT-format JSON")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=parse_range, default=(128, 128), help="N or MIN:MAX (random dataset)")
    p.add_argument("--output-len", type=parse_range, default=(128, 128), help="N or MIN:MAX (random dataset)")
    p.add_argument("--sharegpt-output-len", type=int, default=None, help="fixed output length (default: the reply's)")
    p.add_argument(
        "--prompt-format", choices=("ids", "text"), default="ids", help="random prompts as token ids or text"
    )
    p.add_argument("--id-range", type=int, default=10000, help="random token ids are drawn from [0, id-range)")
    p.add_argument(
        "--shared-prefixes", type=int, default=0, help="random prompts start with one of N shared prefixes (default 0)"
    )
    p.add_argument("--prefix-len", type=int, default=512, help="tokens of each shared prefix (--shared-prefixes)")
    p.add_argument(
        "--tokenizer", default=None, help="HF tokenizer folder: text prompts of exact lengths, ShareGPT counts"
    )
    p.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most (default: all)")
    p.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (default: all at once)"
    )
    p.add_argument("--processes", type=int, default=1, help="client processes sharing the load")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false", help="let EOS end requests early")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the summary and per-request records here")
    p.add_argument("--plot", default=None, help="write latency CDFs and throughput over time to this PNG")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    return p


def make_requests(args: argparse.Namespace) -> list[Request]:
    tokenizer = load_tokenizer(args.tokenizer)
    if args.dataset == "sharegpt":
        if not args.dataset_path:
            raise SystemExit("--dataset sharegpt needs --dataset-path")
        return sharegpt_requests(args.dataset_path, args.num_prompts, tokenizer, args.seed, args.sharegpt_output_len)
    return random_requests(
        args.num_prompts,
        args.input_len,
        args.output_len,
        args.prompt_format,
        tokenizer,
        args.id_range,
        args.seed,
        args.shared_prefixes,
        args.prefix_len if args.shared_prefixes else 0,
    )


def default_model(args: argparse.Namespace) -> str:
    if args.backend == "grpc":
        from worker.client import WorkerClient

        with WorkerClient(args.target, timeout=30) as client:
            return client.model_info().served_model_name
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    models = httpx.get(args.base_url.rstrip("/") + "/models", headers=headers, timeout=30).json()["data"]
    return models[0]["id"]


def run(args: argparse.Namespace, title: str = "") -> dict:
    """Run one benchmark as the arguments say; prints the summary and returns it (with the raw results)."""
    requests = make_requests(args)
    conf = {
        "backend": args.backend,
        "base_url": args.base_url,
        "target": args.target,
        "model": args.model or default_model(args),
        "api_key": args.api_key,
        "temperature": args.temperature,
        "ignore_eos": args.ignore_eos,
        "concurrency": args.max_concurrency,
        "request_rate": args.request_rate,
        "seed": args.seed,
    }
    results, start, cpu = run_load(conf, requests, args.processes, args.progress)
    summary = summarize(results, start)
    summary["client_cpu_s"] = cpu
    summary["config"] = {k: v for k, v in vars(args).items() if k not in ("api_key",) and not callable(v)} | {
        "model": conf["model"]
    }
    print_summary(summary, title)
    if args.json:
        records = [
            {"ok": r.ok, "error": r.error, "start": r.start - start, "ttft": r.ttft, "latency": r.latency,
             "output_tokens": r.output_tokens, "prompt_tokens": r.prompt_tokens, "chunks": len(r.chunk_times)}
            for r in results
        ]  # fmt: skip
        Path(args.json).write_text(json.dumps({"summary": summary, "requests": records}, indent=1, default=str))
    if args.plot:
        plot(results, start, args.plot, title or f"{args.backend} {conf['model']}")
    summary["_results"] = results
    summary["_start"] = start
    return summary


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    run(args)


if __name__ == "__main__":
    main()
