"""The engine's one configuration object, validated once."""

from dataclasses import dataclass

import torch

from sfllm_core.errors import InvalidRequestError

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class EngineConfig:
    """Knobs of InferenceEngine. model_path None means the packaged Gemma 3 270M."""

    model_path: str | None = None
    # "dummy": random weights of the checkpoint's shapes (config.json and tokenizer only), for benchmarks.
    load_format: str = "auto"
    # False: the engine takes token ids only and its eos ids come from the model config, a server
    # that tokenizes adding the tokenizer's own (add_eos_token_ids); it saves loading the tokenizer twice.
    load_tokenizer: bool = True
    served_model_name: str | None = None  # default: the checkpoint folder or file name
    dtype: str = "auto"  # auto: bfloat16 on CUDA, float32 on the CPU
    # Weight format: "gguf" serves a GGUF file's own quantized blocks on the CPU (int4/int8 kernels),
    # "none" dequantizes them at load (to dtype); "fp8" serves float8_e4m3fn weights (layers/fp8.py),
    # quantized at load or as a pre-quantized FP8 checkpoint stores them. auto: gguf for a GGUF file
    # on the CPU, fp8 for an FP8 checkpoint (config.json quantization_config), else none.
    quantization: str = "auto"
    # How --quantization fp8 quantizes a dense checkpoint: "channel" (a scale per output row) or
    # "block" (per 128x128 block, as Qwen's FP8 checkpoints are). Pre-quantized ones keep their own.
    fp8_scheme: str = "channel"
    # FP8 for the output projection too (fp8_scheme): a decode step reads 0.6 GB less on Qwen3-8B,
    # at some cost to the logits' precision. Off: it stays in dtype, as Qwen's FP8 checkpoints keep it.
    fp8_lm_head: bool = False
    # The KV cache's element type: "auto" is dtype; "fp8" stores K and V as float8_e4m3fn (unscaled:
    # Qwen3's normed keys and the values sit well inside its range), half the bytes a decode step
    # reads from the cache at large batches, and twice the tokens in the same memory.
    kv_cache_dtype: str = "auto"
    device: str = "auto"  # auto: cuda when available
    max_context_length: int | None = None  # default: the model's, capped at 8192 tokens
    page_size: int = 16
    num_pages: int | None = None  # default: sized from kv_cache_memory_gb
    kv_cache_memory_gb: float | None = None  # default: 1 GB on the CPU, 90% of free memory on CUDA
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # per-step token budget (chunked prefill)
    max_waiting: int = 1024  # queue bound; past it add_request raises QueueFullError
    enable_prefix_caching: bool = True
    # Sliding-window layers keep only their window of K/V (in a pool of their own). Off: every
    # layer keeps the whole context, as full-attention layers do.
    sliding_window_kv: bool = True
    attention_backend: str = "auto"  # auto | torch | triton
    cuda_graphs: bool = True
    cuda_graph_max_batch: int = 256
    # A lone prefill chunk of up to this many tokens replays a CUDA graph (engine/prefill_graphs.py);
    # capped at max_num_batched_tokens and 1024. 0: prefills run eagerly.
    prefill_graph_max_tokens: int = 1024
    # Programmatic dependent launch of the Triton kernels on Hopper and later (kernels/pdl.py).
    pdl: bool = True
    # Ranks of one engine, one device each (cuda:D..D+N-1 from device cuda:D; gloo processes on the CPU):
    # weights, heads and KV pages are split over them (engine/ranks.py).
    tensor_parallel_size: int = 1
    seed: int = 0
    # Speculative decoding: None (off), "ngram" (prompt lookup: drafts are the tokens that followed
    # the sequence's last ngram_max..ngram_min tokens where they occurred before) or "eagle3" (an
    # EAGLE-3 draft head, speculative_draft_model, reading the target's hidden states; chain drafts).
    speculative_algorithm: str | None = None
    speculative_draft_model: str | None = None  # the EAGLE-3 head's checkpoint folder (random with load_format dummy)
    # Drafts per sequence and step at most; None: 8 for ngram (copy-heavy Gemma 270M on the H200: batch 1
    # 1.62x with 4, 2.55x with 8, docs/PERFORMANCE.md), 4 for eagle3 (each draft is a pass of the head).
    num_speculative_tokens: int | None = None
    ngram_max: int = 4
    ngram_min: int = 2
    # Speculation stands aside in steps with more decoding sequences than this: a large batch is
    # compute-bound, and verifying drafts there costs more than it saves. Gemma 270M on the H200,
    # random prompts with the gate on: batch 16 1.02x, batch 32 0.88-0.90x (copy prompts: 3.02x, 2.30x).
    speculative_max_batch: int = 16
    # n-gram speculation also stands aside at a batch size where it measured slower per token than
    # plain decoding (engine/speculative.py, SpeculationGate); off: it runs wherever drafts are found.
    speculative_adaptive: bool = True

    def resolved_num_speculative_tokens(self) -> int:
        """num_speculative_tokens, or the algorithm's default (resolved late: `replace` may change the algorithm)."""
        if self.num_speculative_tokens is not None:
            return self.num_speculative_tokens
        return 8 if self.speculative_algorithm == "ngram" else 4

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        if self.dtype == "auto":
            return torch.bfloat16 if self.resolved_device().type == "cuda" else torch.float32
        if self.dtype not in _DTYPES:
            raise InvalidRequestError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}", "dtype")
        return _DTYPES[self.dtype]

    def resolved_kv_cache_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self.kv_cache_dtype == "fp8" else self.resolved_dtype()

    def validate(self) -> None:
        self.resolved_dtype()
        if self.tensor_parallel_size < 1:
            raise InvalidRequestError(
                f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}", "tensor_parallel_size"
            )
        if self.tensor_parallel_size > 1 and self.speculative_algorithm is not None:
            raise InvalidRequestError(
                "speculative decoding is not supported with tensor_parallel_size > 1 yet", "speculative_algorithm"
            )
        for name in ("page_size", "max_num_seqs", "max_num_batched_tokens", "max_waiting"):
            if getattr(self, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}", name)
        if self.quantization not in ("auto", "none", "gguf", "fp8"):
            raise InvalidRequestError(
                f"quantization must be auto, none, gguf or fp8; got {self.quantization!r}", "quantization"
            )
        if self.load_format not in ("auto", "dummy"):
            raise InvalidRequestError(f"load_format must be auto or dummy; got {self.load_format!r}", "load_format")
        if self.fp8_scheme not in ("channel", "block"):
            raise InvalidRequestError(f"fp8_scheme must be channel or block; got {self.fp8_scheme!r}", "fp8_scheme")
        if self.kv_cache_dtype not in ("auto", "fp8"):
            raise InvalidRequestError(
                f"kv_cache_dtype must be auto or fp8; got {self.kv_cache_dtype!r}", "kv_cache_dtype"
            )
        if self.speculative_algorithm not in (None, "ngram", "eagle3"):
            raise InvalidRequestError(
                f"speculative_algorithm must be ngram, eagle3 or None; got {self.speculative_algorithm!r}",
                "speculative_algorithm",
            )
        if self.speculative_algorithm == "eagle3" and not self.speculative_draft_model:
            raise InvalidRequestError(
                "speculative_algorithm eagle3 needs speculative_draft_model (the draft head's folder)",
                "speculative_draft_model",
            )
        if self.speculative_algorithm is not None:
            if self.resolved_num_speculative_tokens() < 1:
                raise InvalidRequestError(
                    f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}", "num_speculative_tokens"
                )
            for name in ("ngram_min", "speculative_max_batch"):
                if getattr(self, name) < 1:
                    raise InvalidRequestError(f"{name} must be >= 1, got {getattr(self, name)}", name)
            if self.ngram_max < self.ngram_min:
                raise InvalidRequestError(
                    f"ngram_max ({self.ngram_max}) must be >= ngram_min ({self.ngram_min})", "ngram_max"
                )
        if self.attention_backend not in ("auto", "torch", "triton"):
            raise InvalidRequestError(
                f"attention_backend must be auto, torch or triton; got {self.attention_backend!r}", "attention_backend"
            )
