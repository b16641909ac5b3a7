"""`python -m sfllm_core --prompt TEXT`: generate from the command line (the engine alone, no server)."""

import argparse
import sys
import time

from sfllm_core.config import EngineConfig
from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="sfllm-generate", description=__doc__)
    parser.add_argument("--model", default=None, help="HF checkpoint folder or .gguf file (default: Gemma 3 270M)")
    parser.add_argument("--prompt", action="append", help="prompt text; repeat for a batch; omit to read stdin lines")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--max-context-length", type=int, default=None)
    args = parser.parse_args(argv)

    engine = InferenceEngine(
        config=EngineConfig(model_path=args.model, dtype=args.dtype, max_context_length=args.max_context_length)
    )
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed
    )
    prompts = args.prompt
    if not prompts:
        print("Type a prompt per line (Ctrl-D to quit).", file=sys.stderr)
        prompts = (line.rstrip("\n") for line in sys.stdin)
        for prompt in prompts:
            if prompt:
                _run(engine, [prompt], params)
        return
    _run(engine, prompts, params)


def _run(engine: InferenceEngine, prompts: list[str], params: SamplingParams) -> None:
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    elapsed = time.perf_counter() - start
    for prompt, out in zip(prompts, outputs):
        print(f"{prompt}{out.text}\n[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}]")
    total = sum(len(o.token_ids) for o in outputs)
    print(f"[{total} tokens in {elapsed:.2f} s, {total / elapsed:.1f} tok/s]", file=sys.stderr)


if __name__ == "__main__":
    main()
