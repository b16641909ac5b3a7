"""Speculative decoding benchmark: batch-1 decode tokens/s with and without n-gram drafts, and the peer.

The peer is transformers' own generate on the same weights, without and with prompt lookup
(`prompt_lookup_num_tokens`, its n-gram assisted generation). Workloads, greedy, ignore_eos:
- copy: a passage, then an instruction to repeat it (input-grounded: a real model copies, and
  n-gram drafts find what it copies);
- random: random token prompts, where drafts are rarely right (the cost of trying).
On random weights nothing is copied, but greedy decoding falls into loops that n-gram lookup
catches; the acceptance rate printed is what the drafts actually got, so read the speedup with it.

The n-gram engine runs with its gate (speculation stands aside at batch sizes where it measured
slower; `aside` counts those steps) unless --always-speculate. Tokens/s counts decode only: each
request is timed at NEW and at 1 new token, and the difference is divided by NEW - 1. Prints a
table, last.

--eagle3-cost (no trained head is reachable here): the cost of EAGLE-3's parts at batch 1 on a
model shape with random weights (Qwen3-8B by default, a tiny one with --tiny), and from them the
tokens/s it would reach at published acceptance lengths (a projection, labelled as such). It times
the plain decode step and, with a random head (whose drafts are nearly all rejected, so each
verify step yields one token), the whole speculative step; then the step's parts one by one: the
verify pass of k + 1 tokens (from its CUDA graph, hidden states read out), the head's catch-up
over the kept rows and one drafting pass of the head.
Usage:
  PYTHONPATH=. .venv/bin/python bench/speculative.py --tiny                # CPU, a tiny random Qwen3
  PYTHONPATH=. python bench/speculative.py --model PATH [--device cuda] [--batches 1 64]
  PYTHONPATH=. python bench/speculative.py --eagle3-cost --device cuda [--k 4]   # Qwen3-8B shape
  PYTHONPATH=. .venv/bin/python bench/speculative.py --eagle3-cost --tiny      # CPU smoke size
  PYTHONPATH=. .venv/bin/python bench/speculative.py --tiny --host-time --batches 1 64 --new-tokens 96
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

from sfllm_core.config import EngineConfig
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


def parting(engine: InferenceEngine, prompts: list[list[int]], want: list, got: list) -> dict:
    """Where the first differing output parts from the plain run's, and that run's top-2 logprob margin
    there (from the prompt alone, at batch 1: a near tie reads as rounding, not a wrong draft rule)."""
    i = next(j for j, (w, g) in enumerate(zip(want, got)) if w != g)
    at = next(p for p, (w, g) in enumerate(zip(want[i], got[i])) if w != g)
    params = SamplingParams(max_tokens=at + 1, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=2)
    alone = engine.generate([prompts[i]], params)[0]
    (_, first), (_, second) = alone.logprobs[at].top[:2]
    differing = sum(w != g for w, g in zip(want, got))
    return dict(sequences=differing, token=at, margin=first - second, alone_agrees=alone.token_ids[:at] == want[i][:at])


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


# Qwen3-8B (config.json of Qwen/Qwen3-8B) and an EAGLE-3 head of its width with a 32k draft vocabulary,
# as the published Qwen3-8B heads have.
QWEN3_8B = dict(
    vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}, tie_word_embeddings=False,
)  # fmt: skip
TINY = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
)  # fmt: skip
# Mean acceptance lengths (tokens per verify step) published for EAGLE-3 heads: AngelSlim's benchmark
# of its Qwen3-8B head (angelslim.readthedocs.io, performance/speculative_decoding/benchmarks: 1.99 mean
# over GSM8K, Alpaca, HumanEval, MT-bench); the SGLang figure for Qwen3-8B on an H200 (187 ->
# 365 tok/s, 1.95x, so at least that); and chains of k = 4 at 3 and 4 for what a better head would give.
PUBLISHED_ACCEPTANCE = (1.99, 3.0, 4.0)
PLAIN_MS_PER_TOKEN = 4.79  # today's Qwen3-8B batch-1 decode on the H200 (issue 13)


def _synced(device: str, fn, iters: int) -> float:
    """Mean seconds per call of fn (after a warm-up), the device synchronised around the loop."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def eagle3_cost(args, dtype: str) -> None:
    from sfllm_core.engine.scheduler import ScheduledBatch

    shape = TINY if args.tiny else QWEN3_8B
    config = transformers.Qwen3Config(**shape)
    head_dir = Path(tempfile.mkdtemp()) / "eagle3-head"
    head_dir.mkdir()
    head = dict(
        architectures=["LlamaForCausalLMEagle3"], model_type="llama", num_hidden_layers=1, hidden_act="silu",
        draft_vocab_size=min(32000, shape["vocab_size"]), rope_theta=shape["rope_parameters"]["rope_theta"],
        **{k: shape[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                                 "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps")},
    )  # fmt: skip
    (head_dir / "config.json").write_text(json.dumps(head))
    k, context = args.k, 2048
    common = dict(
        hf_config=config, load_format="dummy", load_tokenizer=False, dtype=dtype, device=args.device,
        max_num_seqs=4, cuda_graph_max_batch=4, max_context_length=context, kv_cache_memory_gb=2.0,
    )  # fmt: skip
    plain = InferenceEngine(**common)
    new = min(args.new_tokens, 64 if args.tiny else 256)
    prompt = random_prompts(shape["vocab_size"], 1, 128)
    plain_tok_s, _ = time_engine(plain, prompt, 1, new)
    del plain  # its memory, before the second model
    spec = InferenceEngine(
        **common, speculative_algorithm="eagle3", speculative_draft_model=str(head_dir), num_speculative_tokens=k,
        speculative_max_batch=4,
    )  # fmt: skip
    p = spec.proposer
    before = p.num_accepted_tokens
    spec_tok_s, _ = time_engine(spec, prompt, 1, new)
    accepted = p.num_accepted_tokens - before

    # The parts of one step, on a sequence left decoding.
    params = SamplingParams(max_tokens=context - len(prompt[0]) - 8, temperature=0.0, ignore_eos=True)
    spec.add_request("probe", prompt[0], params)
    for _ in range(4):
        spec.step()
    seq = spec.scheduler.running[0]
    spec.pool.grow(seq, seq.num_computed_tokens + 1 + k)
    iters = 5 if args.tiny else 50
    hidden_width = 3 * shape["hidden_size"]
    fake = torch.randn(k + 1, hidden_width, device=args.device, dtype=spec.dtype)

    def draft() -> None:
        seq.draft_ids = [0] * k
        p.fill_drafts([seq])

    def verify() -> None:
        seq.draft_ids = [1] * k
        spec.runner.execute_aux(ScheduledBatch([seq], [1 + k]), spec.aux_layers)

    def catch_up(rows: int) -> None:
        p.catch_up([(seq, seq.num_computed_tokens - rows, fake[:rows])])

    t_draft = _synced(args.device, draft, iters) / max(1, k - 1)
    t_verify = _synced(args.device, verify, iters)
    t_catch = {rows: _synced(args.device, lambda rows=rows: catch_up(rows), iters) for rows in (1, k + 1)}
    seq.draft_ids = []
    spec.abort("probe")
    while spec.has_work():
        spec.step()

    ms = 1000.0
    step_ms = ms / spec_tok_s  # a random head: about one token per verify step
    name = "tiny Qwen3 shape" if args.tiny else "Qwen3-8B shape"
    print(f"\nEAGLE-3 cost, {name}, random weights ({dtype}, {args.device}), batch 1, chain of k={k}")
    print(f"  plain decode:                        {ms / plain_tok_s:8.3f} ms/token ({plain_tok_s:.1f} tok/s)")
    print(f"  speculative step, random head:       {step_ms:8.3f} ms ({accepted} drafts accepted in {new - 1} tokens)")
    print(f"  verify pass, {k + 1} tokens + hidden states: {t_verify * ms:8.3f} ms")
    print(f"  head catch-up, 1 / {k + 1} rows:            {t_catch[1] * ms:8.3f} / {t_catch[k + 1] * ms:.3f} ms")
    print(f"  head drafting pass (one draft):      {t_draft * ms:8.3f} ms, x{k - 1} per step")
    print("  projection (not measured with a trained head): tokens/s = acceptance length / step time")
    print(f"  {'acceptance length':>18} | {'step ms':>8} | {'tok/s':>8} | {'vs plain':>8} | {'vs 4.79 ms/token':>16}")
    for tau in args.acceptance_lengths:
        # The catch-up grows with the kept rows: one more row per accepted draft.
        extra = max(0.0, t_catch[k + 1] - t_catch[1]) * (tau - 1) / k
        tok_s = tau / (step_ms / ms + extra)
        print(
            f"  {tau:>18.2f} | {step_ms + extra * ms:>8.3f} | {tok_s:>8.1f} | {tok_s / plain_tok_s:>7.2f}x | "
            f"{tok_s * PLAIN_MS_PER_TOKEN / ms:>15.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    shape=name, k=k, plain_ms_per_token=ms / plain_tok_s, spec_step_ms=step_ms, verify_ms=t_verify * ms,
                    catch_up_ms={str(r): t * ms for r, t in t_catch.items()}, draft_pass_ms=t_draft * ms,
                    accepted=accepted,
                ),
                f, indent=2,
            )  # fmt: skip


