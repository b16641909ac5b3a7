"""Speculative decoding benchmark: batch-1 decode tokens/s with and without n-gram drafts, and the peer.

The peer is transformers' own generate on the same weights, without and with prompt lookup
(`prompt_lookup_num_tokens`, its n-gram assisted generation). Workloads, greedy, ignore_eos:
- copy: a passage, then an instruction to repeat it (input-grounded: a real model copies, and
  n-gram drafts find what it copies);
- random: random token prompts, where drafts are rarely right (the cost of trying).
On random weights nothing is copied, but greedy decoding falls into loops that n-gram lookup
catches; the acceptance rate printed is what the drafts actually got, so read the speedup with it.

Tokens/s counts decode only: each request is timed at NEW and at 1 new token, and the difference
is divided by NEW - 1. Prints a table, last.
Usage:
  PYTHONPATH=. .venv/bin/python bench/speculative.py --tiny                # CPU, a tiny random Qwen3
  PYTHONPATH=. python bench/speculative.py --model PATH [--device cuda] [--batches 1 64]
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.models.loader import resolve_model_path
from sfllm_core.sampling_params import SamplingParams

PASSAGES = [
    "The lighthouse keeper climbed the spiral stairs every evening at dusk. He trimmed the wick, polished "
    "the great lens until it shone, and wrote the state of the sea in a leather logbook that his father "
    "had kept before him. Ships passed far out on the horizon, and none of them knew his name.",
    "To make bread, mix five hundred grams of flour with ten grams of salt and seven grams of yeast. Add "
    "three hundred and fifty millilitres of warm water, knead for ten minutes, and leave the dough to rise "
    "for an hour. Shape it, let it rise again, and bake it at two hundred and twenty degrees.",
    "def moving_average(values, window):\n    totals = []\n    running = 0.0\n    for i, value in "
    "enumerate(values):\n        running += value\n        if i >= window:\n            running -= "
    "values[i - window]\n        totals.append(running / min(i + 1, window))\n    return totals\n",
    "Minutes of the meeting: the committee approved the budget for the new library wing, asked the "
    "treasurer to publish the accounts every quarter, and agreed to meet again on the first Monday of "
    "next month. The chair thanked the volunteers who ran the book sale in the spring.",
]
INSTRUCTION = "\n\nRepeat the text above exactly, word for word.\n\n"


def copy_prompts(engine: InferenceEngine, count: int) -> list[list[int]]:
    if engine.tokenizer is None:
        raise SystemExit("the copy workload needs a tokenizer")
    texts = [PASSAGES[i % len(PASSAGES)] + INSTRUCTION for i in range(count)]
    template = engine.tokenizer.apply_chat_template
    if engine.tokenizer.chat_template:
        texts = [template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True) for t in texts]
    return [engine.encode(t) for t in texts]


def random_prompts(vocab: int, count: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(10, vocab, (length,), generator=g).tolist() for _ in range(count)]


def time_engine(engine: InferenceEngine, prompts: list[list[int]], batch: int, new: int) -> tuple[float, list]:
    """Decode tokens/s over the prompts, `batch` at a time; and the outputs."""
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    full = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
    engine.generate(prompts[:batch], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))  # warm-up
    decode_s, outputs = 0.0, []
    for i in range(0, len(prompts), batch):
        group = prompts[i : i + batch]
        start = time.perf_counter()
        engine.generate(group, one)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        outputs += engine.generate(group, full)
        decode_s += time.perf_counter() - start - prefill
    return len(prompts) * (new - 1) / decode_s, [o.token_ids for o in outputs]


def time_transformers(model, prompts: list[list[int]], new: int, lookup: int, device: str) -> tuple[float, list]:
    """Batch-1 decode tokens/s of transformers' generate (prompt lookup with `lookup` tokens if > 0)."""
    extra = {"prompt_lookup_num_tokens": lookup} if lookup else {}

    def run(prompt: list[int], n: int) -> tuple[float, list[int]]:
        ids = torch.tensor([prompt], device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = model.generate(
            ids, attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0,
            max_new_tokens=n, min_new_tokens=n, **extra,
        )  # fmt: skip
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start, out[0, len(prompt) :].tolist()

    decode_s, outputs = 0.0, []
    with torch.inference_mode():
        run(prompts[0], 8)  # warm-up
        for prompt in prompts:
            prefill, _ = run(prompt, 1)
            total, tokens = run(prompt, new)
            decode_s += total - prefill
            outputs.append(tokens)
    return len(prompts) * (new - 1) / decode_s, outputs


def reference_model(path: str, dtype: torch.dtype, device: str):
    """transformers' model class with exactly the tensors our engine loads (bench/cpu.py's loader)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from cpu import reference_model as load  # bench/cpu.py, beside this script

    model = load(path)
    return model.to(device=device, dtype=dtype).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or GGUF (default: the packaged Gemma 3 270M)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Qwen3 made here (CPU smoke size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument("--k", type=int, default=4, help="draft tokens per step")
    parser.add_argument("--ngram-max", type=int, default=4)
    parser.add_argument("--ngram-min", type=int, default=2)
    parser.add_argument("--workloads", nargs="+", default=["copy", "random"])
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")

    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from checkpoints import make_qwen3_checkpoint

        path = str(make_qwen3_checkpoint(Path(tempfile.mkdtemp()) / "qwen3", max_position_embeddings=4096))
        args.new_tokens = min(args.new_tokens, 64)
    else:
        path = resolve_model_path(args.model)
    common = dict(model_path=path, dtype=dtype, device=args.device, max_num_seqs=max(args.batches))
    spec_settings = dict(
        speculative_algorithm="ngram",
        num_speculative_tokens=args.k,
        ngram_max=args.ngram_max,
        ngram_min=args.ngram_min,
        speculative_max_batch=max(args.batches),
    )
    plain = InferenceEngine(**common)
    spec = InferenceEngine(**common, **spec_settings)
    peer = None if args.no_peer else reference_model(path, plain.dtype, args.device)

    rows = []
    for workload in args.workloads:
        for batch in args.batches:
            count = max(args.prompts, batch)
            if workload == "copy":
                prompts = copy_prompts(plain, count)
            else:  # as long as the copy prompts
                prompts = random_prompts(plain.vocab_size, count, len(copy_prompts(plain, 1)[0]))
            ours, want = time_engine(plain, prompts, batch, args.new_tokens)
            before = (spec.proposer.num_draft_tokens, spec.proposer.num_accepted_tokens, spec.proposer.num_proposals)
            fast, got = time_engine(spec, prompts, batch, args.new_tokens)
            drafted, accepted, verified = (
                now - was
                for now, was in zip(
                    (spec.proposer.num_draft_tokens, spec.proposer.num_accepted_tokens, spec.proposer.num_proposals),
                    before,
                )
            )
            row = dict(
                workload=workload,
                batch=batch,
                sfllm_tok_s=ours,
                sfllm_ngram_tok_s=fast,
                speedup=fast / ours,
                drafted=drafted,
                accepted=accepted,
                acceptance_rate=accepted / drafted if drafted else 0.0,
                tokens_per_verify=1 + accepted / verified if verified else 0.0,
                identical=got == want,
            )
            if peer is not None and batch == 1:
                theirs, _ = time_transformers(peer, prompts, args.new_tokens, 0, args.device)
                theirs_lookup, _ = time_transformers(peer, prompts, args.new_tokens, args.k, args.device)
                row.update(hf_tok_s=theirs, hf_lookup_tok_s=theirs_lookup, hf_speedup=theirs_lookup / theirs)
            rows.append(row)

    name = "tiny random Qwen3" if args.tiny else Path(path).name
    print(
        f"\n{name} ({dtype}, {args.device}), {args.new_tokens} new tokens, greedy; n-gram k={args.k}, "
        f"n {args.ngram_max}..{args.ngram_min}; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    head = (
        f"{'workload':>8} | {'batch':>5} | {'sfllm tok/s':>11} | {'+ngram tok/s':>12} | {'speedup':>7} | "
        f"{'accepted':>8} | {'tok/verify':>10} | {'same':>4} | {'hf tok/s':>8} | {'hf+lookup':>9} | {'hf speedup':>10}"
    )
    print(head)
    for r in rows:
        hf = (
            f"{r['hf_tok_s']:>8.1f} | {r['hf_lookup_tok_s']:>9.1f} | {r['hf_speedup']:>9.2f}x"
            if "hf_tok_s" in r
            else f"{'-':>8} | {'-':>9} | {'-':>10}"
        )
        print(
            f"{r['workload']:>8} | {r['batch']:>5} | {r['sfllm_tok_s']:>11.1f} | {r['sfllm_ngram_tok_s']:>12.1f} | "
            f"{r['speedup']:>6.2f}x | {r['acceptance_rate']:>7.0%} | {r['tokens_per_verify']:>10.2f} | "
            f"{'yes' if r['identical'] else 'NO':>4} | {hf}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
