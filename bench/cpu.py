"""CPU benchmark: Gemma 3 270M through our engine, transformers and llama.cpp, on the same GGUF and workload.

Workload: B prompts of 128 random tokens (after <bos>), 64 new tokens each, greedy, ignore_eos.
Ours runs twice: serving the GGUF's own quantized blocks (--quantization gguf, the CPU default)
and dequantized to float32 (--quantization none). Prefill and decode are timed apart: prefill is a
run to one new token, decode the rest of a 64-token run. transformers runs the float32 weights;
llama.cpp (batch 1 only) the GGUF itself, if `llama_cpp` imports here or --llama-python names an
interpreter where it does (PyPI ships llama-cpp-python as source only: build it in a venv of its own).
Each figure is the median of --rounds runs, the engines taking turns, so a burst of load on a shared
machine hits them alike. Prints one table last, then issue 12's CPU checks (ours against llama.cpp
at the same threads: batch-1 decode and prefill, batch-8 aggregate against 4x llama.cpp's batch 1).
Usage: .venv/bin/python bench/cpu.py [--model PATH] [--batches 1 8] [--threads N] [--rounds 3]
       [--llama-python /tmp/llamavenv/bin/python] [--no-transformers] [--no-float32] [--json out.json]

--accuracy instead compares the quantized engine with the float32 one on held prompts: greedy
continuations (where they part, and the reference's top-2 margin there) and, teacher-forced over
the prompts and the reference's continuations, top-1 agreement and logprob differences per
position, every row through the decode kernels.
"""

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time

PROMPT_LEN, NEW_TOKENS = 128, 64


def make_prompts(batch: int, bos: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[bos] + [rng.randrange(10, 20000) for _ in range(PROMPT_LEN - 1)] for _ in range(batch)]


# --- llama.cpp (imports nothing of ours or torch: it may run under another interpreter) -----------------


