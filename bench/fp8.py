"""FP8 weights against bf16 on one GPU, in one run: accuracy on the same weights, then speed.

Accuracy (Qwen3-0.6B and 8B shapes, random weights): one bf16 model; its logits at 1,000 prompt
positions (4 prompts of 250 tokens in one chunk each: the FP8 GEMM path, activations quantized per
token) and at 128 decode steps (teacher-forced on bf16's greedy tokens: the FP8 GEMV path, bf16
activations), against the same model with its projections quantized per channel and per 128x128
block (lm_head stays bf16, as in Qwen's FP8 checkpoints). Reported: cosine similarity of the logit
rows, top-1 agreement, KL(bf16 || fp8), and how many positions are near ties for bf16 (top two
within 0.5): random weights give flatter logits than a trained model, so top-1 there is the
harshest reading. Weights: std 0.02 (transformers' initializer_range), the output projection scaled
to give logits of std 4 (a trained model's spread), norms 1. Per layer (prefill): the residual
stream's cosine against bf16 after layers 1, 2, 4, ... (errors carried up), and each layer run alone
on bf16's own input (its error only): at std 0.02 a 4096-wide random layer carries the stream's error
on and adds to it (Qwen3-8B's 36 layers), a 1024-wide one lets it settle (0.6B); bf16's own rounding
against float32 grows the same way (docs/PERFORMANCE.md, FP8).

Kernels (--kernels): the FP8 GEMV against the bf16 path on the 8B shapes at batch 1, GB/s of
weights; --sweep also times other (BLOCK_N, BLOCK_K, warps) for tuning launch_config.

Speed: bench/engine.py's `ours` for bf16, fp8-channel and fp8-block in turn: (b) batch-1 ms/token
with floors, (c) the batch-256 decode step, (a) offline throughput (--seqs sequences); then
fp8-channel+lm (lm_head in FP8 too) at batch 1 and fp8-channel+kv8 (the FP8 KV cache) at batch 256.

Usage (from the repo root): PYTHONPATH=. python bench/fp8.py [--models qwen3-0.6b qwen3-8b]
    [--skip accuracy kernels speed] [--seqs 128] [--json bench_fp8.json]
The default run takes about 5 minutes on an H200.
"""

import argparse
import contextlib
import gc
import importlib.util
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sfllm_core.config import EngineConfig
from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.engine.request_sequence import RequestSequence
from sfllm_core.layers.fp8 import UNQUANTIZED, Fp8Weight
from sfllm_core.layers.linear import Linear
from sfllm_core.models.common import ForwardContext
from sfllm_core.sampling_params import SamplingParams

_spec = importlib.util.spec_from_file_location("bench_engine", Path(__file__).with_name("engine.py"))
engine_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(engine_bench)
_spec = importlib.util.spec_from_file_location("bench_gemv", Path(__file__).with_name("gemv.py"))
gemv_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gemv_bench)

SCHEMES = ("channel", "block")
# "+lm_head": EngineConfig.fp8_lm_head, the output projection in FP8 too.
ACCURACY_VARIANTS = ("channel", "block", "channel+lm_head")
LOGIT_STD = 4.0
# Speed parts per model: the 0.6B question is only "batch 1 no slower than bf16".
SPEED_PARTS = {"qwen3-0.6b": ["b"], "qwen3-8b": ["b", "c", "a"]}


# ---- accuracy ---------------------------------------------------------------------------------


@torch.no_grad()
def realistic_init(model: nn.Module, config, seed: int = 0) -> None:
    torch.manual_seed(seed)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        elif name == "lm_head.weight" or (tied and name == "model.embed_tokens.weight"):
            param.normal_(0.0, LOGIT_STD / config.hidden_size**0.5)
        else:
            param.normal_(0.0, 0.02)


@contextlib.contextmanager
def quantized(model: nn.Module, scheme: str, lm_head: bool = False):
    """The model with its projections (and lm_head) FP8 while inside; the dense layers are put back after."""
    skip = () if lm_head else UNQUANTIZED
    swaps = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
        and isinstance(module.weight, nn.Parameter)
        and name.rpartition(".")[2] not in skip
    ]

    def put(name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)

    for name, module in swaps:
        put(name, Linear.from_weight(Fp8Weight.from_dense(module.weight, scheme), module.bias))
    try:
        yield
    finally:
        for name, module in swaps:
            put(name, module)
        gc.collect()
        torch.cuda.empty_cache()


