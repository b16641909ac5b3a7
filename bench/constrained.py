"""Constrained decoding benchmark: a JSON schema against free decoding, same prompts and output lengths.

Qwen3-0.6B's shape with random bf16 weights (`--load-format dummy` over a folder holding its
config.json and a synthetic byte-level BPE of 151,643 tokens: every byte, then byte pairs, then
printable triples, so the vocabulary can spell any JSON the way Qwen's own can). The schema is an
array of integers with at least as many items as output tokens, so no sequence can complete it
early and every run, constrained or free, makes exactly --tokens tokens per sequence.

For each batch size it prints ms per output token (wall time / tokens per sequence) of both runs
and their ratio; then, from a third, instrumented constrained run (each phase synchronized, so
slower), where the grammar's time per step goes: mask fill on the host (xgrammar's matchers),
host-to-device copy of the bitmask, applying it to the logits, accepting the sampled tokens.

Usage: python bench/constrained.py [--batches 1 64] [--tokens 256] [--json out.json]
       python bench/constrained.py --tiny     (a 2-layer model and 4k vocabulary, on the CPU too)
"""

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
import transformers
from engine import SHAPES  # bench/engine.py, beside this script

from sfllm_core.config import EngineConfig
from sfllm_core.engine.grammar import GrammarClock
from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.sampling_params import Constraint, SamplingParams

QWEN_TOKENS = 151643  # Qwen's regular tokens; its three chat markers follow, as in Qwen's tokenizer
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def shape(tiny: bool) -> transformers.Qwen3Config:
    if tiny:
        return transformers.Qwen3Config(
            vocab_size=4096,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=4096,
            tie_word_embeddings=True,
        )
    return SHAPES["qwen3-0.6b"]()  # bench/engine.py's, so the two benchmarks measure one shape


def byte_level_tokenizer(num_tokens: int) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of num_tokens regular tokens (bytes, byte pairs, printable triples) plus SPECIALS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    printable = sorted(c for c in alphabet if 33 <= ord(c) < 127) + ["Ġ"]  # Ġ: the space byte
    chars = printable + sorted(set(alphabet) - set(printable))
    vocab = {c: i for i, c in enumerate(chars)}
    merges: list[tuple[str, str]] = []
    pairs = ((a, b) for a in chars for b in chars)
    triples = ((a + b, c) for a in printable for b in printable for c in printable)
    for left, right in (*pairs, *triples):
        if len(vocab) >= num_tokens:
            break
        vocab[left + right] = len(vocab)
        merges.append((left, right))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=SPECIALS[2], bos_token=SPECIALS[0], additional_special_tokens=SPECIALS[:2]
    )


def model_folder(root: Path, tiny: bool) -> Path:
    """config.json and the tokenizer; the weights are random (load_format dummy)."""
    config = shape(tiny)
    tokenizer = byte_level_tokenizer(QWEN_TOKENS if not tiny else config.vocab_size - len(SPECIALS))
    config.eos_token_id = tokenizer.convert_tokens_to_ids(SPECIALS[2])
    config.bos_token_id = tokenizer.convert_tokens_to_ids(SPECIALS[0])
    folder = root / ("qwen3-tiny" if tiny else "qwen3-0.6b")
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def timed(fn) -> float:
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_batch(engine: InferenceEngine, batch: int, tokens: int, temperature: float) -> dict:
    g = torch.Generator().manual_seed(batch)
    prompts = [torch.randint(0, min(5000, engine.vocab_size), (32,), generator=g).tolist() for _ in range(batch)]
    schema = json.dumps({"type": "array", "items": {"type": "integer"}, "minItems": tokens})
    common = dict(max_tokens=tokens, temperature=temperature, ignore_eos=True)
    # No per-request seeds: those draw their noise row by row, a cost both runs would share.
    constrained = [SamplingParams(constraint=Constraint("json_schema", schema), **common)] * batch
    free = [SamplingParams(**common)] * batch
    # Warm-up at this batch size: kernels of new shapes compile, and so does the grammar.
    for params in (constrained, free):
        engine.generate(prompts, [dataclasses.replace(p, max_tokens=8) for p in params])

    outputs = []
    overlapped = engine.num_overlapped_steps
    t_constrained = timed(lambda: outputs.extend(engine.generate(prompts, constrained)))
    assert all(len(o.token_ids) == tokens for o in outputs), "a constrained run ended early"
    constrained_overlapped, overlapped = engine.num_overlapped_steps - overlapped, engine.num_overlapped_steps
    t_free = timed(lambda: engine.generate(prompts, free))
    free_overlapped = engine.num_overlapped_steps - overlapped

    clock = engine.sampler.grammar_clock = GrammarClock()
    t_clocked = timed(lambda: engine.generate(prompts, constrained))
    engine.sampler.grammar_clock = None
    steps = max(clock.steps, 1)
    res = {
        "batch": batch,
        "tokens": tokens,
        "constrained_ms_per_token": t_constrained / tokens * 1e3,
        "free_ms_per_token": t_free / tokens * 1e3,
        "ratio": t_constrained / t_free,
        "clocked_ms_per_token": t_clocked / tokens * 1e3,
        "overlapped_steps": {"constrained": constrained_overlapped, "free": free_overlapped},
        "sample_output": outputs[0].text[:60] if outputs[0].text else "",
    }
    for phase, seconds in clock.seconds.items():
        res[f"{phase}_ms_per_step"] = seconds / steps * 1e3
    return res


def print_table(results: list[dict]) -> None:
    print("\nms per output token (wall time / tokens per sequence)")
    print(f"{'batch':>6} {'free':>9} {'constrained':>12} {'ratio':>7}")
    for r in results:
        free, constrained = r["free_ms_per_token"], r["constrained_ms_per_token"]
        print(f"{r['batch']:>6} {free:>9.3f} {constrained:>12.3f} {r['ratio']:>7.3f}")
    print("\nwhere a constrained step's grammar time goes (ms per step; instrumented run, phases synchronized)")
    phases = GrammarClock.PHASES
    print(f"{'batch':>6} " + " ".join(f"{p:>8}" for p in phases) + f" {'sum':>8} {'of step':>8}")
    for r in results:
        values = [r[f"{p}_ms_per_step"] for p in phases]
        share = sum(values) / r["clocked_ms_per_token"]
        print(f"{r['batch']:>6} " + " ".join(f"{v:>8.3f}" for v in values) + f" {sum(values):>8.3f} {share:>8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a 2-layer model with a 4k vocabulary (CPU-sized)")
    parser.add_argument("--batches", type=int, nargs="+", default=None, help="default: 1 64 (tiny: 1 8)")
    parser.add_argument("--tokens", type=int, default=None, help="output tokens per sequence (default 256; tiny 32)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    batches = args.batches or ([1, 8] if args.tiny else [1, 64])
    tokens = args.tokens or (32 if args.tiny else 256)
    cuda = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        folder = model_folder(Path(tmp), args.tiny)
        settings = dict(model_path=str(folder), load_format="dummy", enable_prefix_caching=False,
                        max_num_seqs=max(batches), cuda_graph_max_batch=max(batches))  # fmt: skip
        if not cuda:
            settings.update(dtype="float32", kv_cache_memory_gb=0.5)
        engine = InferenceEngine(config=EngineConfig(**settings))
        print(f"device={engine.device} dtype={engine.dtype} vocab={engine.vocab_size} tokens/seq={tokens}")
        results = []
        for batch in batches:
            results.append(bench_batch(engine, batch, tokens, args.temperature))
            print(json.dumps(results[-1]))
        engine.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print_table(results)


if __name__ == "__main__":
    main()
