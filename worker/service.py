"""WorkerService: the sfllm.v1.Worker methods, turning gRPC requests into engine streams and back."""

import asyncio
import contextlib
import dataclasses
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from protos.sfllm.v1 import worker_pb2 as pb
from protos.sfllm.v1 import worker_pb2_grpc
from sfllm_core.errors import ContextLengthError, InvalidRequestError, QueueFullError
from sfllm_core.outputs import StepOutput, TokenLogprob
from sfllm_core.sampling_params import SamplingParams
from worker.chat_template import apply_chat_template, has_chat_template
from worker.config import WorkerConfig
from worker.detokenizer import IncrementalDetokenizer
from worker.metrics import WorkerMetrics
from worker.stop_strings import StopStringMatcher

if TYPE_CHECKING:
    from sfllm_core.engine.inference_engine import InferenceEngine

log = logging.getLogger("sfllm.worker")

# Trailing metadata keys: the offending field of an INVALID_ARGUMENT, and the retry hint of RESOURCE_EXHAUSTED.
ERROR_PARAM_KEY = "sfllm-error-param"
RETRY_AFTER_KEY = "retry-after-ms"
MAX_REQUEST_ID_LENGTH = 256

_FINISH_REASONS = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "abort": pb.FINISH_REASON_ABORT,
    "error": pb.FINISH_REASON_ERROR,
}


@dataclasses.dataclass
class _Prepared:
    """A validated request: the prompt's token ids and one SamplingParams per completion."""

    prompt_ids: list[int]
    params: list[SamplingParams]
    stops: list[str]
    skip_special_tokens: bool


@dataclasses.dataclass
class _InFlight:
    """A Generate call the worker is serving: what Abort needs to reach its engine requests."""

    engine_ids: list[str] = dataclasses.field(default_factory=list)
    aborted: bool = False


