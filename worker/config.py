"""WorkerConfig: the worker's one configuration object, built from CLI flags and environment here only."""

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

from sfllm_core.config import EngineConfig

ENV_PREFIX = "SFLLM_"


@dataclass
class WorkerConfig:
    """Everything `sfllm-worker` can be told; each field is also read from SFLLM_<FIELD_NAME_UPPER>."""

    model: str | None = None  # HF checkpoint folder or GGUF file; None: the packaged Gemma 3 270M
    load_format: str = "auto"  # "dummy": random weights of the checkpoint's shapes (benchmarks)
    served_model_name: str | None = None  # default: the engine's model name
    host: str = "0.0.0.0"
    port: int = 50051  # 0: pick a free port
    metrics_host: str = "0.0.0.0"
    metrics_port: int = 8001  # Prometheus /metrics over HTTP; 0: pick a free port
    dtype: str = "auto"
    quantization: str = "auto"  # gguf: a GGUF's own quantized blocks on the CPU; fp8: FP8 weights; none: dequantized
    fp8_scheme: str = "channel"  # --quantization fp8 of a dense checkpoint: a scale per row, or per 128x128 block
    kv_cache_dtype: str = "auto"  # fp8: K/V stored as float8_e4m3fn (half the cache's bytes)
    device: str = "auto"
    max_context_length: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_waiting: int = 1024  # queue bound; past it Generate answers RESOURCE_EXHAUSTED
    # Queue-time bound: a request not yet admitted this long after it arrived is refused (RESOURCE_EXHAUSTED), and a
    # new one that would wait longer (by the queue's length and service rate) is refused at once. 0: no bound.
    max_queue_time_s: float = 20.0
    page_size: int = 16
    num_pages: int | None = None
    kv_cache_memory_gb: float | None = None
    enable_prefix_caching: bool = True
    sliding_window_kv: bool = True
    attention_backend: str = "auto"
    cuda_graphs: bool = True
    pdl: bool = True  # programmatic dependent launch on Hopper (SFLLM_PDL=0 turns it off)
    tensor_parallel_size: int = 1  # the engine process is rank 0 and starts the others (devices D..D+N-1)
    seed: int = 0
    speculative_algorithm: str | None = None  # "ngram": prompt-lookup drafts, verified in one step (off by default)
    speculative_draft_model: str | None = None  # "eagle3": the EAGLE-3 head's checkpoint folder
    num_speculative_tokens: int | None = None  # None: the engine's default (8 for ngram, 4 for eagle3)
    ngram_max: int = 4
    ngram_min: int = 2
    speculative_max_batch: int = 16  # speculation stands aside in steps with more decoding sequences
    speculative_adaptive: bool = True  # n-gram: also where it measured slower than plain steps
    max_n: int = 16  # most completions one Generate call may ask for
    max_stop_strings: int = 16
    drain_timeout_s: float = 30.0  # SIGTERM: how long in-flight streams may run before they are aborted
    retry_after_ms: int = 1000  # the hint sent with RESOURCE_EXHAUSTED
    # A completion's new tokens go out once this many have gathered (or it ends). 1: as soon as
    # there is anything; a client that reads slowly then gets fewer, larger deltas either way.
    stream_interval: int = 1
    max_message_bytes: int = 16 * 1024 * 1024  # largest Generate request accepted (the gateway sends up to 8 MiB)
    debug_step_delay_s: float = 0.0  # sleep before every engine step: tests and demos watch streams mid-way
    # While this file exists, every Generate call ends at once with FINISH_REASON_ERROR, the worker otherwise
    # healthy: tests of the gateway's circuit breakers and retry budget make a worker fail and recover.
    debug_fail_file: str | None = None
    debug_step_trace: str | None = None  # the engine process writes one line per loop pass here (JSON lines) at exit
    log_level: str = "info"

    def engine_config(self) -> EngineConfig:
        """The engine's part of this configuration."""
        return EngineConfig(
            model_path=self.model,
            load_format=self.load_format,
            served_model_name=self.served_model_name,
            dtype=self.dtype,
            quantization=self.quantization,
            fp8_scheme=self.fp8_scheme,
            kv_cache_dtype=self.kv_cache_dtype,
            device=self.device,
            max_context_length=self.max_context_length,
            page_size=self.page_size,
            num_pages=self.num_pages,
            kv_cache_memory_gb=self.kv_cache_memory_gb,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_waiting=self.max_waiting,
            enable_prefix_caching=self.enable_prefix_caching,
            sliding_window_kv=self.sliding_window_kv,
            attention_backend=self.attention_backend,
            cuda_graphs=self.cuda_graphs,
            pdl=self.pdl,
            tensor_parallel_size=self.tensor_parallel_size,
            seed=self.seed,
            speculative_algorithm=self.speculative_algorithm,
            num_speculative_tokens=self.num_speculative_tokens,
            speculative_draft_model=self.speculative_draft_model,
            ngram_max=self.ngram_max,
            ngram_min=self.ngram_min,
            speculative_max_batch=self.speculative_max_batch,
            speculative_adaptive=self.speculative_adaptive,
        )

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> "WorkerConfig":
        """Parse flags; a flag not given falls back to its SFLLM_* environment variable, then the default."""
        env = os.environ if env is None else env
        parser = _parser()
        args = parser.parse_args(argv)
        values = {}
        for f in fields(cls):
            value = getattr(args, f.name)
            if value is None and ENV_PREFIX + f.name.upper() in env:
                try:
                    value = _from_env(f.name, env[ENV_PREFIX + f.name.upper()])
                except ValueError as exc:
                    parser.error(f"{ENV_PREFIX}{f.name.upper()}: {exc}")
            if value is not None:
                values[f.name] = value
        return cls(**values)


