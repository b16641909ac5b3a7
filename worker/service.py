"""WorkerService: the sfllm.v1.Worker methods, in the worker's front process.

A Generate call is tokenized and validated here, sent to the engine process as one engine request
per completion (EngineClient), and answered from the text the detokenizer process sends back.
Responses are coalesced: each carries everything a completion produced since its last one, so a
client that reads slowly gets fewer, larger deltas rather than a growing queue.
"""

import asyncio
import dataclasses
import json
import logging
import math
import os
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from protos.sfllm.v1 import worker_pb2 as pb
from protos.sfllm.v1 import worker_pb2_grpc
from protos.sfllm.v1.wire import (
    DRAINING_KEY,
    ERROR_PARAM_KEY,
    FINISH_REASONS,
    OPTIONAL_SAMPLING_FIELDS,
    RETRY_AFTER_KEY,
)
from sfllm_core.errors import ContextLengthError, InvalidRequestError
from sfllm_core.models.loader import encode_prompt
from sfllm_core.sampling_params import MAX_LOGIT_BIAS, Constraint, SamplingParams
from worker.chat_template import apply_chat_template, has_chat_template
from worker.config import WorkerConfig
from worker.engine_client import EngineClient
from worker.messages import DetokParams, EngineInfo, Rejected, TextLogprob, TextOutput
from worker.metrics import WorkerMetrics

log = logging.getLogger("sfllm.worker")

MAX_REQUEST_ID_LENGTH = 256
MAX_STOP_STRING_LENGTH = 1024  # a stop string is matched against held-back text; longer ones hold back too much
MAX_TOP_LOGPROBS = 20
# SamplingParams fields with explicit presence in the proto and the same name in both.
_OPTIONAL_SAMPLING = (*OPTIONAL_SAMPLING_FIELDS, "top_logprobs")  # same names in the proto and SamplingParams


@dataclasses.dataclass
class _Prepared:
    """A validated request: the prompt's token ids and one SamplingParams per completion."""

    prompt_ids: list[int]
    params: list[SamplingParams]
    detok: DetokParams  # its continuation: output generated before, which the completion goes on from


class _Choice:
    """One completion of a Generate call: what arrived for it and what has been sent."""

    __slots__ = (
        "index",
        "engine_id",
        "pending",
        "pending_tokens",
        "num_tokens",
        "num_cached_tokens",
        "num_accepted_draft_tokens",
        "seen",
        "finished",
        "sent_finish",
        "ttft",
        "last_token_at",
        "finish_reason",
        "prompt_logprobs",
        "prompt",
    )

    def __init__(self, index: int, engine_id: str) -> None:
        self.index = index
        self.engine_id = engine_id
        self.pending: list[TextOutput] = []
        self.pending_tokens = 0
        self.num_tokens = 0
        self.num_cached_tokens = 0
        self.num_accepted_draft_tokens = 0
        self.seen = False  # the engine has produced something for it (it was accepted)
        self.finished: TextOutput | None = None
        self.sent_finish = False
        self.ttft: float | None = None
        self.last_token_at: float | None = None
        self.finish_reason: str | None = None
        self.prompt_logprobs: list[TextLogprob] | None = None  # prompt tokens 1..P-1, from the first output
        self.prompt: pb.PromptInfo | None = None  # set once accepted, until it rides out on the first response