def host_time(args, path: str, dtype: str) -> None:
    """Host time per verify step: a step's thread CPU time less its verify pass's (the part a CUDA
    graph replays on the GPU), n-gram drafts on the verify buffers, run eagerly here."""
    torch.set_num_threads(1)
    engine = InferenceEngine(
        model_path=path, dtype=dtype, device=args.device, max_num_seqs=max(args.batches), max_context_length=1024,
        speculative_algorithm="ngram", num_speculative_tokens=args.k, ngram_max=args.ngram_max,
        ngram_min=args.ngram_min, speculative_max_batch=max(args.batches), speculative_adaptive=False,
    )  # fmt: skip
    if engine.runner.verify is None:
        engine.runner.enable_verify_graphs(args.k + 1, max(args.batches))
    verify = engine.runner.verify
    forward_s = [0.0]
    run_forward = verify._forward

    def timed_forward(*a):
        start = time.thread_time()
        out = run_forward(*a)
        forward_s[0] += time.thread_time() - start
        return out

    verify._forward = timed_forward
    g = torch.Generator().manual_seed(0)
    # A 30-token passage three times over (random weights then loop often, and drafts get accepted).
    prompts = [
        torch.randint(10, engine.vocab_size, (30,), generator=g).tolist() * 3 for _ in range(max(args.batches) + 1)
    ]
    params = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    print(f"\nhost time per verify step, {Path(path).name} ({dtype}, {args.device}), k={args.k}, 1 thread")
    for batch in args.batches:
        rounds = []
        for r in range(args.rounds):
            for i, prompt in enumerate(prompts[1:2] if batch == 1 else prompts[:batch]):
                engine.add_request(f"host-{batch}-{r}-{i}", prompt, params)
            host, steps = 0.0, 0
            while engine.has_work():
                before, forward_s[0] = verify.num_steps, 0.0
                start = time.thread_time()
                engine.step()
                if verify.num_steps > before:
                    host += time.thread_time() - start - forward_s[0]
                    steps += 1
            rounds.append(1000 * host / max(steps, 1))
        rounds.sort()
        every = " ".join(f"{x:.3f}" for x in rounds)
        print(f"  batch {batch:>3}: {rounds[len(rounds) // 2]:.3f} ms (median; rounds {every}), {steps} verify steps")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF folder or GGUF (default: the packaged Gemma 3 270M)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Qwen3 made here (CPU smoke size)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default=None, help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--batches", type=int, nargs="+", default=[1])
    parser.add_argument(
        "--k", type=int, default=None, help="drafts per step (default 8 for n-gram, 4 for --eagle3-cost)"
    )
    parser.add_argument("--ngram-max", type=int, default=4)
    parser.add_argument("--ngram-min", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="timed passes of each row, interleaved (medians)")
    parser.add_argument("--workloads", nargs="+", default=["copy", "random"])
    parser.add_argument("--no-peer", action="store_true", help="skip transformers")
    parser.add_argument("--speculative-max-batch", type=int, default=None, help="default: the largest batch")
    parser.add_argument("--host-time", action="store_true", help="host ms per verify step (use with --tiny)")
    parser.add_argument("--rounds", type=int, default=5, help="--host-time rounds per batch")
    parser.add_argument(
        "--always-speculate", action="store_true", help="no gate: speculate even where it measured slower"
    )
    parser.add_argument("--json", default=None)
    parser.add_argument("--eagle3-cost", action="store_true", help="EAGLE-3's step costs and projected tok/s")
    parser.add_argument("--acceptance-lengths", type=float, nargs="+", default=list(PUBLISHED_ACCEPTANCE))
    args = parser.parse_args()
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    if args.k is None:
        algorithm = "eagle3" if args.eagle3_cost else "ngram"
        args.k = EngineConfig(speculative_algorithm=algorithm).resolved_num_speculative_tokens()
    if args.eagle3_cost:
        eagle3_cost(args, dtype)
        return

    if args.tiny:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from checkpoints import make_qwen3_checkpoint

        path = str(make_qwen3_checkpoint(Path(tempfile.mkdtemp()) / "qwen3", max_position_embeddings=4096))
        args.new_tokens = min(args.new_tokens, 64)
    else:
        path = resolve_model_path(args.model)
    if args.host_time:
        host_time(args, path, dtype)
        return
    common = dict(model_path=path, dtype=dtype, device=args.device, max_num_seqs=max(args.batches))
    spec_settings = dict(
        speculative_algorithm="ngram",
        num_speculative_tokens=args.k,
        ngram_max=args.ngram_max,
        ngram_min=args.ngram_min,
        # By default every batch given speculates; --speculative-max-batch 16 times the engine's default policy.
        speculative_max_batch=args.speculative_max_batch or max(args.batches),
        speculative_adaptive=not args.always_speculate,
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
            before = (spec.proposer.num_draft_tokens, spec.proposer.num_accepted_tokens, spec.proposer.num_proposals)
            aside = spec.gate.num_steps_aside if spec.gate is not None else 0
            plain_rates, spec_rates = [], []
            for _ in range(args.repeats):  # interleaved, medians: a batch-64 pass is a fraction of a second
                rate, want = time_engine(plain, prompts, batch, args.new_tokens)
                plain_rates.append(rate)
                rate, got = time_engine(spec, prompts, batch, args.new_tokens)
                spec_rates.append(rate)
            ours, fast = statistics.median(plain_rates), statistics.median(spec_rates)
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
                parting=None if got == want else parting(plain, prompts, want, got),
                # Steps in which the gate kept drafts back (speculation measured slower at that batch size).
                steps_aside=(spec.gate.num_steps_aside if spec.gate is not None else 0) - aside,
            )
            if spec.gate is not None:  # what the gate measured at this batch size: ms per token, each mode
                for mode, speculating in (("gate_spec_ms", True), ("gate_plain_ms", False)):
                    cost = spec.gate.cost(batch, speculating)
                    row[mode] = None if cost is None else 1e3 * cost
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
        f"{'accepted':>8} | {'tok/verify':>10} | {'aside':>5} | {'gate us/tok spec/plain':>22} | {'same':>4} | "
        f"{'hf tok/s':>8} | {'hf+lookup':>9} | {'hf speedup':>10}"
    )
    print(head)
    for r in rows:
        hf = (
            f"{r['hf_tok_s']:>8.1f} | {r['hf_lookup_tok_s']:>9.1f} | {r['hf_speedup']:>9.2f}x"
            if "hf_tok_s" in r
            else f"{'-':>8} | {'-':>9} | {'-':>10}"
        )
        gate = "/".join("-" if r.get(k) is None else f"{1e3 * r[k]:.1f}" for k in ("gate_spec_ms", "gate_plain_ms"))
        print(
            f"{r['workload']:>8} | {r['batch']:>5} | {r['sfllm_tok_s']:>11.1f} | {r['sfllm_ngram_tok_s']:>12.1f} | "
            f"{r['speedup']:>6.2f}x | {r['acceptance_rate']:>7.0%} | {r['tokens_per_verify']:>10.2f} | "
            f"{r['steps_aside']:>5} | {gate:>22} | "
            f"{'yes' if r['identical'] else 'NO':>4} | {hf}"
        )
    for r in rows:
        if r["parting"]:
            p = r["parting"]
            print(
                f"{r['workload']} batch {r['batch']}: {p['sequences']} outputs differ; the first parts at token "
                f"{p['token']}, where plain decoding's top two are {p['margin']:.3f} apart in logprob"
                + ("" if p["alone_agrees"] else " (the batch-1 rerun had parted earlier)")
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