_INT_OR_NONE = ("max_context_length", "num_pages")
_BOOLS = ("enable_prefix_caching", "sliding_window_kv", "cuda_graphs", "pdl", "speculative_adaptive")


def _from_env(name: str, raw: str) -> object:
    default = next(f.default for f in fields(WorkerConfig) if f.name == name)
    if name in _BOOLS:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if name in _INT_OR_NONE:
        return int(raw)
    if name in ("kv_cache_memory_gb", "debug_step_delay_s"):
        return float(raw)
    if isinstance(default, str) or default is None:
        return raw
    return type(default)(raw)


def _parser() -> argparse.ArgumentParser:
    # Every default is None so from_cli can tell "not given" from "given" and consult the environment.
    p = argparse.ArgumentParser(
        prog="sfllm-worker",
        description="Serve one model over gRPC (sfllm.v1.Worker), with health, reflection and Prometheus metrics.",
        epilog="Every flag can also be set as an environment variable, e.g. --max-num-seqs as SFLLM_MAX_NUM_SEQS.",
        argument_default=None,
    )
    d = WorkerConfig
    p.add_argument("--model", help="HF checkpoint folder or .gguf file (default: the packaged Gemma 3 270M)")
    p.add_argument("--load-format", choices=["auto", "dummy"], help="dummy: random weights (benchmarks)")
    p.add_argument("--served-model-name", help="name reported to clients (default: from the model)")
    p.add_argument("--host", help=f"gRPC bind address (default {d.host})")
    p.add_argument("--port", type=int, help=f"gRPC port (default {d.port}; 0 picks a free one)")
    p.add_argument("--metrics-host", help=f"metrics bind address (default {d.metrics_host})")
    p.add_argument("--metrics-port", type=int, help=f"Prometheus metrics port (default {d.metrics_port})")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="weights and KV dtype")
    p.add_argument(
        "--quantization",
        choices=["auto", "none", "gguf", "fp8"],
        help="gguf: serve a GGUF's quantized blocks on the CPU; fp8: float8 weights (quantized at load unless the "
        "checkpoint is FP8); none: dequantize to --dtype (auto: gguf for a GGUF on the CPU, fp8 for an FP8 checkpoint)",
    )
    p.add_argument(
        "--fp8-scheme",
        choices=["channel", "block"],
        help="how --quantization fp8 scales a dense checkpoint: a scale per output channel or per 128x128 block "
        "(default channel)",
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "fp8"],
        help="auto: the KV cache in --dtype; fp8: float8_e4m3fn, half the bytes per cached token",
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--max-context-length", type=int, help="tokens per sequence (default: the model's, capped)")
    p.add_argument("--max-num-seqs", type=int, help=f"sequences batched at once (default {d.max_num_seqs})")
    p.add_argument("--max-num-batched-tokens", type=int, help=f"tokens per step (default {d.max_num_batched_tokens})")
    p.add_argument("--max-waiting", type=int, help=f"queue bound before RESOURCE_EXHAUSTED (default {d.max_waiting})")
    p.add_argument(
        "--max-queue-time-s",
        type=float,
        help=f"refuse a request still waiting for admission after this long, and at once one that would wait "
        f"longer, with RESOURCE_EXHAUSTED (default {d.max_queue_time_s}; 0: no bound)",
    )
    p.add_argument("--page-size", type=int, help=f"KV cache page size in tokens (default {d.page_size})")
    p.add_argument("--num-pages", type=int, help="KV cache pages (default: sized from --kv-cache-memory-gb)")
    p.add_argument("--kv-cache-memory-gb", type=float, help="KV cache memory (default: 1 on CPU, 90%% free on GPU)")
    p.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_const", const=False)
    p.add_argument(
        "--no-sliding-window-kv",
        dest="sliding_window_kv",
        action="store_const",
        const=False,
        help="keep whole-context KV in sliding-window layers too (default: only their window)",
    )
    p.add_argument("--attention-backend", choices=["auto", "torch", "triton"])
    p.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_const", const=False)
    p.add_argument(
        "--no-pdl", dest="pdl", action="store_const", const=False, help="no programmatic dependent launch (Hopper)"
    )
    p.add_argument(
        "--tensor-parallel-size",
        type=int,
        help="devices one engine shards the model over, from --device on (default 1; CPU: gloo processes)",
    )
    p.add_argument("--seed", type=int, help="engine seed for unseeded sampling")
    p.add_argument(
        "--speculative-algorithm",
        choices=["ngram", "eagle3"],
        help="speculative decoding: ngram (prompt lookup) or eagle3 (a draft head, --speculative-draft-model)",
    )
    p.add_argument(
        "--speculative-draft-model", help="the EAGLE-3 draft head's checkpoint folder (SGLang / vLLM format)"
    )
    p.add_argument(
        "--num-speculative-tokens", type=int, help="drafts per sequence and step (default 8 for ngram, 4 for eagle3)"
    )
    p.add_argument("--ngram-max", type=int, help=f"longest suffix n-gram looked up (default {d.ngram_max})")
    p.add_argument("--ngram-min", type=int, help=f"shortest suffix n-gram looked up (default {d.ngram_min})")
    p.add_argument(
        "--speculative-max-batch",
        type=int,
        help=f"no speculation in steps with more decoding sequences (default {d.speculative_max_batch})",
    )
    p.add_argument(
        "--no-speculative-adaptive",
        dest="speculative_adaptive",
        action="store_const",
        const=False,
        help="n-gram drafts wherever found, even at batch sizes where speculating measured slower",
    )
    p.add_argument("--max-n", type=int, help=f"most completions per request (default {d.max_n})")
    p.add_argument("--max-stop-strings", type=int, help=f"most stop strings per request (default {d.max_stop_strings})")
    p.add_argument("--drain-timeout-s", type=float, help=f"SIGTERM drain limit (default {d.drain_timeout_s})")
    p.add_argument("--retry-after-ms", type=int, help="retry hint sent with RESOURCE_EXHAUSTED")
    p.add_argument(
        "--stream-interval",
        type=int,
        help=f"tokens gathered per streamed delta at least (default {d.stream_interval}: send at once)",
    )
    p.add_argument(
        "--max-message-bytes", type=int, help=f"largest Generate request accepted (default {d.max_message_bytes})"
    )
    p.add_argument("--debug-step-delay-s", type=float, help=argparse.SUPPRESS)
    p.add_argument("--debug-fail-file", help=argparse.SUPPRESS)
    p.add_argument("--debug-step-trace", help=argparse.SUPPRESS)
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    return p
