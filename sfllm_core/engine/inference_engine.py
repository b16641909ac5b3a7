"""InferenceEngine: requests in, tokens out; offline `generate`, asyncio `stream`, thread-safe `abort`."""

import contextlib
import functools
import logging
import os
import threading
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import FIRST_COMPLETED, Future
from concurrent.futures import wait as wait_for_futures
from dataclasses import asdict, dataclass, replace

import torch

from sfllm_core.config import EngineConfig
from sfllm_core.distributed.parallel_state import (
    TensorParallel,
    destroy_tensor_parallel,
    is_tensor_parallel_initialized,
    shard_slices,
)
from sfllm_core.engine.engine_loop import EngineLoop
from sfllm_core.engine.grammar import GrammarBackend, accept_tokens
from sfllm_core.engine.limits import EngineLimits
from sfllm_core.engine.memory_pool import MemoryPool
from sfllm_core.engine.model_runner import ModelRunner
from sfllm_core.engine.ranks import Followers, RankSetup, join_group
from sfllm_core.engine.request_sequence import PENDING_TOKEN, RequestSequence, SequenceStatus
from sfllm_core.engine.scheduler import ScheduledBatch, Scheduler, window_pages_per_seq
from sfllm_core.engine.speculative import DraftProposer, SpeculationGate, accepted_length, sample_rows
from sfllm_core.errors import InvalidRequestError, QueueFullError
from sfllm_core.layers.attention import AttentionBackend, TorchPagedAttention
from sfllm_core.layers.linear import install_quantized_weights
from sfllm_core.layers.sampler import Sampler
from sfllm_core.models.common import assign_weights, sliding_windows, uninitialized_parameters
from sfllm_core.models.loader import (
    default_eos_token_ids,
    encode_prompt,
    load_model_config,
    load_tokenizer,
    load_weights,
    resolve_model_path,
    resolve_quantization,
    served_model_name,
)
from sfllm_core.models.registry import model_class
from sfllm_core.outputs import EngineLoad, GenerationOutput, StepOutput
from sfllm_core.sampling_params import SamplingParams

logger = logging.getLogger("sfllm.engine")

DEFAULT_MAX_CONTEXT = 8192
# While only grammars compile, a step waits this long for one (instead of spinning on an empty batch).
GRAMMAR_WAIT_S = 0.01