def prefill_logits(engine: InferenceEngine, prompt: list[int]) -> torch.Tensor:
    seq = RequestSequence("acc", prompt, SamplingParams(max_tokens=1))
    engine.scheduler.add(seq)
    chunks = []
    while seq.num_computed_tokens < len(prompt):
        batch = engine.scheduler.schedule()
        input_ids, meta, _ = engine.runner.prepare(batch)
        engine.runner.backend.prepare(meta)
        with torch.inference_mode():
            ctx = ForwardContext(engine.runner.backend, meta, engine.pool.kv_caches)
            chunks.append(engine.model.compute_logits(engine.model(input_ids, meta.positions, ctx)).float())
        engine.scheduler.commit(batch)
    engine.scheduler.finish(seq, "stop")
    return torch.cat(chunks)


def decode_logits(
    engine: InferenceEngine, prompt: list[int], steps: int, forced: list[int] | None
) -> tuple[torch.Tensor, list[int]]:
    """Logits of `steps` one-token decode steps after prompt, fed forced tokens (None: its own greedy
    ones), and the tokens fed."""
    params = SamplingParams(max_tokens=steps + 1, temperature=0.0, ignore_eos=True)
    seq = RequestSequence("acc-decode", list(prompt), params)
    engine.scheduler.add(seq)
    rows, fed = [], []
    while len(rows) < steps + 1:
        batch = engine.scheduler.schedule()
        logits, sampled = engine.runner.execute(batch)
        engine.scheduler.commit(batch)
        if sampled:
            rows.append(logits[0].float())
            fed.append(forced[len(fed)] if forced is not None else int(logits[0].argmax()))
            seq.token_ids.append(fed[-1])
    engine.scheduler.finish(seq, "length")
    return torch.stack(rows[1:]), fed  # rows[0] is the prefill's last position


