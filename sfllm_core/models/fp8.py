"""FP8 checkpoints in Qwen's (and DeepSeek-V3's) block format, read as they are stored.

Such a folder's config.json carries
`quantization_config: {quant_method: fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size: [128, 128]}`;
each quantized projection stores `<name>.weight` as float8_e4m3fn [out, in] beside
`<name>.weight_scale_inv`, float32 [ceil(out / 128), ceil(in / 128)]. Despite its name the latter is
the multiplier: w = weight * weight_scale_inv over each 128x128 block. Everything else (embeddings,
norms, lm_head) is stored dense.
"""

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sfllm_core.errors import UnsupportedModelError
from sfllm_core.layers.fp8 import BLOCK, FP8_DTYPE, Fp8Weight

SCALE_SUFFIX = "_scale_inv"


def fp8_quantization_config(folder: Path) -> dict | None:
    """The folder's FP8 quantization_config (validated), or None for a checkpoint that is not FP8."""
    config_file = Path(folder) / "config.json"
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError):
        return None  # the loader reports unreadable configs itself
    quant = raw.get("quantization_config") or (raw.get("text_config") or {}).get("quantization_config")
    if not quant or quant.get("quant_method") != "fp8":
        return None
    problems = []
    if quant.get("fmt", "e4m3") != "e4m3":
        problems.append(f"fmt {quant.get('fmt')!r} (only e4m3 is served)")
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        problems.append(f"activation_scheme {quant.get('activation_scheme')!r} (only dynamic is served)")
    block = quant.get("weight_block_size")
    if not (isinstance(block, list | tuple) and len(block) == 2 and block[1] == BLOCK and block[0] >= 1):
        problems.append(f"weight_block_size {block!r} (blocks of [N, 128] are served)")
    if problems:
        raise UnsupportedModelError(f"{config_file}: unsupported FP8 quantization_config: {'; '.join(problems)}")
    return quant


def fp8_checkpoint_weights(
    files: list[Path],
    quant: dict,
    dtype: torch.dtype,
    rename: Callable[[str], str | None],
    keep_fp8: bool,
) -> Iterator[tuple[str, "torch.Tensor | Fp8Weight", str]]:
    """(name, value, source file) per tensor, renamed by `rename` (None: skipped).

    keep_fp8: the quantized weights come first, each as an Fp8Weight (linear.install_quantized_weights
    takes them), then the dense rest in dtype. Otherwise every weight comes dense, dequantized to dtype.
    """
    block_n, block_k = quant["weight_block_size"]
    if keep_fp8:
        for file, shard, key, scale_key in _scaled(files):
            name = rename(key)
            if name is not None:
                yield name, _fp8_weight(shard, key, scale_key, block_n, block_k, file), str(file)
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as shard:
                keys = set(shard.keys())
                for key in shard.keys():
                    name = rename(key)
                    if name is None or key.endswith(SCALE_SUFFIX):
                        continue
                    scale_key = key + SCALE_SUFFIX
                    if scale_key not in keys:
                        yield name, shard.get_tensor(key).to(dtype), str(file)
                    elif not keep_fp8:
                        weight = _fp8_weight(shard, key, scale_key, block_n, block_k, file)
                        yield name, weight.dequantize(dtype), str(file)
        except (SafetensorError, OSError) as exc:
            raise UnsupportedModelError(f"{file}: cannot read safetensors ({exc})") from exc


def _scaled(files: list[Path]) -> Iterator[tuple[Path, object, str, str]]:
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as shard:
                keys = set(shard.keys())
                for key in shard.keys():
                    if not key.endswith(SCALE_SUFFIX) and key + SCALE_SUFFIX in keys:
                        yield file, shard, key, key + SCALE_SUFFIX
        except (SafetensorError, OSError) as exc:
            raise UnsupportedModelError(f"{file}: cannot read safetensors ({exc})") from exc


def _fp8_weight(shard, key: str, scale_key: str, block_n: int, block_k: int, file: Path) -> Fp8Weight:
    weight, scale = shard.get_tensor(key), shard.get_tensor(scale_key)
    if weight.dtype != FP8_DTYPE or weight.dim() != 2:
        raise UnsupportedModelError(
            f"{file}: {key} is {weight.dtype} {tuple(weight.shape)}, expected a 2-D float8_e4m3fn"
        )
    n, k = weight.shape
    expected = (-(-n // block_n), -(-k // block_k))
    if tuple(scale.shape) != expected:
        raise UnsupportedModelError(
            f"{file}: {scale_key} has shape {tuple(scale.shape)}, expected {expected} for blocks of {block_n}x{block_k}"
        )
    return Fp8Weight(weight.contiguous(), scale.float(), block_n=block_n, block_k=block_k)
