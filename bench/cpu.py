"""CPU benchmark: our engine against transformers on the same Gemma 3 270M weights, same workload.

Workload: B prompts of 128 random tokens (after <bos>), 64 new tokens each, greedy, ignore_eos;
batch 1 and batch 8. Prints output tokens/s for both and their ratio, as a table, last.
Usage: .venv/bin/python bench/cpu.py [--model PATH] [--batches 1 8] [--json out.json]
"""

import argparse
import json
import os
import platform
import time

import torch
import transformers

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.models.loader import load_model_config, load_weights, resolve_model_path
from sfllm_core.sampling_params import SamplingParams

PROMPT_LEN, NEW_TOKENS = 128, 64


def reference_model(path: str) -> torch.nn.Module:
    """transformers' own model class holding exactly the tensors our engine loads."""
    config = load_model_config(path)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = {name: tensor for name, tensor, _ in load_weights(path, torch.float32)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("lm_head" in m for m in missing), (missing, unexpected)
    return model.eval()


def time_ours(engine: InferenceEngine, prompts: list[list[int]]) -> float:
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)
    engine.generate([prompts[0]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == NEW_TOKENS for o in outputs)
    return len(prompts) * NEW_TOKENS / elapsed


def time_transformers(model: torch.nn.Module, prompts: list[list[int]]) -> float:
    ids = torch.tensor(prompts)
    kwargs = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, pad_token_id=0)
    with torch.inference_mode():
        model.generate(ids[:1], **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4})  # warm-up
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        elapsed = time.perf_counter() - start
    assert out.shape[1] == PROMPT_LEN + NEW_TOKENS
    return len(prompts) * NEW_TOKENS / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    path = resolve_model_path(args.model)
    engine = InferenceEngine(model_path=args.model, dtype="float32")
    reference = reference_model(path)
    bos = engine.tokenizer.bos_token_id
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in args.batches:
        prompts = [[bos] + torch.randint(10, 20000, (PROMPT_LEN - 1,), generator=g).tolist() for _ in range(batch)]
        ours = time_ours(engine, prompts)
        theirs = time_transformers(reference, prompts)
        rows.append({"batch": batch, "sfllm_tok_s": ours, "transformers_tok_s": theirs, "ratio": ours / theirs})

    info = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
    info += f"{torch.get_num_threads()} threads, transformers {transformers.__version__}"
    print(f"\nGemma 3 270M (float32), {PROMPT_LEN}-token prompts, {NEW_TOKENS} new tokens, greedy; {info}")
    print(f"{'batch':>5} | {'sfllm tok/s':>12} | {'transformers tok/s':>18} | {'ratio':>6}")
    for r in rows:
        print(f"{r['batch']:>5} | {r['sfllm_tok_s']:>12.1f} | {r['transformers_tok_s']:>18.1f} | {r['ratio']:>5.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "info": info}, f, indent=2)


if __name__ == "__main__":
    main()
