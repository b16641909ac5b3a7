"""FP8 checkpoints in Qwen's block format load as stored and compute what their dequantized weights do;
--quantization fp8 of a dense checkpoint stays close to it.

The test writes the FP8 checkpoint itself from the tiny Qwen3: every projection's weight as
float8_e4m3fn per 128x128 block with `weight_scale_inv` (the block's amax / 448, the multiplier),
config.json's quantization_config as Qwen3-8B-FP8 has it. Its reference is a dense folder of the
same values dequantized here, run by transformers.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from checkpoints import make_qwen3_checkpoint
from safetensors.torch import load_file, save_file

from sfllm_core.engine.inference_engine import InferenceEngine
from sfllm_core.engine.request_sequence import RequestSequence
from sfllm_core.errors import UnsupportedModelError
from sfllm_core.layers.fp8 import Fp8Weight
from sfllm_core.models.common import ForwardContext
from sfllm_core.sampling_params import SamplingParams

QWEN_FP8_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _block_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, scale_inv [ceil(N/128), ceil(K/128)]), written out longhand, block by block."""
    n, k = w.shape
    scale = torch.empty(-(-n // 128), -(-k // 128))
    q = torch.empty(n, k)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128]
            scale[i, j] = block.abs().max() / 448.0
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = block / scale[i, j]
    return q.to(torch.float8_e4m3fn), scale


def _dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    out = q.float()
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            out[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] *= scale[i, j]
    return out


def make_fp8_checkpoint(root: Path, **qwen_kwargs) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    """(FP8 folder, its dequantized dense twin, the stored fp8 weights by name)."""
    dense = make_qwen3_checkpoint(root / "dense", **qwen_kwargs)
    fp8, twin = root / "fp8", root / "dequantized"
    shutil.copytree(dense, fp8)
    shutil.copytree(dense, twin)
    state = load_file(str(dense / "model.safetensors"))
    stored, dequantized, quantized = {}, {}, {}
    for name, tensor in state.items():
        if name.rsplit(".", 2)[-2] in PROJECTIONS:
            q, scale = _block_quantize(tensor.float())
            stored[name], stored[name + "_scale_inv"] = q, scale
            dequantized[name], quantized[name] = _dequantize(q, scale), q
        else:  # embeddings and norms stay dense, in bfloat16 as Qwen's FP8 checkpoints keep them
            stored[name] = dequantized[name] = tensor.to(torch.bfloat16)
    save_file(stored, str(fp8 / "model.safetensors"), metadata={"format": "pt"})
    save_file(
        {k: v.float() for k, v in dequantized.items()}, str(twin / "model.safetensors"), metadata={"format": "pt"}
    )
    config = json.loads((fp8 / "config.json").read_text())
    config["quantization_config"] = QWEN_FP8_CONFIG
    (fp8 / "config.json").write_text(json.dumps(config))
    return fp8, twin, quantized


def _all_position_logits(engine: InferenceEngine, token_ids: list[int]) -> torch.Tensor:
    seq = RequestSequence("fp8", token_ids, SamplingParams(max_tokens=1))
    engine.scheduler.add(seq)
    chunks = []
    while seq.num_computed_tokens < len(token_ids):
        batch = engine.scheduler.schedule()
        input_ids, meta, _ = engine.runner.prepare(batch)
        engine.runner.backend.prepare(meta)
        with torch.inference_mode():
            ctx = ForwardContext(engine.runner.backend, meta, engine.pool.kv_caches)
            chunks.append(engine.model.compute_logits(engine.model(input_ids, meta.positions, ctx)))
        engine.scheduler.commit(batch)
    engine.scheduler.finish(seq, "stop")
    return torch.cat(chunks)


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory) -> tuple[Path, Path, dict[str, torch.Tensor]]:
    return make_fp8_checkpoint(tmp_path_factory.mktemp("fp8"), tie_word_embeddings=False)


PROMPT = torch.randint(3, 384, (29,), generator=torch.Generator().manual_seed(2)).tolist()