class _Choice:
    """One completion of a Generate call: detokenizes, applies stop strings and builds its responses."""

    def __init__(
        self,
        index: int,
        request_id: str,
        engine_id: str,
        tokenizer: Any,
        prepared: _Prepared,
        started_at: float,
        metrics: WorkerMetrics,
    ) -> None:
        self.index = index
        self.request_id = request_id
        self.engine_id = engine_id
        self._tokenizer = tokenizer
        self._detok = IncrementalDetokenizer(tokenizer, prepared.skip_special_tokens)
        self._stop = StopStringMatcher(prepared.stops)
        self._started_at = started_at
        self._last_token_at: float | None = None
        self._metrics = metrics
        self.num_prompt_tokens = len(prepared.prompt_ids)
        self.num_cached_tokens = 0
        self.num_tokens = 0
        self.ttft: float | None = None
        self.finish_reason: str | None = None
        self.stream: AsyncIterator[StepOutput] | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def _response(self, **event: Any) -> pb.GenerateResponse:
        return pb.GenerateResponse(request_id=self.request_id, index=self.index, **event)

    def prompt_info(self) -> pb.GenerateResponse:
        return self._response(prompt=pb.PromptInfo(num_prompt_tokens=self.num_prompt_tokens))

    def on_output(self, out: StepOutput) -> list[pb.GenerateResponse]:
        """Responses for one engine step: a delta with its new tokens, and the end if it came."""
        self.num_cached_tokens = max(self.num_cached_tokens, out.num_cached_tokens)
        token_ids: list[int] = []
        text: list[str] = []
        logprobs: list[pb.TokenLogprob] = []
        for k, token_id in enumerate(out.token_ids):
            token_ids.append(token_id)
            if out.logprobs:
                logprobs.append(self._logprob(out.logprobs[k]))
            text.append(self._stop.push(self._detok.push(token_id)))
            if self._stop.matched is not None:  # later tokens of this step belong after the stop: drop them
                break
        responses = []
        if token_ids:
            self._on_tokens(len(token_ids))
            delta = pb.Delta(token_ids=token_ids, text="".join(text), logprobs=logprobs)
            responses.append(self._response(delta=delta))
        if self._stop.matched is not None:
            responses.append(self._finish("stop", stop_string=self._stop.matched))
        elif out.finished:
            tail = self._stop.push(self._detok.flush())
            if self._stop.matched is None:
                tail += self._stop.flush()
            if tail:
                responses.append(self._response(delta=pb.Delta(text=tail)))
            if self._stop.matched is not None:
                responses.append(self._finish("stop", stop_string=self._stop.matched))
            else:
                reason = out.finish_reason or "stop"
                stop_token = {"stop_token_id": out.stop_token_id} if out.stop_token_id is not None else {}
                responses.append(self._finish(reason, error=out.error or "", **stop_token))
        return responses

    def cancelled(self) -> None:
        """Record a completion whose call went away before it finished (the engine aborts it)."""
        if not self.done:
            self.finish_reason = "abort"
            prompt, tokens = self.num_prompt_tokens, self.num_tokens
            self._metrics.observe_finished("abort", time.monotonic() - self._started_at, prompt, tokens)

    def fail(self, message: str) -> pb.GenerateResponse:
        """The end of a completion whose engine stream broke."""
        return self._finish("error", error=message)

    def _on_tokens(self, count: int) -> None:
        now = time.monotonic()
        if self._last_token_at is None:
            self.ttft = now - self._started_at
            self._metrics.observe_first_token(self.ttft)
        else:
            self._metrics.observe_inter_token(now - self._last_token_at)
        self._last_token_at = now
        self.num_tokens += count

    def _finish(self, reason: str, **fields: Any) -> pb.GenerateResponse:
        self.finish_reason = reason
        completion_tokens = self.num_tokens + (1 if fields.get("stop_token_id") is not None else 0)
        self._metrics.observe_finished(
            reason, time.monotonic() - self._started_at, self.num_prompt_tokens, completion_tokens
        )
        usage = pb.Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=completion_tokens,
            cached_prompt_tokens=self.num_cached_tokens,
        )
        return self._response(finished=pb.Finished(finish_reason=_FINISH_REASONS[reason], usage=usage, **fields))

    def _logprob(self, lp: TokenLogprob) -> pb.TokenLogprob:
        return pb.TokenLogprob(
            token_id=lp.token_id,
            token=self._tokenizer.decode([lp.token_id]),
            logprob=lp.logprob,
            top_logprobs=[pb.TopLogprob(token_id=t, token=self._tokenizer.decode([t]), logprob=v) for t, v in lp.top],
        )


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Serves one engine; answers UNAVAILABLE until `attach` and from `begin_drain` on."""

    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics) -> None:
        self._config = config
        self._metrics = metrics
        self._engine: InferenceEngine | None = None
        self._model_type = ""
        self._in_flight: dict[str, _InFlight] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    # -- lifecycle -------------------------------------------------------------------------------

    def attach(self, engine: "InferenceEngine") -> None:
        """Start serving this engine."""
        self._model_type = str(getattr(engine.model_config, "model_type", ""))
        self._engine = engine

    def begin_drain(self) -> None:
        """Refuse new Generate calls from now on; in-flight ones keep streaming."""
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no Generate call is in flight; False if the timeout came first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def abort_all(self) -> None:
        """Abort every in-flight Generate call (their streams end with FINISH_REASON_ABORT)."""
        for request_id in list(self._in_flight):
            self._abort(request_id)

    def _abort(self, request_id: str) -> bool:
        entry = self._in_flight.get(request_id)
        if entry is None:
            return False
        entry.aborted = True
        if self._engine is not None:
            for engine_id in entry.engine_ids:
                self._engine.abort(engine_id)
        return True

    # -- RPCs ------------------------------------------------------------------------------------

    async def _ready_engine(self, context: grpc.aio.ServicerContext) -> "InferenceEngine":
        if self._engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry later")
        assert self._engine is not None
        return self._engine

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        engine = await self._ready_engine(context)
        return pb.GetModelInfoResponse(
            served_model_name=engine.model_name,
            max_context_length=engine.max_context_length,
            vocab_size=engine.vocab_size,
            has_chat_template=has_chat_template(engine.tokenizer),
            model_type=self._model_type,
            eos_token_ids=sorted(engine.eos_token_ids),
        )

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        engine = await self._ready_engine(context)
        load = engine.get_load()
        response = pb.GetLoadResponse(
            num_requests_running=load.num_running,
            num_requests_waiting=load.num_waiting,
            kv_pages_used=load.kv_pages_used,
            kv_pages_total=load.kv_pages_total,
            kv_cache_usage=load.kv_cache_usage,
            num_preemptions=load.num_preemptions,
        )
        if self._config.enable_prefix_caching:
            response.prefix_cache_hit_rate = load.prefix_cache_hit_rate
        return response

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        await self._ready_engine(context)
        return pb.AbortResponse(aborted_request_ids=[rid for rid in request.request_ids if self._abort(rid)])

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine = await self._ready_engine(context)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the worker is draining; send the request elsewhere")
        started_at = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        record: dict[str, Any] = {"request_id": request_id, "status": "OK"}
        if len(request_id) > MAX_REQUEST_ID_LENGTH or request_id in self._in_flight:
            problem = "is too long" if len(request_id) > MAX_REQUEST_ID_LENGTH else "is already in flight"
            record.update(status="INVALID_ARGUMENT", error_param="request_id")
            self._log(record, started_at)
            await _abort_invalid(context, InvalidRequestError(f"request_id {problem}", "request_id"))
        entry = _InFlight()
        self._in_flight[request_id] = entry
        self._idle.clear()
        choices: list[_Choice] = []
        tasks: list[asyncio.Task] = []
        try:
            try:
                prepared = await asyncio.to_thread(self._prepare, engine, request)
                record["n"] = len(prepared.params)
                record["prompt_tokens"] = len(prepared.prompt_ids)
                choices = [
                    _Choice(
                        i,
                        request_id,
                        request_id if len(prepared.params) == 1 else f"{request_id}#{i}",
                        engine.tokenizer,
                        prepared,
                        started_at,
                        self._metrics,
                    )
                    for i in range(len(prepared.params))
                ]
                entry.engine_ids = [c.engine_id for c in choices]
                firsts = await self._start(engine, prepared, choices)
            except InvalidRequestError as exc:
                record.update(status="INVALID_ARGUMENT", error_param=exc.param)
                await _abort_invalid(context, exc)
            except QueueFullError as exc:
                record["status"] = "RESOURCE_EXHAUSTED"
                await context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    str(exc),
                    trailing_metadata=((RETRY_AFTER_KEY, str(self._config.retry_after_ms)),),
                )
            except Exception as exc:  # a bug, not the caller's fault: say so without taking the worker down
                record["status"] = "INTERNAL"
                log.exception("generate failed", extra={"fields": {"request_id": request_id}})
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")
            if entry.aborted:  # Abort arrived before the engine knew the ids
                for choice in choices:
                    engine.abort(choice.engine_id)
            for choice in choices:
                yield choice.prompt_info()
            for choice, first in zip(choices, firsts, strict=True):
                for response in choice.on_output(first):
                    yield response
            queue: asyncio.Queue[pb.GenerateResponse | None] = asyncio.Queue()
            tasks = [asyncio.create_task(self._pump(c, queue)) for c in choices if not c.done]
            for choice in choices:
                if choice.done and choice.stream is not None:
                    await _close(choice.stream)
            remaining = len(tasks)
            while remaining:
                response = await queue.get()
                if response is None:
                    remaining -= 1
                else:
                    yield response
        except asyncio.CancelledError:
            record["status"] = "CANCELLED"
            raise
        finally:
            for task in tasks:
                task.cancel()
            # Wait for the engine streams to close, which aborts their requests and frees their pages.
            await asyncio.gather(*tasks, return_exceptions=True)
            for choice in choices:
                if choice.stream is not None:
                    await _close(choice.stream)
            del self._in_flight[request_id]
            if not self._in_flight:
                self._idle.set()
            if choices and record["status"] == "OK" and not all(c.done for c in choices):
                record["status"] = "CANCELLED"
            if record["status"] == "CANCELLED":
                for choice in choices:
                    choice.cancelled()
            self._log(record, started_at, choices)

    # -- helpers ---------------------------------------------------------------------------------

    async def _start(self, engine: "InferenceEngine", prepared: _Prepared, choices: list[_Choice]) -> list[StepOutput]:
        """Submit every completion and wait for each one's first output.

        The engine validates and queues a request before its first output, so waiting here means a
        refused request gets its error status before any response message was sent.
        """
        for choice, params in zip(choices, prepared.params, strict=True):
            choice.stream = engine.stream(prepared.prompt_ids, params, request_id=choice.engine_id)
        pending = {asyncio.ensure_future(anext(c.stream)): c for c in choices}  # type: ignore[arg-type]
        firsts: dict[int, StepOutput] = {}
        try:
            while pending:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    choice = pending.pop(future)
                    firsts[choice.index] = future.result()  # raises the engine's refusal, if any
        finally:
            for future in pending:
                future.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        return [firsts[c.index] for c in choices]

    async def _pump(self, choice: _Choice, queue: "asyncio.Queue[pb.GenerateResponse | None]") -> None:
        """Move one completion's engine outputs into the call's response queue until it finishes."""
        assert choice.stream is not None
        try:
            async for out in choice.stream:
                for response in choice.on_output(out):
                    queue.put_nowait(response)
                if choice.done:
                    break
            if not choice.done:
                queue.put_nowait(choice.fail("the engine stream ended without a finish"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an engine fault ends this completion, not the worker
            log.exception("engine stream failed", extra={"fields": {"request_id": choice.request_id}})
            queue.put_nowait(choice.fail(f"engine error: {exc}"))
        finally:
            await _close(choice.stream)
            queue.put_nowait(None)

    def _prepare(self, engine: "InferenceEngine", request: pb.GenerateRequest) -> _Prepared:
        """Tokenize the prompt and validate every field; runs in a thread because tokenizing takes time."""
        prompt_ids = self._prompt_ids(engine, request)
        if len(prompt_ids) >= engine.max_context_length:  # not even one token of room to generate
            raise ContextLengthError(engine.max_context_length, len(prompt_ids))
        s = request.sampling
        config = self._config

        def value(name: str, default: Any) -> Any:
            return getattr(s, name) if s.HasField(name) else default

        n = value("n", 1)
        if not 1 <= n <= config.max_n:
            raise InvalidRequestError(f"n must be in [1, {config.max_n}], got {n}", "n")
        if len(s.stop) > config.max_stop_strings:
            raise InvalidRequestError(
                f"stop has {len(s.stop)} strings, more than the limit of {config.max_stop_strings}", "stop"
            )
        if any(not stop for stop in s.stop):
            raise InvalidRequestError("stop strings must not be empty", "stop")
        if value("top_logprobs", 0) != 0 and not s.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        # Unset max_tokens fills what is left of the context (and of the KV cache, for a small cache);
        # a max_tokens that is set and does not fit is the engine's to refuse, as OpenAI does.
        capacity = engine.kv_capacity_tokens
        room = min(engine.max_context_length, capacity) - len(prompt_ids)
        # A prompt that leaves no room gets the engine's own error (context length or KV capacity).
        max_tokens = value("max_tokens", max(room, 1))
        base = SamplingParams(
            max_tokens=max_tokens,
            temperature=value("temperature", 1.0),
            top_p=value("top_p", 1.0),
            top_k=value("top_k", -1),
            min_p=value("min_p", 0.0),
            seed=value("seed", None),
            repetition_penalty=value("repetition_penalty", 1.0),
            presence_penalty=value("presence_penalty", 0.0),
            frequency_penalty=value("frequency_penalty", 0.0),
            stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            logprobs=s.logprobs,
            top_logprobs=value("top_logprobs", 0),
        )
        params = []
        for i in range(n):
            seed = None if base.seed is None else base.seed + i
            p = dataclasses.replace(base, seed=seed, stop_token_ids=list(base.stop_token_ids))
            p.validate(engine.vocab_size)
            params.append(p)
        return _Prepared(prompt_ids, params, list(s.stop), value("skip_special_tokens", True))

    def _prompt_ids(self, engine: "InferenceEngine", request: pb.GenerateRequest) -> list[int]:
        kind = request.WhichOneof("input")
        if kind == "text":
            if not request.HasField("add_special_tokens") or request.add_special_tokens:
                ids = engine.encode(request.text)
            else:
                ids = list(engine.tokenizer.encode(request.text, add_special_tokens=False))
            if not ids:
                raise InvalidRequestError("text is empty (no tokens to start from)", "text")
            return ids
        if kind == "chat":
            messages = [(m.role, m.content) for m in request.chat.messages]
            return apply_chat_template(engine.tokenizer, messages)
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            if not ids:
                raise InvalidRequestError("token_ids.ids must not be empty", "token_ids")
            vocab = engine.vocab_size
            bad = next((t for t in ids if not 0 <= t < vocab), None)
            if bad is not None:
                raise InvalidRequestError(f"token_ids contains {bad}, outside the vocabulary [0, {vocab})", "token_ids")
            return ids
        raise InvalidRequestError("input is required: set one of text, chat or token_ids", "input")

    def _log(self, record: dict[str, Any], started_at: float, choices: Sequence[_Choice] = ()) -> None:
        """The one info line per Generate call; never the prompt or output text."""
        if choices:
            record["completion_tokens"] = sum(c.num_tokens for c in choices)
            reasons = [c.finish_reason or "none" for c in choices]
            record["finish_reason"] = reasons[0] if len(reasons) == 1 else ",".join(reasons)
            ttfts = [c.ttft for c in choices if c.ttft is not None]
            if ttfts:
                record["ttft_s"] = round(min(ttfts), 4)
        record["latency_s"] = round(time.monotonic() - started_at, 4)
        log.info("generate", extra={"fields": record})


async def _abort_invalid(context: grpc.aio.ServicerContext, exc: InvalidRequestError) -> None:
    metadata = ((ERROR_PARAM_KEY, exc.param),) if exc.param else ()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message, trailing_metadata=metadata)


async def _close(stream: AsyncIterator[StepOutput]) -> None:
    """Close an engine stream (aborting its request if it still runs); closing twice is harmless."""
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(RuntimeError):  # "already running" when its own task is mid-close
            await aclose()