def llama_cpp_run(model: str, prompt: list[int], threads: int) -> dict:
    """One timed prefill of the prompt and NEW_TOKENS greedy decode steps through llama.cpp."""
    import llama_cpp
    import numpy as np

    default = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        # The repacked weight buffers (AVX-512/AMX) crash llama-cpp-python 0.3.36 built with
        # GGML_NATIVE on this machine's Xeon; llama.cpp's own vec_dot kernels run the blocks instead.
        p = default()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    llm = llama_cpp.Llama(
        model_path=model, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512, verbose=False
    )

    def run(new_tokens: int) -> tuple[float, float]:
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        prefilled = time.perf_counter()
        for _ in range(new_tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        return prefilled - start, time.perf_counter() - prefilled

    run(4)  # warm-up
    prefill, decode = run(NEW_TOKENS)
    return {"prefill_s": prefill, "decode_tok_s": NEW_TOKENS / decode, "version": llama_cpp.__version__}


def llama_cpp_peer(python: str | None, model: str, prompt: list[int], threads: int) -> dict | None:
    """llama_cpp_run here, or under another interpreter; None where llama.cpp is not installed."""
    if python is None:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            return None
        return llama_cpp_run(model, prompt, threads)
    request = json.dumps({"model": model, "prompt": prompt, "threads": threads})
    done = subprocess.run(
        [python, os.path.abspath(__file__), "--peer-llama-cpp", request], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        print(f"llama.cpp peer failed ({done.returncode}): {done.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- ours and transformers ---------------------------------------------------------------------------


def time_ours(engine, prompts: list[list[int]]) -> dict:
    from sfllm_core.sampling_params import SamplingParams

    def run(new_tokens: int) -> float:
        params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        start = time.perf_counter()
        outputs = engine.generate(prompts, params)
        assert all(len(o.token_ids) == new_tokens for o in outputs)
        return time.perf_counter() - start

    run(4)  # warm-up
    prefill, total = run(1), run(NEW_TOKENS)
    batch = len(prompts)
    return {
        "prefill_s": prefill,
        "decode_tok_s": batch * (NEW_TOKENS - 1) / (total - prefill),
        "tok_s": batch * NEW_TOKENS / total,
    }


def reference_model(path: str):
    """transformers' own model class holding exactly the tensors our float32 engine loads."""
    import torch
    import transformers

    from sfllm_core.models.loader import load_model_config, load_weights

    config = load_model_config(path)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor for name, tensor, _ in load_weights(path, torch.float32)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    return model.eval()


def time_transformers(model, prompts: list[list[int]]) -> dict:
    import torch

    ids = torch.tensor(prompts)
    kwargs = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:1], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
    return {"tok_s": len(prompts) * NEW_TOKENS / elapsed}


HELD_PROMPTS = [
    "<bos>The capital of France is",
    "<bos>Once upon a time, in a small village,",
    "<bos>The three primary colors are",
    "<bos>Water boils at a temperature of",
    "<bos>def fibonacci(n):\n    ",
    "<bos>The most important invention of the twentieth century was",
    "<bos>To make a cup of tea, first",
    "<bos>In 1969, astronauts",
    "<bos>The quick brown fox",
    "<bos>Photosynthesis is the process by which",
    "<bos>My favourite book is",
    "<bos>The stock market today",
]


def accuracy(engines: dict, new_tokens: int = 32) -> dict:
    """The quantized engine against the float32 one on HELD_PROMPTS (see the module docstring)."""
    from sfllm_core.layers.quantization import RowSwitchWeight
    from sfllm_core.sampling_params import SamplingParams

    quantized, reference = engines["gguf"], engines["none"]
    greedy = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    got, expected = quantized.generate(HELD_PROMPTS, greedy), reference.generate(HELD_PROMPTS, greedy)
    parts = []
    for prompt, g, e in zip(HELD_PROMPTS, got, expected):
        same = next((i for i, (a, b) in enumerate(zip(g.token_ids, e.token_ids)) if a != b), new_tokens)
        margin = None
        if same < new_tokens:
            top = e.logprobs[same].top
            margin = top[0][1] - top[1][1]
        parts.append({"prompt": prompt, "equal_tokens": same, "reference_top2_margin": margin})
        print(f"{prompt!r}: {same} equal tokens" + (f", reference top-2 margin {margin:.3f}" if margin else ""))

    # Teacher-forced: the prompts and the reference's continuations, every row through the decode kernels.
    switches = [m for m in quantized.model.modules() if isinstance(m, RowSwitchWeight)]
    saved = [m.max_rows for m in switches]
    for m in switches:
        m.max_rows = 1 << 30
    try:
        texts = [e.prompt_token_ids + e.token_ids for e in expected]
        forced = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)
        q_out, r_out = quantized.generate(texts, forced), reference.generate(texts, forced)
    finally:
        for m, rows in zip(switches, saved):
            m.max_rows = rows
    agree, diffs = 0, []
    for q, r in zip(q_out, r_out):
        for a, b in zip(q.prompt_logprobs, r.prompt_logprobs):
            agree += a.top[0][0] == b.top[0][0]
            diffs.append(abs(a.logprob - b.logprob))
    diffs.sort()
    summary = {
        "greedy": parts,
        "prompts_with_16_equal_tokens": sum(p["equal_tokens"] >= 16 for p in parts),
        "positions": len(diffs),
        "top1_agreement": agree / len(diffs),
        "logprob_abs_diff_mean": sum(diffs) / len(diffs),
        "logprob_abs_diff_p99": diffs[int(0.99 * (len(diffs) - 1))],
        "logprob_abs_diff_max": diffs[-1],
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "greedy"}, indent=2))
    return summary