def test_fp8_checkpoint_loads_as_stored(fp8_checkpoint):
    fp8, _, quantized = fp8_checkpoint
    engine = InferenceEngine(model_path=str(fp8), dtype="float32", device="cpu")
    assert engine.quantization == "fp8"  # auto: from config.json's quantization_config
    layer = engine.model.model.layers[1]
    qkv, gate_up = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
    assert isinstance(qkv, Fp8Weight) and isinstance(gate_up, Fp8Weight)
    # q|k|v (64 + 32 + 32 rows) sit inside one 128-row block each: merged, every row keeps its block's scale.
    assert qkv.block_n == 1 and gate_up.block_n == 128
    prefix = "model.layers.1."
    parts = [quantized[prefix + f"self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(qkv.weight.view(torch.uint8), torch.cat(parts).view(torch.uint8))
    assert isinstance(engine.model.lm_head.weight, torch.nn.Parameter)  # dense in the checkpoint, dense here


def test_fp8_checkpoint_matches_its_dequantized_reference(fp8_checkpoint):
    fp8, twin, _ = fp8_checkpoint
    reference = transformers.AutoModelForCausalLM.from_pretrained(twin, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([PROMPT])).logits[0]
    for quantization in ("fp8", "none"):  # as stored, and dequantized at load
        engine = InferenceEngine(
            model_path=str(fp8), dtype="float32", device="cpu", quantization=quantization, max_num_batched_tokens=8
        )
        got = _all_position_logits(engine, PROMPT)
        assert (got - expected).abs().max() < 1e-4, quantization
        params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
        tokens = engine.generate([PROMPT], params)[0].token_ids
        with torch.no_grad():
            want = reference.generate(
                torch.tensor([PROMPT]), max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0
            )[0, len(PROMPT) :].tolist()
        assert tokens == want, quantization


def test_fp8_checkpoint_with_static_activations_is_refused(fp8_checkpoint, tmp_path):
    fp8, _, _ = fp8_checkpoint
    folder = tmp_path / "static"
    shutil.copytree(fp8, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {**QWEN_FP8_CONFIG, "activation_scheme": "static"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError, match="activation_scheme 'static'"):
        InferenceEngine(model_path=str(folder), dtype="float32", device="cpu")


def test_fp8_checkpoint_with_misshapen_scales_is_refused(fp8_checkpoint, tmp_path):
    fp8, _, _ = fp8_checkpoint
    folder = tmp_path / "misshapen"
    shutil.copytree(fp8, folder)
    state = load_file(str(folder / "model.safetensors"))
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    state[name] = torch.ones(2, 2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedModelError, match="down_proj.weight_scale_inv has shape"):
        InferenceEngine(model_path=str(folder), dtype="float32", device="cpu")


@pytest.mark.parametrize("scheme", ["channel", "block"])
def test_quantizing_a_dense_checkpoint_at_load_stays_close(qwen3_path, scheme):
    dense = InferenceEngine(model_path=qwen3_path, dtype="float32", device="cpu")
    fp8 = InferenceEngine(model_path=qwen3_path, dtype="float32", device="cpu", quantization="fp8", fp8_scheme=scheme)
    assert fp8.quantization == "fp8"
    assert isinstance(fp8.model.model.layers[0].mlp.down_proj.weight, Fp8Weight)
    prompt = torch.randint(3, 384, (64,), generator=torch.Generator().manual_seed(5)).tolist()
    want, got = _all_position_logits(dense, prompt), _all_position_logits(fp8, prompt)
    cosine = F.cosine_similarity(got, want, dim=-1)
    top1 = (got.argmax(-1) == want.argmax(-1)).float().mean()
    # e4m3 rounds each weight by up to 1/16, and the tiny model's random weights (std 0.15, far
    # larger than trained ones) amplify that through its layers: measured 0.98-0.999 per position
    # and 78% top-1 (its logits have many near ties). bench/fp8_accuracy.py measures real shapes.
    assert cosine.mean() > 0.99 and cosine.min() > 0.97 and top1 >= 0.7, (cosine.min().item(), top1.item())


def _agree_until_a_near_tie(ours, ref, gap: float, tol: float) -> int:
    """Greedy tokens equal up to where they part, each with a logprob within tol of the reference's, and
    parting only to a token within gap of the reference's best (among its top 3). Returns how many agree."""
    agree = next((i for i, (x, y) in enumerate(zip(ours.token_ids, ref.token_ids)) if x != y), len(ref.token_ids))
    for i in range(agree):
        assert abs(ours.logprobs[i].logprob - ref.logprobs[i].logprob) <= tol, (i, ours.logprobs[i], ref.logprobs[i])
    if agree < len(ref.token_ids):
        top = dict(ref.logprobs[agree].top)
        best = max(top.values())
        assert best - top.get(ours.token_ids[agree], float("-inf")) <= gap, (agree, ours.token_ids[agree], top)
    return agree


@pytest.mark.gpu
@pytest.mark.parametrize("source", ["checkpoint", "channel", "block"])
def test_fp8_on_gpu_agrees_with_the_cpu_reference(fp8_checkpoint, qwen3_path, source):
    """CUDA graphs, the FP8 GEMV (batch <= 4) and GEMM (prefill, larger batches) against the CPU's
    dequantized path, both in float32: the GPU's GEMM quantizes activations per token, the CPU does not."""
    path = str(fp8_checkpoint[0]) if source == "checkpoint" else qwen3_path
    kw = {} if source == "checkpoint" else {"quantization": "fp8", "fp8_scheme": source}
    gpu = InferenceEngine(
        model_path=path, dtype="float32", device="cuda", max_num_seqs=16, cuda_graph_max_batch=16, **kw
    )
    cpu = InferenceEngine(model_path=path, dtype="float32", device="cpu", **kw)
    assert gpu.runner.graphs is not None and gpu.quantization == cpu.quantization == "fp8"
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, 384, (n,), generator=gen).tolist() for n in (19, 5, 33, 12, 1, 27, 8, 40)]
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=True, top_logprobs=3)
    agreed = []
    for batch in (prompts[:1], prompts[:2], prompts):  # GEMV at 1-2 rows, GEMM at 8
        agreed += [
            _agree_until_a_near_tie(o, r, gap=0.5, tol=0.5)
            for o, r in zip(gpu.generate(batch, params), cpu.generate(batch, params))
        ]
    # Per token-quantized activations move this tiny random model's flat logits (384 tokens, top
    # logprobs near -3) by up to ~0.3 (H200, 2026-12-02) and swap near ties early in a sequence now
    # and then (a batch-1 sequence parted at token 2; one to the third-best token, 0.06 below the best):
    # the count is taken over all 11 sequences, 176 tokens, not per batch.
    assert sum(agreed) >= 3 * len(agreed), agreed
    assert gpu.pool.num_used_pages == 0