class _Call:
    """One Generate call's completions: engine outputs in (an OutputSink), gRPC responses out."""

    def __init__(self, request_id: str, stream_interval: int, metrics: WorkerMetrics, started_at: float) -> None:
        self.request_id = request_id
        self.stream_interval = stream_interval
        self.metrics = metrics
        self.started_at = started_at
        self.num_prompt_tokens = 0
        self.num_continuation_tokens = 0  # output generated before this call (n is 1 then): in usage, not streamed
        self.choices: list[_Choice] = []
        self.refusal: Rejected | None = None
        self.abort_requested = False  # an Abort RPC came (maybe before the engine had the requests)
        self.abort_error = ""  # Finished.error of its aborted completions: wire.DRAINED_ERROR after a drain's abort
        self._wake = asyncio.Event()

    def start(self, num_prompt_tokens: int, n: int, num_continuation_tokens: int = 0) -> None:
        """Name the call's completions once its prompt is known: engine ids are request_id, or request_id#i."""
        self.num_prompt_tokens = num_prompt_tokens
        self.num_continuation_tokens = num_continuation_tokens
        self.choices = [_Choice(i, self.request_id if n == 1 else f"{self.request_id}#{i}") for i in range(n)]

    # -- OutputSink: called by EngineClient on the event loop --------------------------------------

    def on_text(self, index: int, out: TextOutput) -> None:
        choice = self.choices[index]
        choice.seen = True
        count = len(out.token_ids)
        if count:
            now = time.monotonic()
            metrics = self.metrics
            if choice.last_token_at is None:
                choice.ttft = now - self.started_at
                metrics.observe_first_token(choice.ttft)
                gaps = count - 1  # tokens that came with the first arrived with it
                gap = 0.0
            else:
                gaps, gap = count, (now - choice.last_token_at) / count
            for _ in range(gaps):
                metrics.observe_inter_token(gap)
            choice.last_token_at = now
            choice.num_tokens += count
            choice.pending_tokens += count
        choice.num_cached_tokens = max(choice.num_cached_tokens, out.num_cached_tokens)
        choice.num_accepted_draft_tokens = max(choice.num_accepted_draft_tokens, out.num_accepted_draft_tokens)
        if out.prompt_logprobs is not None:
            choice.prompt_logprobs = out.prompt_logprobs
        choice.pending.append(out)
        if out.finished:
            choice.finished = out
            choice.finish_reason = out.finish_reason
            completion = choice.num_tokens + (1 if out.stop_token_id is not None else 0)
            reason = out.finish_reason or "stop"
            self.metrics.observe_finished(
                reason, time.monotonic() - self.started_at, self.num_prompt_tokens, completion
            )
        self._wake.set()

    def on_rejected(self, index: int, rejected: Rejected) -> None:
        if self.refusal is None:
            self.refusal = rejected
        self._wake.set()

    def on_failure(self, message: str) -> None:
        if self.refusal is None and not self.accepted:
            self.refusal = Rejected("", "failed", message)
        for choice in self.choices:
            if choice.finished is None:
                self.on_text(choice.index, TextOutput(choice.engine_id, [], "", None, 0, True, "error", error=message))
        self._wake.set()

    # -- the Generate side -------------------------------------------------------------------------

    @property
    def accepted(self) -> bool:
        return all(c.seen for c in self.choices)

    @property
    def done(self) -> bool:
        return all(c.sent_finish for c in self.choices)

    async def wait(self) -> None:
        await self._wake.wait()
        self._wake.clear()

    def responses(self) -> list[pb.GenerateResponse]:
        """Everything ready to send: per completion one delta with all its new output, then its end.

        A completion's first response carries its PromptInfo and goes out whatever the stream interval
        (the first token is never held back); with no output to carry it, the PromptInfo goes alone.
        """
        responses = []
        for choice in self.choices:
            prompt, choice.prompt = choice.prompt, None
            mine: list[pb.GenerateResponse] = []
            finished = choice.finished
            due = finished is not None or prompt is not None or choice.pending_tokens >= self.stream_interval
            if choice.pending and due:
                items, choice.pending, choice.pending_tokens = choice.pending, [], 0
                delta = _delta(items)
                if delta is not None:
                    mine.append(pb.GenerateResponse(request_id=self.request_id, index=choice.index, delta=delta))
                if finished is not None:
                    mine.append(self._finished(choice, finished))
                    choice.sent_finish = True
            if prompt is not None:
                if mine:
                    mine[0].prompt.CopyFrom(prompt)
                else:
                    mine.append(pb.GenerateResponse(request_id=self.request_id, index=choice.index, prompt=prompt))
            responses.extend(mine)
        return responses

    def _finished(self, choice: _Choice, out: TextOutput) -> pb.GenerateResponse:
        stop_token = 1 if out.stop_token_id is not None else 0
        completion_tokens = self.num_continuation_tokens + choice.num_tokens + stop_token
        usage = pb.Usage(
            prompt_tokens=self.num_prompt_tokens,
            completion_tokens=completion_tokens,
            cached_prompt_tokens=choice.num_cached_tokens,
            accepted_draft_tokens=choice.num_accepted_draft_tokens,
        )
        error = out.error or (self.abort_error if out.finish_reason == "abort" else "")
        done = pb.Finished(finish_reason=FINISH_REASONS[out.finish_reason or "stop"], usage=usage, error=error)
        if out.stop_string is not None:
            done.stop_string = out.stop_string
        elif out.stop_token_id is not None:
            done.stop_token_id = out.stop_token_id
        return pb.GenerateResponse(request_id=self.request_id, index=choice.index, finished=done)

    def unfinished(self) -> list[_Choice]:
        return [c for c in self.choices if c.finished is None]

    def record_cancelled(self) -> None:
        """Count the completions the client left before they finished as aborts."""
        for choice in self.unfinished():
            choice.finish_reason = "abort"
            elapsed = time.monotonic() - self.started_at
            self.metrics.observe_finished("abort", elapsed, self.num_prompt_tokens, choice.num_tokens)