def median(runs: list[dict]) -> dict:
    """Per field, the median of the rounds (the upper one of an even count)."""
    keys = {k for r in runs for k in r if isinstance(r[k], float)}
    out = {k: sorted(r[k] for r in runs)[len(runs) // 2] for k in keys}
    return {**runs[0], **out}


def issue_12_summary(rows: list[dict]) -> list[str]:
    """Issue 12's CPU Must show, from the table's rows: ours (gguf) against llama.cpp at the same threads."""
    found = {(r["batch"], r["engine"]): r for r in rows}
    ours1, peer, ours8 = found.get((1, "sfllm-gguf")), found.get((1, "llama.cpp")), found.get((8, "sfllm-gguf"))
    if ours1 is None or peer is None:
        return ["issue 12: needs batch 1 of sfllm-gguf and llama.cpp (--llama-python)"]
    lines = []
    decode = ours1["decode_tok_s"] / peer["decode_tok_s"]
    verdict = "faster" if decode > 1 else "SLOWER"
    lines.append(
        f"batch-1 decode: {ours1['decode_tok_s']:.1f} against llama.cpp {peer['decode_tok_s']:.1f} tok/s "
        f"= {decode:.2f}x ({verdict})"
    )
    prefill = peer["prefill_s"] / ours1["prefill_s"]
    lines.append(
        f"prefill of {PROMPT_LEN} tokens: {ours1['prefill_s']:.3f} against llama.cpp {peer['prefill_s']:.3f} s "
        f"= {prefill:.2f}x as fast ({'no slower' if prefill >= 1 else 'SLOWER'})"
    )
    if ours8 is not None:
        ratio = ours8["decode_tok_s"] / peer["decode_tok_s"]
        lines.append(
            f"batch-8 aggregate decode: {ours8['decode_tok_s']:.1f} tok/s = {ratio:.2f}x llama.cpp's batch 1 "
            f"({'meets' if ratio >= 4 else 'MISSES'} the 4x asked)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="torch and llama.cpp threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds, engines taking turns; medians shown")
    parser.add_argument("--llama-python", default=None, help="an interpreter with llama_cpp installed")
    parser.add_argument("--no-transformers", action="store_true")
    parser.add_argument("--no-float32", action="store_true", help="time only the quantized engine of ours")
    parser.add_argument("--accuracy", action="store_true", help="compare quantized and float32 outputs instead")
    parser.add_argument("--json", default=None)
    parser.add_argument("--peer-llama-cpp", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peer_llama_cpp is not None:
        request = json.loads(args.peer_llama_cpp)
        print(json.dumps(llama_cpp_run(request["model"], request["prompt"], request["threads"])))
        return

    import torch
    import transformers

    from sfllm_core.engine.inference_engine import InferenceEngine
    from sfllm_core.models.loader import resolve_model_path

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    path = resolve_model_path(args.model)
    engines = {}
    load_before = os.getloadavg()[0]
    for quantization in ("gguf",) if args.no_float32 and not args.accuracy else ("gguf", "none"):
        start = time.perf_counter()
        engines[quantization] = InferenceEngine(model_path=args.model, dtype="float32", quantization=quantization)
        print(f"engine (quantization {quantization}) loaded in {time.perf_counter() - start:.1f} s", flush=True)
    if args.accuracy:
        summary = accuracy(engines)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=2)
        return
    reference = None if args.no_transformers else reference_model(path)
    bos = engines["gguf"].tokenizer.bos_token_id

    rows = []
    for batch in args.batches:
        prompts = make_prompts(batch, bos, seed=batch)
        runs: dict[str, list[dict]] = {}
        for _ in range(args.rounds):
            for name, engine in engines.items():
                runs.setdefault(f"sfllm-{name}", []).append(time_ours(engine, prompts))
            if batch == 1:
                peer = llama_cpp_peer(args.llama_python, path, prompts[0], threads)
                if peer is not None:
                    runs.setdefault("llama.cpp", []).append(peer)
            if reference is not None:
                runs.setdefault("transformers", []).append(time_transformers(reference, prompts))
            print(f"batch {batch}: {json.dumps({k: v[-1] for k, v in runs.items()})}", flush=True)
        for name, results in runs.items():
            rows.append({"batch": batch, "engine": name, **median(results)})

    info = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
    info += f"{threads} threads, transformers {transformers.__version__}, "
    info += f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
    print(f"\nGemma 3 270M Q4_K_M GGUF, {PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, greedy; {info}")
    print("sfllm-gguf: the GGUF's quantized blocks; sfllm-none: dequantized to float32; median of", args.rounds)
    print(f"{'batch':>5} | {'engine':<13} | {'prefill s':>9} | {'decode tok/s':>12} | {'output tok/s':>12}")
    for r in rows:
        prefill = f"{r['prefill_s']:.3f}" if "prefill_s" in r else "-"
        decode = f"{r['decode_tok_s']:.1f}" if "decode_tok_s" in r else "-"
        total = f"{r['tok_s']:.1f}" if "tok_s" in r else "-"
        print(f"{r['batch']:>5} | {r['engine']:<13} | {prefill:>9} | {decode:>12} | {total:>12}")
    summary = issue_12_summary(rows)
    print("\n".join(["", f"issue 12 (CPU), {threads} threads each:"] + [f"  {line}" for line in summary]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "info": info, "issue_12": summary}, f, indent=2)


if __name__ == "__main__":
    main()