@contextlib.contextmanager
def layer_streams(model: nn.Module, record: list, inputs: list | None = None):
    """Records each decoder layer's residual stream after it (h + residual, float32) into record, one
    list per layer; with inputs (a reference run's recorded `layer_inputs`), every layer is fed the
    reference's input instead of its predecessor's output, so its output differs by its own error only."""
    layers = model.model.layers
    record[:] = [[] for _ in layers]
    seen = [0] * len(layers)

    def before(i: int):
        def hook(module, args):
            if inputs is None:
                return None
            positions, _, _, ctx = args
            h, residual = inputs[i][seen[i]]
            return positions, h, residual, ctx

        return hook

    def after(i: int):
        def hook(module, args, output):
            h, residual = output
            record[i].append((h.float() + residual.float()).cpu())
            seen[i] += 1

        return hook

    handles = [layer.register_forward_pre_hook(before(i)) for i, layer in enumerate(layers)]
    handles += [layer.register_forward_hook(after(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def layer_inputs(model: nn.Module, record: list):
    """Records each decoder layer's inputs (h, residual) as they are, one list per layer."""
    layers = model.model.layers
    record[:] = [[] for _ in layers]

    def hook(i: int):
        def fn(module, args):
            _, h, residual, _ = args
            record[i].append((h.clone(), None if residual is None else residual.clone()))

        return fn

    handles = [layer.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def stream_cosines(ref: list, got: list) -> list[float]:
    """Mean cosine over positions of each layer's residual stream, got against ref."""
    return [
        F.cosine_similarity(torch.cat(g), torch.cat(r), dim=-1).mean().item() for r, g in zip(ref, got, strict=True)
    ]


def depth_profile(cosines: list[float]) -> dict[int, float]:
    """The cosines after layers 1, 2, 4, 8, ... and the last (1-based)."""
    depths = sorted({min(2**i, len(cosines)) for i in range(len(cosines).bit_length() + 1)})
    return {d: cosines[d - 1] for d in depths}


def compare(ref: torch.Tensor, got: torch.Tensor) -> dict:
    cosine = F.cosine_similarity(got, ref, dim=-1)
    log_ref, log_got = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (log_ref.exp() * (log_ref - log_got)).sum(-1)
    top2 = ref.topk(2, dim=-1).values
    return {
        "positions": ref.shape[0],
        "cosine_mean": cosine.mean().item(),
        "cosine_min": cosine.min().item(),
        "top1_agreement": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
        "kl_mean": kl.mean().item(),
        "ref_near_ties": (top2[:, 0] - top2[:, 1] < 0.5).float().mean().item(),
    }


def accuracy(name: str, config) -> dict:
    engine = InferenceEngine(
        config=EngineConfig(
            dtype="bfloat16",
            cuda_graphs=False,
            max_context_length=1024,
            max_num_batched_tokens=1024,
            kv_cache_memory_gb=4.0,
            enable_prefix_caching=False,
            max_num_seqs=4,
        ),
        hf_config=config,
    )
    realistic_init(engine.model, config)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, config.vocab_size, (250,), generator=gen).tolist() for _ in range(4)]
    decode_prompt = torch.randint(0, config.vocab_size, (64,), generator=gen).tolist()
    ref_streams, ref_inputs = [], []
    with layer_streams(engine.model, ref_streams), layer_inputs(engine.model, ref_inputs):
        ref_prefill = torch.cat([prefill_logits(engine, p) for p in prompts])
    ref_decode, forced = decode_logits(engine, decode_prompt, 128, None)
    out = {}
    for scheme in ACCURACY_VARIANTS:
        with quantized(engine.model, scheme.removesuffix("+lm_head"), lm_head=scheme.endswith("+lm_head")):
            streams, local = [], []
            with layer_streams(engine.model, streams):
                got_prefill = torch.cat([prefill_logits(engine, p) for p in prompts])
            # Each layer on bf16's input: its own quantization error, none carried from below.
            with layer_streams(engine.model, local, ref_inputs):
                for p in prompts:
                    prefill_logits(engine, p)
            got_decode, _ = decode_logits(engine, decode_prompt, 128, forced)
        compounded, alone = stream_cosines(ref_streams, streams), stream_cosines(ref_streams, local)
        out[scheme] = {
            "prefill": compare(ref_prefill, got_prefill),
            "decode": compare(ref_decode, got_decode),
            # Residual-stream cosine against bf16 after each layer (prefill positions): carried
            # from the layers below, and each layer alone on bf16's input.
            "layers_compounded": depth_profile(compounded),
            "layer_alone_min": min(alone),
            "layer_alone_mean": sum(alone) / len(alone),
        }
        print(name, "accuracy", scheme, out[scheme], flush=True)
    engine.shutdown()
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return out


# ---- kernels ----------------------------------------------------------------------------------


def _time_us(fn, reps: int = 100) -> float:
    """Microseconds per call of fn, replayed from a CUDA graph of reps calls (as the engine runs them:
    a Python loop of Triton launches would time the host's launch cost for kernels of a few us)."""
    return gemv_bench.graph_ms(lambda: [fn() for _ in range(reps)]) * 1e3 / reps


def _rotating(make, nbytes: int):
    """A call that cycles through enough copies (made by make()) to exceed L2, so weights come from HBM."""
    copies = [make() for _ in range(max(1, -(-(256 << 20) // nbytes)))]
    state = {"i": 0}

    def call():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]()

    return call


def kernels(config, sweep: bool) -> dict:
    """A model's projections: at batch 1 the FP8 GEMV (each scheme) against bf16 as served (GEMV or
    cuBLAS), GB/s of weights from HBM; at 256 and 2048 rows the FP8 GEMMs (activation quantization
    included) against bf16 cuBLAS, TFLOPS."""
    from sfllm_core.kernels.fp8_gemm import fp8_matmul, quantize_rows, triton_fp8_gemm
    from sfllm_core.kernels.gemv import gemv, launch_config
    from sfllm_core.layers.linear import GEMV_MAX_WEIGHT_BYTES

    h, inter = config.hidden_size, config.intermediate_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    shapes = {"qkv": (q + 2 * kv, h), "o": (h, q), "gate_up": (2 * inter, h), "down": (h, inter)}
    out = {}
    for label, (n, k) in shapes.items():
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

        def bf16_call(n=n, k=k, x=x):
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            if n * k * 2 <= GEMV_MAX_WEIGHT_BYTES:
                return lambda: gemv(x, w)
            return lambda: F.linear(x, w)

        bf16_us = _time_us(_rotating(bf16_call, n * k * 2))
        row = {"n": n, "k": k, "bf16_us": bf16_us, "bf16_GBps": n * k * 2 / bf16_us / 1e3}

        def bf16_rows_call(n=n, k=k, x=x):  # the bf16 GEMV past the size where the engine hands over to cuBLAS
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
            return lambda: gemv(x, w)

        us = _time_us(_rotating(bf16_rows_call, n * k * 2))
        row["bf16_rows_us"], row["bf16_rows_GBps"] = us, n * k * 2 / us / 1e3
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for scheme in SCHEMES:
            fw = Fp8Weight.from_dense(w, scheme)

            def fp8_call(scheme=scheme, n=n, k=k, x=x):
                f = Fp8Weight.from_dense(torch.randn(n, k, device="cuda") * 0.02, scheme)
                return lambda: gemv(x, f.weight, scale=f.scale, scale_block_n=f.block_n)

            us = _time_us(_rotating(fp8_call, n * k))
            row[f"{scheme}_us"], row[f"{scheme}_GBps"] = us, n * k / us / 1e3
            row[f"{scheme}_config"] = launch_config(n, k, 1)
            if scheme == "channel":
                row.update(_fused_inputs(label, n, k, x))
            if sweep:
                row[f"{scheme}_best_us"], row[f"{scheme}_best_config"] = _sweep(fw, x, us, row[f"{scheme}_config"])
            for m in (256, 2048):
                xm = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                flops = 2 * m * n * k
                t = _time_us(lambda fw=fw, xm=xm: fp8_matmul(xm, fw.weight, fw.scale, fw.block_n, fw.block_k), 50)
                row[f"{scheme}_gemm{m}_TFLOPS"] = flops / t / 1e6
                if scheme == "block":  # the Triton kernel alone, whatever fp8_matmul chose
                    t = _time_us(
                        lambda fw=fw, xm=xm: triton_fp8_gemm(
                            *quantize_rows(xm, True), fw.weight, fw.scale, fw.block_n, torch.bfloat16
                        ),
                        50,
                    )
                    row[f"triton_block_gemm{m}_TFLOPS"] = flops / t / 1e6
                if scheme == "channel":
                    t = _time_us(lambda xm=xm, w=w: F.linear(xm, w), 50)
                    row[f"bf16_gemm{m}_TFLOPS"] = flops / t / 1e6
        out[label] = row
        print("kernel", label, row, flush=True)
    return out


def _fused_inputs(label: str, n: int, k: int, x: torch.Tensor) -> dict:
    """The FP8 GEMV as the model launches it (down after the gate: act(gate) * up made in the kernel;
    q|k|v and gate|up after a norm: RMSNorm(h + residual) made in it; o as it is), one row block per
    program (iters 1) against one_row_fp8_config's choice (the input made once for several)."""
    from sfllm_core.kernels.gemv import gemv, gemv_normed

    norm_w = torch.ones(k, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    out = {}
    for iters in (1, None):

        def call(n=n, k=k, iters=iters):
            f = Fp8Weight.from_dense(torch.randn(n, k, device="cuda") * 0.02, "channel")
            kw = dict(scale=f.scale, scale_block_n=f.block_n, iters=iters)
            if label == "down":
                return lambda: gemv(gate_up, f.weight, None, "silu", **kw)
            if label in ("qkv", "gate_up"):
                return lambda: gemv_normed(x, f.weight, None, norm_w, 1e-6, False, residual, **kw)
            return lambda: gemv(x, f.weight, **kw)

        us = _time_us(_rotating(call, n * k))
        out[f"fused_{'iters1' if iters == 1 else 'auto'}_us"] = us
        out[f"fused_{'iters1' if iters == 1 else 'auto'}_GBps"] = n * k / us / 1e3
    return out


def _sweep(fw: Fp8Weight, x: torch.Tensor, us: float, config: tuple) -> tuple[float, tuple]:
    """The fastest (BLOCK_N, BLOCK_K, num_warps) for this weight at batch 1, starting from launch_config's."""
    from sfllm_core.kernels.gemv import gemv

    best = (us, config)
    bk = config[1]  # whole rows
    for bn in (1, 2, 4, 8, 16):
        for warps in (4, 8, 16):
            c = (bn, bk, warps)
            t = _time_us(lambda c=c: gemv(x, fw.weight, scale=fw.scale, scale_block_n=fw.block_n, config=c), reps=50)
            best = min(best, (t, c))
    return best


# ---- speed ------------------------------------------------------------------------------------


def speed(name: str, config, bw: float, seqs: int) -> dict:
    parts = SPEED_PARTS.get(name, ["b"])
    out = {}
    variants = [("bf16", {}, parts), *((f"fp8-{s}", {"quantization": "fp8", "fp8_scheme": s}, parts) for s in SCHEMES)]
    # The whole model in FP8, lm_head included: batch 1 only, where its bytes count most.
    variants.append(("fp8-channel+lm", {"quantization": "fp8", "fp8_scheme": "channel", "fp8_lm_head": True}, ["b"]))
    if "c" in parts:  # the FP8 KV cache, where it counts: the batch-256 step reads mostly K/V
        variants.append(
            ("fp8-channel+kv8", {"quantization": "fp8", "fp8_scheme": "channel", "kv_cache_dtype": "fp8"}, ["c"])
        )
    for variant, overrides, variant_parts in variants:
        start = time.perf_counter()
        try:
            out[variant] = engine_bench.ours(name, config, variant_parts, seqs, bw, c_batches=(256,), **overrides)
        except Exception as exc:  # one variant's failure must not cost the lead the others' figures
            out[variant] = {"error": repr(exc)}
            gc.collect()
            torch.cuda.empty_cache()
        out[variant]["wall_s"] = time.perf_counter() - start
        print(name, "speed", variant, out[variant], flush=True)
    return out


# ---- the table ----------------------------------------------------------------------------------


def print_tables(results: dict) -> None:
    print(f"\n{results['device']}, copy bandwidth {results['copy_bandwidth_TBps']:.2f} TB/s, torch {results['torch']}")
    acc = {m: r["accuracy"] for m, r in results["models"].items() if "accuracy" in r}
    if acc:
        print("FP8 logits against bf16 (same random weights; lm_head stays bf16 but in +lm_head):")
        print(f"{'model':<11} | {'scheme':<15} | {'path':<19} | {'pos':>5} | {'cos mean':>8} | {'cos min':>7} | "
              f"{'top-1':>6} | {'KL':>8} | {'bf16 ties':>9}")  # fmt: skip
        for model, by_scheme in acc.items():
            for scheme, paths in by_scheme.items():
                for path in ("prefill", "decode"):
                    r = paths[path]
                    label = "prefill (W8A8 GEMM)" if path == "prefill" else "decode (GEMV)"
                    print(
                        f"{model:<11} | {scheme:<15} | {label:<19} | {r['positions']:>5} | {r['cosine_mean']:>8.5f} | "
                        f"{r['cosine_min']:>7.4f} | {r['top1_agreement']:>6.3f} | {r['kl_mean']:>8.5f} | "
                        f"{r['ref_near_ties']:>9.2f}"
                    )
    if acc:
        print("Residual stream against bf16 (prefill): each layer alone on bf16's input (min / mean), then")
        print("carried through the layers below, after layer 1, 2, 4, ...: a layer's own error against its growth")
        for model, by_scheme in acc.items():
            for scheme, r in by_scheme.items():
                if "layer_alone_min" not in r:
                    continue
                depths = "  ".join(f"L{d}: {c:.5f}" for d, c in r["layers_compounded"].items())
                print(
                    f"{model:<11} | {scheme:<15} | alone {r['layer_alone_min']:.5f} / {r['layer_alone_mean']:.5f} | "
                    f"{depths}"
                )
    kern = {m: r["kernels"] for m, r in results["models"].items() if "kernels" in r}
    if kern:
        print(
            "Batch-1 projections from CUDA graphs, us (GB/s of weights): bf16 as served | bf16 GEMV | "
            "fp8 channel | fp8 block (the same GEMV given scales)"
        )
        for model, rows in kern.items():
            for label, r in rows.items():
                cells = " | ".join(
                    f"{r[f'{v}_us']:>7.1f} ({r[f'{v}_GBps']:>5.0f})" for v in ("bf16", "bf16_rows", *SCHEMES)
                )
                print(f"{model:<11} | {label:<7} {r['n']:>6}x{r['k']:<6} | {cells}")
        print(
            "FP8 channel GEMV as launched (down gated, q|k|v and gate|up normed): "
            "one row block a program | one_row_fp8_config"
        )
        for model, rows in kern.items():
            for label, r in rows.items():
                cells = " | ".join(
                    f"{r[f'fused_{v}_us']:>7.1f} ({r[f'fused_{v}_GBps']:>5.0f})" for v in ("iters1", "auto")
                )
                print(f"{model:<11} | {label:<7} {r['n']:>6}x{r['k']:<6} | {cells}")
        print("GEMM TFLOPS at 256 and 2048 rows: bf16 cuBLAS | fp8 channel | fp8 block (as served) | Triton block")
        for model, rows in kern.items():
            for label, r in rows.items():
                cells = " | ".join(
                    " ".join(f"{r.get(f'{v}_gemm{m}_TFLOPS', float('nan')):>5.0f}" for m in (256, 2048))
                    for v in ("bf16", "channel", "block", "triton_block")
                )
                print(f"{model:<11} | {label:<7} {r['n']:>6}x{r['k']:<6} | {cells}")
    figures = [
        ("b_ms_per_token", "batch-1 ms/token", "b_floor_ms"),
        ("b_graph_only_ms", "batch-1 graph replay ms", "b_floor_ms"),
        ("c256_step_ms", "batch-256 step ms", "c256_floor_ms"),
        ("c256_graph_only_ms", "batch-256 graph ms", "c256_floor_ms"),
        ("a_tok_s", "offline out tok/s", None),
    ]
    speeds = {m: r["speed"] for m, r in results["models"].items() if "speed" in r}
    if speeds:
        variants = ["bf16", *(f"fp8-{s}" for s in SCHEMES), "fp8-channel+lm", "fp8-channel+kv8"]
        print("Speed (floors: weights + KV bytes over the copy bandwidth; fp8 floor counts lm_head in bf16):")
        print(f"{'model':<11} | {'figure':<24} | " + " | ".join(f"{v:>14}" for v in variants) + " | floor bf16/fp8")
        for model, by_variant in speeds.items():
            for key, label, floor_key in figures:
                if not any(key in by_variant.get(v, {}) for v in variants):
                    continue
                values = " | ".join(f"{by_variant.get(v, {}).get(key, float('nan')):>14.3f}" for v in variants)
                floors = ""
                if floor_key:
                    bf16_floor, fp8_floor = (
                        by_variant[v].get(floor_key, float("nan")) for v in ("bf16", "fp8-channel")
                    )
                    floors = f"{bf16_floor:.3f}/{fp8_floor:.3f}"
                print(f"{model:<11} | {label:<24} | {values} | {floors}")
    for model, entry in results["models"].items():
        failed = {k: v for k, v in entry.items() if k.endswith("_error")}
        failed.update({f"speed {v}": r["error"] for v, r in entry.get("speed", {}).items() if "error" in r})
        for what, error in failed.items():
            print(f"{model}: {what} FAILED: {error}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["qwen3-0.6b", "qwen3-8b"], choices=list(engine_bench.SHAPES))
    parser.add_argument("--skip", nargs="*", default=[], choices=["accuracy", "kernels", "speed"])
    parser.add_argument("--sweep", action="store_true", help="kernels: also time other GEMV launch configs")
    parser.add_argument("--seqs", type=int, default=128, help="sequences of the offline workload (a)")
    parser.add_argument("--json", default="bench_fp8.json")
    args = parser.parse_args()

    start = time.perf_counter()
    bw = engine_bench.copy_bandwidth()
    results = {
        "device": torch.cuda.get_device_name(),
        "copy_bandwidth_TBps": bw / 1e12,
        "torch": torch.__version__,
        "models": {},
    }
    for name in args.models:
        config = engine_bench.SHAPES[name]()
        entry = results["models"][name] = {}
        for part, run in (
            ("accuracy", lambda name=name, config=config: accuracy(name, config)),
            ("kernels", lambda config=config: kernels(config, args.sweep)),
        ):
            if part in args.skip:
                continue
            try:
                entry[part] = run()
            except Exception as exc:  # reported, and the run goes on
                print(name, part, "failed:", repr(exc), flush=True)
                entry[f"{part}_error"] = repr(exc)
                gc.collect()
                torch.cuda.empty_cache()
        if "speed" not in args.skip:
            entry["speed"] = speed(name, config, bw, args.seqs)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    print(f"total {time.perf_counter() - start:.0f} s")
    print_tables(results)


if __name__ == "__main__":
    main()