class InferenceEngine:
    """Hosts one model: loads it, schedules requests, runs steps, streams results.

    Offline use calls `generate` from one thread. `stream` serves asyncio callers in-process:
    the first call starts an EngineLoop (engine/engine_loop.py), a background thread that runs
    steps while there is work. A server may instead drive `submit`, `abort` and `step` itself
    (the worker's engine process does). Either way, every request ends with exactly one finished
    StepOutput and gives back all of its KV pages.
    """

    def __init__(
        self,
        model_path: str | None = None,
        dtype: str = "auto",
        max_context_length: int | None = None,
        *,
        config: EngineConfig | None = None,
        hf_config=None,
        rank_setup: RankSetup | None = None,
        **overrides,
    ) -> None:
        if config is None:
            config = EngineConfig(model_path=model_path, dtype=dtype, max_context_length=max_context_length)
        self.config = config = replace(config, **overrides)
        config.validate()
        self.device = config.resolved_device()
        self.dtype = config.resolved_dtype()
        start = time.perf_counter()

        # hf_config without a path builds a model with random weights (benchmarks of real shapes).
        path = None if hf_config is not None and config.model_path is None else resolve_model_path(config.model_path)
        self.model_config = hf_config if hf_config is not None else load_model_config(path)
        self.model_name = config.served_model_name or served_model_name(config.model_path, path)
        self.tokenizer = load_tokenizer(path) if path is not None and config.load_tokenizer else None
        self.vocab_size = self.model_config.vocab_size
        self.eos_token_ids = set(default_eos_token_ids(self.model_config, self.tokenizer))
        self.attention_backend = self._backend_choice()
        # Tensor parallel: this is rank 0 (rank_setup None; it starts the others) or a follower.
        self.exit_on_rank_failure = False
        self.tp, self._followers = self._init_tensor_parallel(rank_setup, hf_config, path)
        self.model = self._build_model(path)
        if self.device.type == "cpu" and self.dtype == torch.float32:
            # The CPU kernels build on their first use (~20 s each, once; torch caches them): here,
            # before the engine says it is ready, rather than inside somebody's first request.
            from sfllm_core.kernels import cpu_decode_attention, cpu_norm_rope

            cpu_norm_rope.available()
            cpu_decode_attention.available()
        self.draft_config = None  # an EAGLE-3 head's, read before the pool: its K/V share the budget
        if config.speculative_algorithm == "eagle3":
            from sfllm_core.models.eagle3 import load_eagle3_config

            self.draft_config = load_eagle3_config(resolve_model_path(config.speculative_draft_model))

        model_max = self.model_config.max_position_embeddings
        self.max_context_length = min(config.max_context_length or min(model_max, DEFAULT_MAX_CONTEXT), model_max)
        self.pool = self._build_pool()
        self.scheduler = Scheduler(
            self.pool, config.max_num_seqs, config.max_num_batched_tokens, self.max_context_length
        )
        graph_batch = min(config.cuda_graph_max_batch, config.max_num_seqs) if config.cuda_graphs else 0
        prefill_tokens = min(config.prefill_graph_max_tokens, config.max_num_batched_tokens) if graph_batch else 0
        self.runner = ModelRunner(
            self.model,
            self.pool,
            self._build_backend(),
            self.device,
            self.max_context_length,
            graph_batch,
            prefill_tokens,
        )
        if self.tp is not None:  # from now on every step goes to the other ranks too (engine/ranks.py)
            self.runner.use_tensor_parallel(self.tp, self._followers)
        self.sampler = Sampler(config.seed)
        self.aux_layers: tuple[int, ...] = ()  # the target layers an EAGLE-3 head reads (set with it)
        self.proposer = self._build_proposer()
        adaptive = config.speculative_algorithm == "ngram" and config.speculative_adaptive
        self.gate = SpeculationGate() if adaptive else None
        self._step_start, self._step_tokens = 0.0, 0  # the step the gate times, and its tokens
        if self.proposer is not None and self.runner.graphs is not None:
            # Eager verify steps launch every kernel from the host: at batch 1 that costs what the drafts save.
            k = config.resolved_num_speculative_tokens()
            self.runner.enable_verify_graphs(k + 1, min(config.speculative_max_batch, graph_batch), self.aux_layers)
            if self.aux_layers:  # the EAGLE-3 head's drafting passes too
                self.proposer.enable_graphs(
                    min(config.speculative_max_batch, graph_batch), self.pool.max_pages_per_seq, self.max_context_length
                )
        self._aux_step = False  # this step reads the target's hidden states out for the EAGLE-3 head
        self.limits = EngineLimits(self.vocab_size, self.max_context_length, self.pool.page_size, self.pool.num_pages)
        self.grammar = GrammarBackend(self.vocab_size, self.tokenizer)

        self._seqs: dict[str, RequestSequence] = {}
        # Constrained sequences whose grammar is compiling: they reach the scheduler once it is done.
        self._grammar_queue: list[tuple[RequestSequence, Future]] = []
        self._inbox: list[tuple[str, object]] = []
        self._cv = threading.Condition()
        self._woken = False
        self._loop: EngineLoop | None = None
        self._pending: _PendingStep | None = None
        self.num_overlapped_steps = 0  # decode steps launched before the previous one was read
        self._token_buffers: list[torch.Tensor] = []  # page-locked, for reading sampled ids back
        logger.info(
            "engine ready: model=%s device=%s dtype=%s context=%d kv_pages=%d page_size=%d load_s=%.1f",
            self.model_name,
            self.device,
            self.dtype,
            self.max_context_length,
            self.pool.num_pages,
            self.pool.page_size,
            time.perf_counter() - start,
        )

    # ---- construction -------------------------------------------------------------------------

    def _build_model(self, path: str | None) -> torch.nn.Module:
        cls = model_class(self.model_config)
        loading = path is not None and self.config.load_format != "dummy"
        self.quantization = "fp8" if self.config.quantization == "fp8" else "none"
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        if self.tp is not None and not loading:
            torch.manual_seed(self.config.seed)  # random weights: the replicated ones (embeddings) agree across ranks
        try:
            # A checkpoint overwrites every parameter: filling them at random first only costs time.
            with torch.device(self.device), uninitialized_parameters() if loading else contextlib.nullcontext():
                # The Triton backend's models run their norms, activations and decode GEMVs as Triton kernels.
                model = cls(self.model_config, use_triton=self.attention_backend == "triton", tp=self.tp)
        finally:
            torch.set_default_dtype(previous)
        if loading:
            tied = bool(getattr(self.model_config, "tie_word_embeddings", False))
            self.quantization = resolve_quantization(self.config.quantization, path, self.device)
            # A tensor-parallel rank reads (or keeps) only its slice of each sharded tensor.
            slices = shard_slices(model) if self.tp is not None else None
            weights = load_weights(path, self.dtype, quantization=self.quantization, slices=slices)
            # Quantized weights (a GGUF's own blocks on the CPU) take their layers' place before the rest loads.
            assign_weights(model, install_quantized_weights(model, weights, tied), tied, slices)
        # Loading needs the checkpoint's separate q/k/v and gate/up tensors; serving wants one GEMM each.
        model.fuse_projections()
        if self.quantization == "fp8":
            from sfllm_core.layers.fp8 import UNQUANTIZED, quantize_linears

            # Dense projections (a bfloat16 checkpoint, random weights) become FP8 here, merged ones
            # whole; a pre-quantized checkpoint's came as stored, on the host.
            quantize_linears(model, self.config.fp8_scheme, skip=() if self.config.fp8_lm_head else UNQUANTIZED)
            model.to(self.device)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the dense weights' memory, for the KV cache's budget (mem_get_info)
        return model.eval().requires_grad_(False)

    def _build_pool(self) -> MemoryPool:
        cfg, mc = self.config, self.model_config
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        # A tensor-parallel rank holds its KV heads only (one, replicated, when there are fewer than ranks).
        num_kv_heads = mc.num_key_value_heads if self.tp is None else self.tp.kv_head_shard(mc.num_key_value_heads)[1]
        windows = sliding_windows(mc)
        window_layers = frozenset(i for i, w in enumerate(windows) if w is not None)
        window = next((w for w in windows if w is not None), None)
        # A window group needs one window size and at least one full layer to keep the page table.
        if (
            not cfg.sliding_window_kv
            or len({w for w in windows if w is not None}) != 1
            or len(window_layers) == len(windows)
        ):
            window_layers, window = frozenset(), None
        kv_dtype = cfg.resolved_kv_cache_dtype()
        bytes_per_token = functools.partial(
            MemoryPool.bytes_per_token, num_kv_heads=num_kv_heads, head_dim=head_dim, dtype=kv_dtype
        )
        full_bpt = bytes_per_token(mc.num_hidden_layers - len(window_layers))
        if self.draft_config is not None:  # the EAGLE-3 head's layer keeps K/V in the same slots
            dc = self.draft_config
            full_bpt += MemoryPool.bytes_per_token(
                1,
                dc.num_key_value_heads,
                getattr(dc, "head_dim", None) or dc.hidden_size // dc.num_attention_heads,
                kv_dtype,
            )
        window_bpt = bytes_per_token(len(window_layers))
        pages_per_seq = -(-self.max_context_length // cfg.page_size)
        # Window pages for max_num_seqs sequences each at its most (a window plus a chunk) suffice.
        window_cap = cfg.max_num_seqs * window_pages_per_seq(window, cfg.page_size) if window else 0
        if cfg.num_pages is not None:
            num_pages = cfg.num_pages
        else:
            if cfg.kv_cache_memory_gb is not None:
                budget = cfg.kv_cache_memory_gb * 1e9
            elif self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                budget = free * 0.8
            else:
                budget = 1e9
            num_pages = int(budget // ((full_bpt + window_bpt) * cfg.page_size))
            if window and window_cap < num_pages:
                num_pages = int((budget - window_cap * cfg.page_size * window_bpt) // (full_bpt * cfg.page_size))
            # More than every slot full at full context is never useful.
            num_pages = min(num_pages, pages_per_seq * cfg.max_num_seqs)
            if self.tp is not None:  # every rank's pool has the same pages: page ids come from rank 0
                num_pages = self.tp.min_int(num_pages)
        if num_pages < 1:
            raise InvalidRequestError("the KV cache budget holds no page; raise kv_cache_memory_gb", "num_pages")
        return MemoryPool(
            num_pages,
            cfg.page_size,
            mc.num_hidden_layers,
            num_kv_heads,
            head_dim,
            kv_dtype,
            self.device,
            cfg.enable_prefix_caching,
            window=window,
            window_layers=window_layers,
            # As many as the full group has also always suffice: a sequence holds at most one
            # companion per page.
            num_window_pages=min(num_pages, window_cap),
            max_pages_per_seq=pages_per_seq,
        )

    def _build_proposer(self) -> DraftProposer | None:
        """The configured draft proposer, or None when speculation is off."""
        config = self.config
        if config.speculative_algorithm is None:
            return None
        if config.speculative_algorithm == "ngram":
            from sfllm_core.engine.ngram import NgramProposer

            return NgramProposer(config.resolved_num_speculative_tokens(), config.ngram_max, config.ngram_min)
        if config.speculative_algorithm == "eagle3":
            return self._build_eagle3()
        raise ValueError(f"unknown speculative algorithm {config.speculative_algorithm!r}")

    def _build_eagle3(self) -> DraftProposer:
        """The EAGLE-3 proposer: its head loaded (random with load_format dummy), the target told
        which layers' hidden states to hand out."""
        from sfllm_core.engine.eagle3 import Eagle3Proposer
        from sfllm_core.models.eagle3 import Eagle3DraftModel, aux_layers_of, load_eagle3_weights

        config, mc = self.config, self.model_config
        dummy = config.load_format == "dummy"
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device), contextlib.nullcontext() if dummy else uninitialized_parameters():
                head = Eagle3DraftModel(
                    self.draft_config,
                    mc.hidden_size,
                    self.max_context_length,
                    use_triton=self.attention_backend == "triton",
                )
        finally:
            torch.set_default_dtype(previous)
        embedding = self.model.model.embed_tokens
        if dummy:
            head.embed_tokens = embedding
        else:
            load_eagle3_weights(head, resolve_model_path(config.speculative_draft_model), embedding, self.dtype)
        head.fuse_projections()
        head = head.eval().requires_grad_(False)
        self.aux_layers = aux_layers_of(self.draft_config, mc.num_hidden_layers)
        num_slots = (self.pool.num_pages + 1) * self.pool.page_size
        return Eagle3Proposer(
            config.resolved_num_speculative_tokens(), head, self.runner.backend, num_slots, self.pool.page_size,
            self.device, self.dtype,
        )  # fmt: skip

    def _backend_choice(self) -> str:
        """The attention backend by name ("triton" or "torch"): auto means Triton on CUDA."""
        choice = self.config.attention_backend
        if choice == "auto":
            choice = "triton" if self.device.type == "cuda" else "torch"
        return choice

    def _build_backend(self) -> AttentionBackend:
        if self.attention_backend == "triton":
            from sfllm_core.kernels.pdl import set_pdl
            from sfllm_core.layers.triton_attention import TritonAttention

            set_pdl(self.config.pdl)  # before any kernel launches, so that graph capture sees it

            return TritonAttention(max_context_length=self.max_context_length)
        return TorchPagedAttention()

    # ---- requests -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Tokenize a prompt; a leading bos is added unless the text already starts with it."""
        if self.tokenizer is None:
            raise InvalidRequestError("this engine has no tokenizer; pass token ids", "prompt")
        return encode_prompt(self.tokenizer, text)

    def make_sequence(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, continuation: list[int] | None = None
    ) -> RequestSequence:
        """Validate a request; raises InvalidRequestError (or ContextLengthError) naming the field.

        A continuation is output already generated for this prompt (elsewhere): the sequence goes on from it.
        """
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams", "params")
        token_ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.limits.check(token_ids, params)
        if continuation:
            self.limits.check_continuation(continuation, params)
        if params.constraint is not None and not self.grammar.has_tokenizer:
            raise InvalidRequestError("constrained decoding needs a tokenizer, and this engine has none", "constraint")
        return RequestSequence(request_id, token_ids, params, continuation or ())

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        """Validate and queue a request (thread-safe); it runs on the next step."""
        self.submit(self.make_sequence(request_id, prompt, params))

    def submit(self, seq: RequestSequence) -> None:
        """Queue a validated sequence (thread-safe); raises QueueFullError past max_waiting."""
        with self._cv:
            pending = sum(1 for kind, _ in self._inbox if kind == "add") + len(self._grammar_queue)
            if len(self.scheduler.waiting) + pending >= self.config.max_waiting:
                raise QueueFullError(self.config.max_waiting)
            if seq.request_id in self._seqs or any(
                kind == "add" and s.request_id == seq.request_id for kind, s in self._inbox
            ):
                raise InvalidRequestError(f"request id {seq.request_id!r} is already in use", "request_id")
            self._inbox.append(("add", seq))
            self._cv.notify()

    def abort(self, request_id: str) -> None:
        """Stop a request wherever it is (thread-safe); it ends with finish_reason "abort"."""
        with self._cv:
            self._inbox.append(("abort", request_id))
            self._cv.notify()

    def _drain_inbox(self) -> list[StepOutput]:
        with self._cv:
            inbox, self._inbox = self._inbox, []
        outputs = []
        for kind, item in inbox:
            if kind == "add":
                self._seqs[item.request_id] = item
                if item.params.constraint is not None:
                    future = self.grammar.compile(item.params.constraint, self.eos_token_ids)
                    self._grammar_queue.append((item, future))
                else:
                    self.scheduler.add(item)
            else:
                seq = self._seqs.get(item)
                if seq is not None:
                    self._finish(seq, "abort")
                    outputs.append(self._output(seq, [], None, finished=True))
        return outputs

    def _admit_constrained(self) -> list[StepOutput]:
        """Hand the sequences whose grammar has compiled to the scheduler, each with its matcher."""
        if not self.scheduler.has_work() and self._pending is None:  # nothing else to do meanwhile
            wait_for_futures([f for _, f in self._grammar_queue], GRAMMAR_WAIT_S, FIRST_COMPLETED)
        outputs, waiting = [], []
        for seq, future in self._grammar_queue:
            if seq.is_finished:  # aborted while compiling
                continue
            if not future.done():
                waiting.append((seq, future))
                continue
            exc = future.exception()
            if exc is not None:
                self._finish(seq, "error")
                error = f"the constraint failed to compile: {type(exc).__name__}: {exc}"
                outputs.append(self._output(seq, [], None, finished=True, error=error))
                continue
            seq.grammar = self.grammar.matcher(future.result(), self.eos_token_ids)
            for token in seq.output_token_ids:  # a continuation: the matcher starts where its output ends
                if seq.grammar.rejected is None:
                    accept_tokens([seq.grammar], [token])
            if seq.grammar.rejected is not None:
                error = f"the constraint does not accept the continuation's token {seq.grammar.rejected}"
                self._finish(seq, "error")
                outputs.append(self._output(seq, [], None, finished=True, error=error))
                continue
            self.scheduler.add(seq)
        self._grammar_queue = waiting
        return outputs

    def use_tokenizer_file(self, path: str) -> None:
        """Where the tokenizer (one tokenizer.json) of an engine built without one is: constrained
        decoding reads its vocabulary from there, on the first constrained request."""
        self.grammar.use_tokenizer_file(path)

    def add_eos_token_ids(self, token_ids: list[int]) -> None:
        """More ids that end generation (a server's tokenizer's eos and end-of-turn tokens); thread-safe."""
        with self._cv:
            self.eos_token_ids = self.eos_token_ids | set(token_ids)

    def has_work(self) -> bool:
        with self._cv:
            return (
                bool(self._inbox) or self.scheduler.has_work() or self._pending is not None or bool(self._grammar_queue)
            )

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until there is work (True), or until `wake` or the timeout (False)."""
        with self._cv:
            if not self._cv.wait_for(lambda: self._woken or self.has_work(), timeout):
                return False
            woken, self._woken = self._woken, False
            return not woken or self.has_work()

    def wake(self) -> None:
        """Make a `wait_for_work` in another thread return now."""
        with self._cv:
            self._woken = True
            self._cv.notify_all()

    def abort_all(self) -> list[StepOutput]:
        """End every queued and running request with "abort" (call only where no step runs); their outputs."""
        outputs = self._drain_inbox()
        if self._pending is not None:
            outputs += self._resolve(self._pending)
            self._pending = None
        for seq in list(self._seqs.values()):
            self._finish(seq, "abort")
            outputs.append(self._output(seq, [], None, finished=True))
        self._grammar_queue = []
        return outputs

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache holds in all: no request may need more."""
        return self.limits.kv_capacity_tokens

    def get_load(self) -> EngineLoad:
        proposer = self.proposer
        return EngineLoad(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting)
            + len(self._grammar_queue)
            + sum(1 for k, _ in list(self._inbox) if k == "add"),
            kv_pages_used=self.pool.num_used_pages,
            kv_pages_total=self.pool.num_pages,
            prefix_cache_hit_rate=self.pool.prefix_hit_rate,
            num_preemptions=self.scheduler.num_preemptions,
            num_draft_tokens=proposer.num_draft_tokens if proposer is not None else 0,
            num_accepted_draft_tokens=proposer.num_accepted_tokens if proposer is not None else 0,
            num_drafts=proposer.num_proposals if proposer is not None else 0,
        )

    # ---- the step -----------------------------------------------------------------------------

    def step(self) -> list[StepOutput]:
        """Admit queued requests, run one forward pass, sample, and report what changed.

        Pure decode steps that replay a CUDA graph are overlapped: the step's sampled ids stay on
        the GPU and feed the next step directly, and the host reads them (finish checks, outputs)
        while that next step runs. Every other step first settles what is pending.
        """
        if self.gate is None:
            return self._step()
        self._step_start = time.perf_counter()
        self.gate.record(self._step_start, self._step_tokens)
        outputs = self._step()
        self._step_tokens = sum(len(o.token_ids) for o in outputs)
        if not self.scheduler.running:  # what comes next may be a wait for requests, not a step
            self.gate.drop()
        return outputs

    def _step(self) -> list[StepOutput]:
        outputs = self._drain_inbox()
        if self._grammar_queue:
            outputs += self._admit_constrained()
        if self.proposer is not None:
            outputs += self._propose()
        batch = self.scheduler.schedule()
        pending, self._pending = self._pending, None
        aux = self._aux_step
        if aux and batch.seqs:
            try:  # the EAGLE-3 head drafts now that the verify step has its pages
                self.proposer.fill_drafts(batch.seqs)
            except Exception as exc:
                return outputs + self._fail(batch, exc)
        if any(s.draft_ids for s in batch.seqs):
            assert pending is None, "drafts are proposed only once every token is read"
            return outputs + self._verify(batch)
        if (
            batch.seqs
            and not aux
            and self.runner.graph_fits(batch)
            and not any(self.sampler.needs_host(s) for s in batch.seqs)
        ):
            return outputs + self._launch_overlapped(batch, pending)
        if pending is not None:
            outputs += self._resolve(pending)
            kept = [(s, n) for s, n in zip(batch.seqs, batch.num_new_tokens) if not s.is_finished]
            batch = ScheduledBatch([s for s, _ in kept], [n for _, n in kept])
        if not batch.seqs:
            return outputs
        try:
            if aux:
                logits, rows, hidden, starts = self.runner.execute_aux(batch, self.aux_layers)
            else:
                logits, rows = self.runner.execute(batch)
            self.scheduler.commit(batch)
            sampled = [batch.seqs[r] for r in rows]
            tokens, logprobs = self.sampler(logits, sampled) if sampled else ([], [])
        except Exception as exc:  # a failed step ends its batch, never the engine
            return outputs + self._fail(batch, exc)
        for seq, token, logprob in zip(sampled, tokens, logprobs):
            seq.token_ids.append(token)
            outputs.append(self._accept_tokens(seq, seq.num_tokens - 1, [logprob]))
        if aux:
            outputs += self._catch_up(batch, hidden, starts)
        return outputs

    # ---- speculative decoding -----------------------------------------------------------------

    def _propose(self) -> list[StepOutput]:
        """Give decoding sequences drafts for this step (speculative decoding; see engine/speculative.py).

        Proposing reads every token, so a step launched ahead is settled first, but only when some
        sequence is due a proposal: one the proposer keeps missing is skipped for a while, and a
        batch with more decoding sequences than speculative_max_batch is left alone, as is one of a
        size where the gate (SpeculationGate) measured drafts costing more per token than plain steps.
        """
        decoding = [
            s
            for s in self.scheduler.running
            if s.params.constraint is None and s.num_computed_tokens + 1 == s.num_tokens
        ]
        self._aux_step = False
        if len(decoding) > self.config.speculative_max_batch:
            return []
        if self.gate is not None and decoding and not self.gate.allow(len(decoding), self._step_start):
            return []  # drafts have cost more than they saved at this batch size lately
        outputs = []
        if self.aux_layers:
            # An EAGLE-3 head's step: the target hands out its hidden states, so it runs eagerly
            # or from verify graphs, never overlapped; prefill-only steps too (the head reads the prompt).
            self._aux_step = True
            if self._pending is not None:
                outputs = self._resolve(self._pending)
                self._pending = None
        due = [s for s in decoding if self.proposer.wants(s)]
        if not due:
            return outputs
        if self._pending is not None:
            outputs = self._resolve(self._pending)
            self._pending = None
        for seq in due:
            if seq.is_finished:
                continue
            # Never past max_tokens (the verified step adds one token more than it accepts) or the context.
            limit = min(
                seq.params.max_tokens - (seq.num_tokens - seq.num_prompt_tokens) - 1,
                self.max_context_length - seq.num_tokens,
            )
            seq.draft_ids = self.proposer.propose(seq, limit)
        return outputs

    def _verify(self, batch: ScheduledBatch) -> list[StepOutput]:
        """A step where some sequences feed drafts: sample every row, keep each sequence's drafts
        while they match, give back the pages of the rest, and report every kept token."""
        aux = self._aux_step
        try:
            if aux:
                logits, rows, hidden, starts = self.runner.execute_aux(batch, self.aux_layers)
            else:
                logits, rows = self.runner.execute(batch)
            sampled = [batch.seqs[r] for r in rows]
            # Greedy sequences (a draft row samples as its sequence does) skip the rows' objects.
            tokens = self.sampler.greedy(logits, sampled) if sampled else []
            if tokens is not None:
                logprobs = [None] * len(tokens)
            else:
                tokens, logprobs = self.sampler(logits, sample_rows(sampled))
        except Exception as exc:
            return self._fail(batch, exc)
        settled = []
        offset = 0
        for r in rows:
            seq = batch.seqs[r]
            drafts = seq.draft_ids
            m = len(drafts)
            got = tokens[offset : offset + m + 1]
            accepted = accepted_length(drafts, got) if m else 0
            settled.append((seq, seq.num_tokens, logprobs[offset : offset + accepted + 1]))
            offset += m + 1
            seq.token_ids += got[: accepted + 1]
            if m:
                self.proposer.observe(seq, m, accepted)
                seq.num_accepted_drafts += accepted
                seq.draft_ids = []
                batch.num_new_tokens[r] = 1 + accepted  # the K/V kept: the last token's and the accepted drafts'
                self.pool.truncate(seq, seq.num_tokens)  # rejected drafts' pages go back
        self.scheduler.commit(batch)
        outputs = [self._accept_tokens(seq, first, lps) for seq, first, lps in settled]
        if aux:
            outputs += self._catch_up(batch, hidden, starts)
        return outputs

    def _catch_up(self, batch: ScheduledBatch, hidden: torch.Tensor, starts: list[int]) -> list[StepOutput]:
        """Feed the EAGLE-3 head the rows of a committed aux step that its sequences kept (after
        rejections: the last token and the accepted drafts), with the target's hidden states."""
        entries = []
        for seq, n, start in zip(batch.seqs, batch.num_new_tokens, starts):
            if seq.is_finished or seq.params.constraint is not None:
                continue
            entries.append((seq, seq.num_computed_tokens - n, hidden[start : start + n]))
        try:
            self.proposer.catch_up(entries)
        except Exception as exc:
            return self._fail([e[0] for e in entries], exc)
        return []

    def _launch_overlapped(self, batch: ScheduledBatch, pending: "_PendingStep | None") -> list[StepOutput]:
        try:
            rows = {id(s): i for i, s in enumerate(pending.seqs)} if pending is not None else None
            logits, _ = self.runner.execute(batch, pending.tokens if pending else None, rows)
            self.scheduler.commit(batch)
            tokens = self.sampler.select(logits, batch.seqs)
            if len(self._token_buffers) < 2:
                size = self.runner.graphs.sizes[-1]
                self._token_buffers = [torch.empty(size, dtype=torch.int64, pin_memory=True) for _ in range(2)]
            # Alternate buffers: the other one may still be read by the step being resolved below.
            host = self._token_buffers[0 if pending is None or pending.host is self._token_buffers[1] else 1]
            host[: len(batch.seqs)].copy_(tokens, non_blocking=True)
            # Logprobs ride along: gathered on the device, copied with the ids, read one step late.
            found = self.sampler.gather_logprobs(logits, batch.seqs, tokens)
            if found is not None:
                # Into page-locked memory: a copy to pageable memory would wait for the step to end.
                found = tuple(
                    torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in found
                )
            ready = torch.cuda.Event()
            ready.record()
        except Exception as exc:
            outputs = self._resolve(pending) if pending is not None else []
            return outputs + self._fail([s for s in batch.seqs if not s.is_finished], exc)
        positions = []
        for seq in batch.seqs:
            positions.append(seq.num_tokens)
            seq.token_ids.append(PENDING_TOKEN)
        self._pending = _PendingStep(batch.seqs, positions, tokens, host, ready, found)
        self.num_overlapped_steps += 1
        return self._resolve(pending) if pending is not None else []

    def _resolve(self, pending: "_PendingStep") -> list[StepOutput]:
        """Read a launched step's sampled ids and settle its sequences."""
        pending.ready.synchronize()
        tokens = pending.host[: len(pending.seqs)].tolist()
        logprobs = [None] * len(tokens)
        if pending.logprobs is not None:
            logprobs = self.sampler.build_logprobs(pending.seqs, tokens, *(t.tolist() for t in pending.logprobs))
        outputs = []
        for seq, position, token, logprob in zip(pending.seqs, pending.positions, tokens, logprobs):
            if seq.is_finished:  # aborted, or ended by the step before
                continue
            seq.token_ids[position] = token
            outputs.append(self._accept_tokens(seq, position, [logprob]))
        return outputs

    def _fail(self, seqs, exc: Exception) -> list[StepOutput]:
        seqs = list(seqs.seqs if isinstance(seqs, ScheduledBatch) else seqs)
        logger.exception("step failed; ending %d requests of its batch", len(seqs))
        outputs = []
        for seq in seqs:
            self._finish(seq, "error")
            outputs.append(self._output(seq, [], None, finished=True, error=f"{type(exc).__name__}: {exc}"))
        return outputs

    def _accept_tokens(self, seq: RequestSequence, first: int, logprobs: list) -> StepOutput:
        """Check the tokens now at first, first + 1, ... (one per logprob entry) for the end of the
        request, one by one; the output carries those before the end, and later ones are dropped."""
        params = seq.params
        grammar = seq.grammar
        tokens: list[int] = []
        kept: list = []
        for position in range(first, first + len(logprobs)):
            token = seq.token_ids[position]
            logprob = logprobs[position - first]
            if grammar is not None and grammar.rejected is not None:
                del seq.token_ids[position:]
                self._finish(seq, "error")
                error = f"the grammar rejected the sampled token {token}"
                return self._output(seq, tokens, kept, finished=True, error=error)
            stop = (not params.ignore_eos and token in self.eos_token_ids) or token in params.stop_token_ids
            # A grammar that is complete and took a stop token ends the output even with ignore_eos.
            if stop or (grammar is not None and grammar.is_terminated):
                del seq.token_ids[position + 1 :]
                seq.stop_token_id = token
                self._finish(seq, "stop")
                return self._output(seq, tokens, kept, finished=True)
            if seq.logprobs is not None and logprob is not None:
                seq.logprobs.append(logprob)
            tokens.append(token)
            kept.append(logprob)
            num_out = position + 1 - seq.num_prompt_tokens
            if num_out >= params.max_tokens or position + 1 >= self.max_context_length:
                del seq.token_ids[position + 1 :]
                self._finish(seq, "length")
                return self._output(seq, tokens, kept, finished=True)
        return self._output(seq, tokens, kept)

    def _finish(self, seq: RequestSequence, reason: str) -> None:
        """End a sequence wherever it is: out of every queue, its pages and its matcher given back."""
        self._seqs.pop(seq.request_id, None)
        self.scheduler.finish(seq, reason)
        if seq.grammar is not None:
            seq.grammar.close()
            seq.grammar = None

    def _output(self, seq, tokens, logprobs, finished=False, error=None) -> StepOutput:
        return StepOutput(
            request_id=seq.request_id,
            token_ids=tokens,
            num_prompt_tokens=seq.num_prompt_tokens,
            finished=finished,
            finish_reason=seq.finish_reason if finished else None,
            stop_token_id=seq.stop_token_id if finished else None,
            logprobs=logprobs if logprobs and logprobs[0] is not None else None,
            num_cached_tokens=seq.num_cached_tokens,
            num_computed_tokens=seq.num_computed_tokens,
            error=error,
            prompt_logprobs=seq.take_prompt_logprobs(),
            num_accepted_draft_tokens=seq.num_accepted_drafts,
        )

    # ---- offline ------------------------------------------------------------------------------

    def generate(
        self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[GenerationOutput]:
        """Run prompts to completion and return their results in order (not while streaming)."""
        if self._loop is not None and self._loop.running:
            raise RuntimeError("generate() cannot run while the streaming loop owns the engine")
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise InvalidRequestError("params must be one SamplingParams or one per prompt", "params")
        seqs = [self.make_sequence(f"gen-{uuid.uuid4().hex}", p, sp) for p, sp in zip(prompts, params_list)]
        for seq in seqs:
            self.submit(seq)
        while any(s.status is not SequenceStatus.FINISHED for s in seqs):
            self.step()
        results = []
        for seq in seqs:
            out_ids = seq.output_token_ids
            if seq.stop_token_id is not None:
                out_ids = out_ids[:-1]
            text = self.tokenizer.decode(out_ids, skip_special_tokens=True) if self.tokenizer else None
            results.append(
                GenerationOutput(
                    seq.request_id,
                    seq.prompt_token_ids,
                    out_ids,
                    seq.finish_reason,
                    text,
                    seq.logprobs,
                    seq.prompt_logprobs,
                )
            )
        return results

    # ---- streaming ----------------------------------------------------------------------------

    def stream(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None
    ) -> AsyncIterator[StepOutput]:
        """Yield a request's StepOutputs from an asyncio loop (see EngineLoop.stream); closing it aborts."""
        if self._loop is None:
            self._loop = EngineLoop(self)
        return self._loop.stream(prompt, params, request_id)

    def shutdown(self) -> None:
        """Stop the streaming loop, if one runs; requests still in flight are aborted. Tensor-parallel
        ranks stop too."""
        if self._loop is not None:
            self._loop.shutdown()
        else:
            self.abort_all()
        self.grammar.shutdown()
        self.close_tensor_parallel()

    # ---- tensor parallelism ---------------------------------------------------------------------

    def _init_tensor_parallel(
        self, setup: RankSetup | None, hf_config, path: str | None
    ) -> tuple[TensorParallel | None, Followers | None]:
        """Join this engine's tensor-parallel group (rank 0 first starts the other ranks); None for size 1."""
        config, size = self.config, self.config.tensor_parallel_size
        if self.device.type == "cuda":
            rank = 0 if setup is None else setup.rank
            self.device = torch.device("cuda", (self.device.index or 0) + rank)
            torch.cuda.set_device(self.device)  # Triton launches and graph capture use the current device
        if size == 1:
            return None, None
        # What would make every rank fail later is refused before any is started.
        if is_tensor_parallel_initialized():
            raise RuntimeError("this process already holds a tensor-parallel engine; shut it down first")
        mc = self.model_config
        probe = TensorParallel(0, size, self.device)
        probe.shard(mc.num_attention_heads, "num_attention_heads")
        probe.kv_head_shard(mc.num_key_value_heads)
        probe.shard(mc.intermediate_size, "intermediate_size")
        if path is not None and self.config.load_format != "dummy":
            quantization = resolve_quantization(config.quantization, path, self.device)
            if quantization != "none":
                raise InvalidRequestError(
                    f"tensor parallelism shards dense weights only; quantization {quantization!r} is not "
                    "supported with tensor_parallel_size > 1 (use quantization none)",
                    "quantization",
                )
        followers = None
        if setup is None:
            spawn_args = {
                "config": asdict(replace(config, load_tokenizer=False)),
                "hf_config": hf_config.to_dict() if hf_config is not None else None,
                "log_level": logging.getLevelName(logger.getEffectiveLevel()),
            }
            followers = Followers(size, spawn_args, self._rank_failed)
            setup = RankSetup(0, size, followers.init_file, "")
        try:
            tp = join_group(setup, self.device)
        except Exception:
            if followers is not None:
                followers.close()
            raise
        logger.info("tensor-parallel rank %d of %d on %s", tp.rank, tp.size, self.device)
        return tp, followers

    def _rank_failed(self, message: str) -> None:
        logger.critical("%s; the engine cannot step without it", message)
        # NCCL collectives would wait for the dead rank forever; a server's engine process exits so
        # that its front reports it (worker/engine_server.py sets exit_on_rank_failure).
        if self.device.type == "cuda" or self.exit_on_rank_failure:
            os._exit(1)
        self._followers.failure = message  # steps raise from now on (gloo ones would time out)

    def close_tensor_parallel(self) -> None:
        """Stop the other ranks (rank 0) and leave the process group; idempotent."""
        if self._followers is not None:
            self._followers.close()
        if self.tp is not None:
            destroy_tensor_parallel()
            self.tp = None


@dataclass
class _PendingStep:
    """A launched decode step whose sampled ids the host has not read yet."""

    seqs: list[RequestSequence]
    positions: list[int]  # where each sequence's pending token sits in its token_ids
    tokens: torch.Tensor  # the sampled ids, on the device
    host: torch.Tensor  # page-locked copy target of `tokens`
    ready: "torch.cuda.Event"  # recorded after the copy
    logprobs: tuple[torch.Tensor, ...] | None  # Sampler.gather_logprobs' results, copied to the host