def _delta(items: list[TextOutput]) -> pb.Delta | None:
    if len(items) == 1:
        out = items[0]
        token_ids, text, logprobs = out.token_ids, out.text, out.logprobs
    else:
        token_ids = [t for out in items for t in out.token_ids]
        text = "".join(out.text for out in items)
        logprobs = [lp for out in items if out.logprobs for lp in out.logprobs] or None
    if not token_ids and not text:
        return None
    delta = pb.Delta(token_ids=token_ids, text=text)
    if logprobs:
        delta.logprobs.extend(_token_logprob(lp) for lp in logprobs)
    return delta


def _token_logprob(lp: TextLogprob) -> pb.TokenLogprob:
    return pb.TokenLogprob(
        token_id=lp.token_id,
        token=lp.token,
        logprob=lp.logprob,
        top_logprobs=[pb.TopLogprob(token_id=t, token=s, logprob=v) for t, s, v in lp.top],
    )


class WorkerService(worker_pb2_grpc.WorkerServicer):
    """Serves one engine; answers UNAVAILABLE until `attach` and from `begin_drain` on."""

    def __init__(self, config: WorkerConfig, metrics: WorkerMetrics) -> None:
        self._config = config
        self._metrics = metrics
        self._engine: EngineClient | None = None
        self._info: EngineInfo | None = None
        self._model_path = ""
        self._tokenizer: Any = None
        self._max_token_bytes = 0
        self._calls: dict[str, _Call] = {}
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    # -- lifecycle -------------------------------------------------------------------------------

    def attach(self, engine: EngineClient, tokenizer: Any, model_path: str = "") -> None:
        """Start serving through this engine client, with the model's tokenizer (loaded from model_path)."""
        assert engine.info is not None
        self._info = engine.info
        self._model_path = model_path
        self._tokenizer = tokenizer
        # No token spells more bytes than this: a text longer than context x this cannot fit, tokenized or not.
        self._max_token_bytes = max(len(token.encode("utf-8", "surrogatepass")) for token in tokenizer.get_vocab())
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

    def abort_all(self, error: str = "") -> None:
        """Abort every in-flight Generate call (their streams end with FINISH_REASON_ABORT and this error)."""
        for call in list(self._calls.values()):
            call.abort_error = error
            self._abort(call)

    def _abort(self, call: _Call) -> None:
        call.abort_requested = True
        if self._engine is not None and call.choices:
            self._engine.abort([c.engine_id for c in call.unfinished()])

    # -- RPCs ------------------------------------------------------------------------------------

    async def _ready_engine(self, context: grpc.aio.ServicerContext) -> EngineClient:
        if self._engine is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the model is still loading; retry later")
        assert self._engine is not None
        if self._engine.failure is not None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"the worker is failing: {self._engine.failure}")
        return self._engine

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelInfoResponse:
        await self._ready_engine(context)
        info = self._info
        assert info is not None
        return pb.GetModelInfoResponse(
            served_model_name=info.served_model_name,
            max_context_length=info.limits.max_context_length,
            vocab_size=info.limits.vocab_size,
            has_chat_template=has_chat_template(self._tokenizer),
            model_type=info.model_type,
            eos_token_ids=info.eos_token_ids,
            model_path=self._model_path,
            max_n=self._config.max_n,
            max_stop_strings=self._config.max_stop_strings,
            max_top_logprobs=MAX_TOP_LOGPROBS,
            max_stop_string_length=MAX_STOP_STRING_LENGTH,
            max_logit_bias=MAX_LOGIT_BIAS,
        )

    async def GetLoad(self, request: pb.GetLoadRequest, context: grpc.aio.ServicerContext) -> pb.GetLoadResponse:
        engine = await self._ready_engine(context)
        load = engine.load
        response = pb.GetLoadResponse(
            num_requests_running=load.num_running,
            num_requests_waiting=load.num_waiting,
            kv_pages_used=load.kv_pages_used,
            kv_pages_total=load.kv_pages_total or (self._info.limits.num_pages if self._info else 0),
            kv_cache_usage=load.kv_cache_usage,
            num_preemptions=load.num_preemptions,
        )
        if self._config.enable_prefix_caching:
            response.prefix_cache_hit_rate = load.prefix_cache_hit_rate
        return response

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        await self._ready_engine(context)
        found = [rid for rid in request.request_ids if rid in self._calls]
        for rid in found:
            self._abort(self._calls[rid])
        return pb.AbortResponse(aborted_request_ids=found)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        engine = await self._ready_engine(context)
        if self.draining:
            message = "the worker is draining; send the request elsewhere"
            await context.abort(grpc.StatusCode.UNAVAILABLE, message, trailing_metadata=((DRAINING_KEY, "1"),))
        fail_file = self._config.debug_fail_file
        if fail_file and os.path.exists(fail_file):  # fault injection, for tests of the callers' failure handling
            error = f"debug: failing on purpose while {fail_file} exists"
            finished = pb.Finished(finish_reason=pb.FINISH_REASON_ERROR, error=error)
            yield pb.GenerateResponse(request_id=request.request_id, finished=finished)
            return
        started_at = time.monotonic()
        request_id = request.request_id or uuid.uuid4().hex
        record: dict[str, Any] = {"request_id": request_id, "status": "OK"}
        if len(request_id) > MAX_REQUEST_ID_LENGTH or request_id in self._calls:
            problem = "is too long" if len(request_id) > MAX_REQUEST_ID_LENGTH else "is already in flight"
            record.update(status="INVALID_ARGUMENT", error_param="request_id")
            self._log(record, started_at)
            await _abort_invalid(context, InvalidRequestError(f"request_id {problem}", "request_id"))
        # Registered before the first await, so that a second call with this id is refused meanwhile.
        call = self._calls[request_id] = _Call(request_id, self._config.stream_interval, self._metrics, started_at)
        self._idle.clear()
        try:
            try:
                if request.WhichOneof("input") == "token_ids" and not request.sampling.HasField("constraint"):
                    prepared = self._prepare(request)  # nothing to tokenize (nor a grammar to check): no thread hop
                else:
                    prepared = await asyncio.to_thread(self._prepare, request)
                record["n"] = len(prepared.params)
                record["prompt_tokens"] = len(prepared.prompt_ids)
                continuation = prepared.detok.continuation
                if continuation:
                    record["continuation_tokens"] = len(continuation)
                call.start(len(prepared.prompt_ids), len(prepared.params), len(continuation))
                for choice, params in zip(call.choices, prepared.params, strict=True):
                    engine.add(choice.engine_id, prepared.prompt_ids, params, prepared.detok, call, choice.index)
                if call.abort_requested:  # Abort arrived before the engine knew the ids
                    self._abort(call)
                while not call.accepted and call.refusal is None:
                    await call.wait()
            except InvalidRequestError as exc:
                record.update(status="INVALID_ARGUMENT", error_param=exc.param)
                await _abort_invalid(context, exc)
            except Exception as exc:  # a bug or a dead engine, not the caller's fault: say so, keep serving
                record["status"] = "INTERNAL"
                log.exception("generate failed", extra={"fields": {"request_id": request_id}})
                code = grpc.StatusCode.UNAVAILABLE if engine.failure else grpc.StatusCode.INTERNAL
                await context.abort(code, f"internal error: {type(exc).__name__}: {exc}")
            if call.refusal is not None:
                await self._refuse(context, call.refusal, record)
            # Accepted means every completion's first output is here, and with it the prompt's logprobs.
            # Each PromptInfo rides on its completion's first response (Call.responses).
            prompt_text = self._decode(prepared.prompt_ids) if request.return_prompt_text else ""
            for choice in call.choices:
                choice.prompt = self._prompt_info(request, prepared.prompt_ids, prompt_text, choice)
            while True:
                for response in call.responses():
                    yield response
                if call.done:
                    break
                await call.wait()
        except asyncio.CancelledError:
            record["status"] = "CANCELLED"
            raise
        finally:
            left = call.unfinished()
            if left:
                engine.cancel([c.engine_id for c in left])
                if record["status"] == "OK":
                    record["status"] = "CANCELLED"
            if record["status"] == "CANCELLED":
                call.record_cancelled()
            del self._calls[request_id]
            if not self._calls:
                self._idle.set()
            self._log(record, started_at, call)

    async def _refuse(self, context: grpc.aio.ServicerContext, refusal: Rejected, record: dict[str, Any]) -> None:
        """End a call whose requests the engine refused (or could not take: it died)."""
        if refusal.kind == "invalid":
            record.update(status="INVALID_ARGUMENT", error_param=refusal.param)
            await _abort_invalid(context, InvalidRequestError(refusal.message, refusal.param))
        if refusal.kind == "queue_full":
            record["status"] = "RESOURCE_EXHAUSTED"
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                refusal.message,
                trailing_metadata=((RETRY_AFTER_KEY, str(self._config.retry_after_ms)),),
            )
        record["status"] = "UNAVAILABLE"
        await context.abort(grpc.StatusCode.UNAVAILABLE, refusal.message)

    # -- helpers ---------------------------------------------------------------------------------

    def _prompt_info(
        self, request: pb.GenerateRequest, prompt_ids: list[int], prompt_text: str, choice: _Choice
    ) -> pb.PromptInfo:
        """PromptInfo for one completion: the prompt's size, and its text and logprobs if asked for."""
        prompt = pb.PromptInfo(num_prompt_tokens=len(prompt_ids), prompt_text=prompt_text)
        if request.return_prompt_token_ids:
            prompt.prompt_token_ids.extend(prompt_ids)
        # None: the completion ended (aborted, failed) before its prefill did; there is nothing to send.
        if request.HasField("prompt_logprobs") and choice.prompt_logprobs is not None:
            first = pb.TokenLogprob(token_id=prompt_ids[0], token=self._decode(prompt_ids[:1]), logprob=math.nan)
            prompt.prompt_logprobs.append(first)
            prompt.prompt_logprobs.extend(_token_logprob(lp) for lp in choice.prompt_logprobs)
        return prompt

    def _decode(self, token_ids: list[int]) -> str:
        # Special tokens kept and no clean-up of spaces: the text the ids spell, as the detokenizer
        # gives logprob tokens theirs.
        return self._tokenizer.decode(token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def _prepare(self, request: pb.GenerateRequest) -> _Prepared:
        """Tokenize the prompt and validate every field against the engine's limits."""
        info = self._info
        assert info is not None
        limits = info.limits
        prompt_ids = self._prompt_ids(request)  # checked against the limits there: in vocabulary, room left
        s = request.sampling
        config = self._config

        def value(name: str, default: Any = None) -> Any:
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
        if any(len(stop) > MAX_STOP_STRING_LENGTH for stop in s.stop):
            raise InvalidRequestError(f"stop strings must be at most {MAX_STOP_STRING_LENGTH} characters", "stop")
        if value("top_logprobs", 0) != 0 and not s.logprobs:
            raise InvalidRequestError("top_logprobs requires logprobs to be true", "top_logprobs")
        # Unset max_tokens fills what is left of the context (and of the KV cache, for a small cache);
        # a max_tokens that is set and does not fit is refused, as OpenAI does.
        max_tokens = value("max_tokens", max(limits.room(len(prompt_ids)), 1))
        # Unset fields keep SamplingParams' own defaults: the one place they are written down.
        optional = {name: getattr(s, name) for name in _OPTIONAL_SAMPLING if s.HasField(name)}
        base = SamplingParams(
            max_tokens=max_tokens,
            stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            logprobs=s.logprobs,
            prompt_logprobs=request.prompt_logprobs if request.HasField("prompt_logprobs") else None,
            constraint=_constraint(s),
            logit_bias=dict(s.logit_bias),
            **optional,
        )
        params = []
        for i in range(n):
            seed = None if base.seed is None else base.seed + i
            p = dataclasses.replace(base, seed=seed, stop_token_ids=list(base.stop_token_ids))  # n owners, n lists
            limits.check_fits(len(prompt_ids), p)  # the prompt itself was checked once, in _prompt_ids
            params.append(p)
        continuation = list(request.continuation.ids)
        if continuation:
            _check_continuation(request, n)
            limits.check_continuation(continuation, params[0])
        detok = DetokParams(list(s.stop), value("skip_special_tokens", True), continuation)
        return _Prepared(prompt_ids, params, detok)

    def _prompt_ids(self, request: pb.GenerateRequest) -> list[int]:
        tokenizer = self._tokenizer
        kind = request.WhichOneof("input")
        if kind in ("text", "chat"):
            # Refuse a text that cannot fit before spending seconds tokenizing megabytes of it.
            texts = [request.text] if kind == "text" else [m.content for m in request.chat.messages]
            if kind == "chat":
                texts.append(request.chat.tools_json)  # rendered into the prompt too
            size = sum(len(t.encode("utf-8", "surrogatepass")) for t in texts)
            assert self._info is not None
            context = self._info.limits.max_context_length
            if size > context * self._max_token_bytes:
                raise ContextLengthError(context, -(-size // self._max_token_bytes), at_least=True)
        if kind == "text":
            if not request.HasField("add_special_tokens") or request.add_special_tokens:
                ids = encode_prompt(tokenizer, request.text)
            else:
                ids = list(tokenizer.encode(request.text, add_special_tokens=False))
            if not ids:
                raise InvalidRequestError("text is empty (no tokens to start from)", "text")
            assert self._info is not None
            self._info.limits.check_prompt(ids, "text")
            return ids
        if kind == "chat":
            chat = request.chat
            ids = apply_chat_template(
                tokenizer,
                [_message_dict(m) for m in chat.messages],
                tools=_json_field(chat.tools_json, list, "chat.tools_json") or [],
                template_kwargs=_json_field(chat.template_kwargs_json, dict, "chat.template_kwargs_json"),
            )
            assert self._info is not None
            self._info.limits.check_prompt(ids, "chat.messages")
            return ids
        if kind == "token_ids":
            ids = list(request.token_ids.ids)
            if not ids:
                raise InvalidRequestError("token_ids.ids must not be empty", "token_ids")
            assert self._info is not None
            self._info.limits.check_prompt(ids, "token_ids")
            return ids
        raise InvalidRequestError("input is required: set one of text, chat or token_ids", "input")

    def _log(self, record: dict[str, Any], started_at: float, call: _Call | None = None) -> None:
        """The one info line per Generate call; never the prompt or output text."""
        if call is not None and call.choices:
            choices = call.choices
            record["completion_tokens"] = sum(c.num_tokens for c in choices)
            reasons = [c.finish_reason or "none" for c in choices]
            record["finish_reason"] = reasons[0] if len(reasons) == 1 else ",".join(reasons)
            ttfts = [c.ttft for c in choices if c.ttft is not None]
            if ttfts:
                record["ttft_s"] = round(min(ttfts), 4)
        record["latency_s"] = round(time.monotonic() - started_at, 4)
        log.info("generate", extra={"fields": record})


def _message_dict(m: pb.ChatMessage) -> dict[str, Any]:
    """A chat message as templates read it (OpenAI's shape)."""
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    for key in ("name", "tool_call_id", "reasoning_content"):
        if getattr(m, key):
            out[key] = getattr(m, key)
    if m.tool_calls:
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    return out


def _json_field(text: str, kind: type, param: str) -> Any:
    """A JSON-encoded request field, None when empty; InvalidRequestError naming it when it is not a `kind`."""
    if not text:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"{param} is not valid JSON: {exc}", param) from None
    if not isinstance(value, kind):
        raise InvalidRequestError(f"{param} must be a JSON {'array' if kind is list else 'object'}", param)
    return value


def _check_continuation(request: pb.GenerateRequest, n: int) -> None:
    """A continuation goes on from one completion of a prompt given as token ids."""
    if request.WhichOneof("input") != "token_ids":
        raise InvalidRequestError("continuation requires the prompt as token_ids", "continuation")
    if n != 1:
        raise InvalidRequestError(f"continuation requires n == 1, got {n}", "continuation")


def _constraint(s: pb.SamplingParams) -> Constraint | None:
    if not s.HasField("constraint"):
        return None
    kind = s.constraint.WhichOneof("kind")
    if kind is None:
        raise InvalidRequestError("constraint is set but names no grammar", "constraint")
    return Constraint(kind, "" if kind == "json_object" else getattr(s.constraint, kind))


async def _abort_invalid(context: grpc.aio.ServicerContext, exc: InvalidRequestError) -> None:
    metadata = ((ERROR_PARAM_KEY, exc.param),) if exc.param else ()
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, exc.message, trailing_metadata=metadata)
