"""Lone-prefill latency on a GPU: prefill CUDA graphs on against off, same random-weight models, one run.

A request arriving at an idle engine is prefilled alone: this times `generate` of one prompt to one
token (the time to first token inside the engine) at several prompt lengths, median of 11, for an
engine with prefill graphs (engine/prefill_graphs.py) and one without. Checks that both give the
same greedy tokens on one prompt, and prints a table last.

Usage: PYTHONPATH=. python bench/prefill.py [--models qwen3-0.6b gemma3-1b qwen3-8b] [--lengths 16 128 512 1000]
"""

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_stack import model_folder  # noqa: E402  (bench/serve_stack.py: config + word-level tokenizer)

from sfllm_core.config import EngineConfig  # noqa: E402
from sfllm_core.engine.inference_engine import InferenceEngine  # noqa: E402
from sfllm_core.sampling_params import SamplingParams  # noqa: E402

GREEDY = dict(temperature=0.0, ignore_eos=True)


def first_token_s(engine: InferenceEngine, prompt: list[int]) -> float:
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.generate([prompt], SamplingParams(max_tokens=1, **GREEDY))
    torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(folder: Path, graphs: int, lengths: list[int]) -> dict:
    engine = InferenceEngine(
        config=EngineConfig(
            model_path=str(folder),
            load_format="dummy",
            max_num_batched_tokens=8192,
            kv_cache_memory_gb=8.0,
            enable_prefix_caching=False,
            prefill_graph_max_tokens=graphs,
        )
    )
    res: dict = {"ms": {}}
    for n in lengths:
        prompt = [(7 * i) % 5000 + 3 for i in range(n)]
        engine.generate([prompt], SamplingParams(max_tokens=2, **GREEDY))  # warm: kernels for this shape
        runs = sorted(first_token_s(engine, prompt) for _ in range(11))
        res["ms"][n] = runs[5] * 1e3
    prompt = [(3 * i) % 5000 + 3 for i in range(100)]
    res["tokens"] = engine.generate([prompt], SamplingParams(max_tokens=16, **GREEDY))[0].token_ids
    res["replays"] = engine.runner.prefill.num_replays if engine.runner.prefill else 0
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["qwen3-0.6b", "gemma3-1b", "qwen3-8b"])
    p.add_argument("--lengths", nargs="+", type=int, default=[16, 128, 512, 1000])
    p.add_argument("--json", default=None)
    args = p.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            folder = model_folder(name, Path(tmp))
            results[name] = {}
            for kind, graphs in (("eager", 0), ("graphs", 1024)):
                results[name][kind] = measure(folder, graphs, args.lengths)
                gc.collect()
                torch.cuda.empty_cache()  # the engine's KV cache goes before the next one takes its own
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    device = torch.cuda.get_device_name()
    print(f"\n{device}, torch {torch.__version__}; lone prefill to the first token, ms (p50 of 11)")
    print("model       | prefill | " + " | ".join(f"{n:>5} tok" for n in args.lengths) + " | same tokens")
    for name, r in results.items():
        same = r["eager"]["tokens"] == r["graphs"]["tokens"]
        for kind in ("eager", "graphs"):
            cells = " | ".join(f"{r[kind]['ms'][n]:9.2f}" for n in args.lengths)
            print(f"{name:11} | {kind:7} | {cells} | {same if kind == 'graphs' else ''}")


if __name__ == "__main__":
    main()
