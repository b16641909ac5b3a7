"""OpenAI requests to worker calls and worker events back to OpenAI responses (JSON or SSE)."""

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from gateway import errors
from gateway.chat_output import REASONING_MODEL_TYPES, ChatOutput
from gateway.config import GatewayConfig
from gateway.errors import APIError
from gateway.generation import Delta, Finish, GenerationRun, PromptJob
from gateway.metrics import GatewayMetrics
from gateway.protocol import (
    SSE_DONE_BYTES,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChunkEncoder,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    ToolCall,
    Usage,
    new_id,
)
from gateway.router import RouteKey, Router
from gateway.workers import WorkerPool
from protos.sfllm.v1 import worker_pb2 as pb

log = logging.getLogger("sfllm.gateway")

_SEPARATOR = "\x1e"  # between messages in the routing text; cannot be confused with message content boundaries


@dataclass
class RequestRecord:
    """One request's facts for its log line and metrics; never the prompt text."""

    request_id: str
    endpoint: str
    model: str
    stream: bool
    n: int
    started: float = field(default_factory=time.monotonic)
    status: int = 200
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    finish_reasons: list[str] = field(default_factory=list)
    disconnected: bool = False
    run: GenerationRun | None = None
    _done: bool = False

    def finish(self, metrics: GatewayMetrics) -> None:
        """Log the request's one line and record its metrics (once)."""
        if self._done:
            return
        self._done = True
        elapsed = time.monotonic() - self.started
        ttft = None
        if self.run is not None and self.run.stats.first_token_at is not None:
            ttft = self.run.stats.first_token_at - self.started
            metrics.time_to_first_token.labels(self.endpoint).observe(ttft)
        metrics.e2e_request_latency.labels(self.endpoint).observe(elapsed)
        metrics.prompt_tokens.inc(self.prompt_tokens)
        metrics.generation_tokens.inc(self.completion_tokens)
        fields = {
            "request_id": self.request_id,
            "endpoint": self.endpoint,
            "model": self.model,
            "status": self.status,
            "stream": self.stream,
            "n": self.n,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "finish_reasons": self.finish_reasons,
            "ttft_s": round(ttft, 4) if ttft is not None else None,
            "e2e_s": round(elapsed, 4),
            "workers": self.run.stats.workers if self.run else [],
            "retries": self.run.stats.retries if self.run else 0,
            "migrations": self.run.stats.migrations if self.run else 0,
            "disconnected": self.disconnected,
            "error": self.error,
        }
        log.info("request", extra={"fields": fields})


class _Accumulator:
    """Usage totals and per-choice results gathered from a run's events."""

    def __init__(self, num_choices: int, n: int) -> None:
        self.n = n
        self.texts: list[list[str]] = [[] for _ in range(num_choices)]
        self.logprobs: list[list[pb.TokenLogprob]] = [[] for _ in range(num_choices)]
        self.finish_reasons: list[str | None] = [None] * num_choices
        self.completion_tokens = 0
        self.cached: dict[int, int] = {}

    def add(self, event: Delta | Finish) -> None:
        if isinstance(event, Delta):
            self.texts[event.choice].append(event.text)
            self.logprobs[event.choice].extend(event.logprobs)
        else:
            self.finish_reasons[event.choice] = event.finish_reason
            self.completion_tokens += event.completion_tokens
            prompt = event.choice // self.n
            self.cached[prompt] = max(self.cached.get(prompt, 0), event.cached_prompt_tokens)

    def usage(self, num_prompt_tokens: list[int]) -> Usage:
        prompt_tokens = sum(num_prompt_tokens)
        return Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=self.completion_tokens,
            total_tokens=prompt_tokens + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached.values())),
        )


class _StreamResponse(StreamingResponse):
    """A streaming response that cancels its run however the response ends (done, error or disconnect).

    It streams from the request's own task, and a client that leaves cancels that task. Starlette's
    StreamingResponse (under uvicorn's ASGI 2.3) starts an anyio task group and a second task for the
    stream instead, on the way to every stream's first event.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        left = False

        async def watch() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            task.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
            async for chunk in self.body_iterator:
                body = chunk if isinstance(chunk, bytes) else chunk.encode()
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not left:
                raise
            task.uncancel()  # the client left: the stream is over, the request's task is not
        finally:
            watcher.cancel()
            self._on_close()


class _ClientDisconnected(Exception):
    pass


async def _wait_for_disconnect(request: Request) -> None:
    # the body has been read, so the next ASGI message can only be the disconnect
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(work: Any, http: Request) -> bool:
    """Await `work`; False (work cancelled) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    disconnect = asyncio.ensure_future(_wait_for_disconnect(http))
    try:
        await asyncio.wait({task, disconnect}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        disconnect.cancel()
    if task.done():
        task.result()  # raises the work's error
        return True
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    return False


def _chat_logprobs(items: list[pb.TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat logprobs object (the ChatLogprobs schema) for these tokens."""
    return {
        "content": [
            {
                "token": lp.token,
                "logprob": lp.logprob,
                "bytes": list(lp.token.encode("utf-8")),
                "top_logprobs": [
                    {"token": t.token, "logprob": t.logprob, "bytes": list(t.token.encode("utf-8"))}
                    for t in lp.top_logprobs
                ],
            }
            for lp in items
        ],
        "refusal": None,
    }


def _completion_logprobs(items: list[pb.TokenLogprob], start_offset: int, with_top: bool) -> dict[str, Any]:
    """The legacy completions logprobs object (the CompletionLogprobs schema); offsets count from start_offset.

    An echoed prompt's first token has no logprob (NaN from the worker): null, as OpenAI sends it.
    """
    offsets = []
    offset = start_offset
    for lp in items:
        offsets.append(offset)
        offset += len(lp.token)
    first = [math.isnan(lp.logprob) for lp in items]
    return {
        "tokens": [lp.token for lp in items],
        "token_logprobs": [None if unknown else lp.logprob for lp, unknown in zip(items, first)],
        "top_logprobs": [
            None if unknown else {t.token: t.logprob for t in lp.top_logprobs} for lp, unknown in zip(items, first)
        ]
        if with_top
        else None,
        "text_offset": offsets,
    }


def _echo(
    req: CompletionRequest, prompts: list[str | list[int]], run: GenerationRun, job: int
) -> tuple[str, list[pb.TokenLogprob]]:
    """With echo: the prompt's text (as sent, or as the worker spelled its ids) and its tokens' logprobs."""
    if not req.echo:
        return "", []
    prompt = prompts[job]
    info = run.prompts[job]
    text = prompt if isinstance(prompt, str) else (info.prompt_text if info is not None else "")
    return text, list(info.prompt_logprobs) if info is not None else []


def _coalesce(batch: list[Delta | Finish]) -> dict[int, tuple[list[Delta], Finish | None]]:
    """A batch of events by choice: its deltas (to send as one) and its finish, choices in order of arrival."""
    by_choice: dict[int, tuple[list[Delta], Finish | None]] = {}
    for event in batch:
        deltas, finish = by_choice.get(event.choice, ([], None))
        if isinstance(event, Delta):
            deltas.append(event)
        else:
            finish = event
        by_choice[event.choice] = (deltas, finish)
    return by_choice


def _check_limits(req: ChatCompletionRequest | CompletionRequest, info: Any) -> None:
    """Refuse what the worker would refuse, with the worker's own limits (GetModelInfo), before routing."""
    if info is None or not info.max_n:
        return  # no worker has described itself yet: the worker checks anyway
    if req.n > info.max_n:
        raise errors.bad_request(f"n must be at most {info.max_n} on this server, got {req.n}", "n")
    stops = req.stop_list()
    if len(stops) > info.max_stop_strings:
        raise errors.bad_request(f"stop takes at most {info.max_stop_strings} strings, got {len(stops)}", "stop")
    if any(len(stop) > info.max_stop_string_length for stop in stops):
        raise errors.bad_request(f"stop strings must be at most {info.max_stop_string_length} characters", "stop")
    asked = req.top_logprobs if isinstance(req, ChatCompletionRequest) else req.logprobs
    if asked is not None and asked > info.max_top_logprobs:
        name = "top_logprobs" if isinstance(req, ChatCompletionRequest) else "logprobs"
        raise errors.bad_request(f"{name} must be at most {info.max_top_logprobs} on this server, got {asked}", name)
    if len(req.logit_bias or {}) > info.max_logit_bias:
        raise errors.bad_request(f"logit_bias takes at most {info.max_logit_bias} tokens", "logit_bias")
    for token in req.logit_bias or {}:
        if int(token) >= info.vocab_size:
            raise errors.bad_request(
                f"logit_bias names token {token}, outside the vocabulary [0, {info.vocab_size})", "logit_bias"
            )


def _constraint_param(req: ChatCompletionRequest | CompletionRequest) -> str:
    """The request field a grammar the worker refused came from."""
    if isinstance(req, ChatCompletionRequest) and req.forced_tools():
        return "tools"
    return "structured_outputs" if req.structured_outputs is not None else "response_format"


class OpenAIServing:
    """The handlers' logic: admission, translation, running, and shaping the answer."""

    def __init__(self, config: GatewayConfig, router: Router, pool: WorkerPool, metrics: GatewayMetrics) -> None:
        self.config = config
        self.router = router
        self.pool = pool
        self.metrics = metrics
        self.in_flight = 0

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=m, max_model_len=ctx) for m, ctx in sorted(self.router.models().items())])

    def model(self, model_id: str) -> ModelCard:
        """GET /v1/models/{id}: 404 for a model no healthy worker serves."""
        served = self.router.models()
        if model_id not in served:
            raise errors.model_not_found(model_id)
        return ModelCard(id=model_id, max_model_len=served[model_id])

    # -- entry points ----------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, http: Request) -> Response:
        request_id = new_id("chatcmpl")
        chat = req.chat_proto()
        text = _SEPARATOR.join(f"{m.role}\x1f{m.content}" for m in chat.messages)
        job = PromptJob(
            request=pb.GenerateRequest(chat=chat, sampling=self._sampling(req)),
            route_key=RouteKey(req.model, self._routing_text(req, text)),
            first_choice=0,
            n=req.n,
            prompt_param="messages",
        )
        return await self._serve(request_id, "chat", req, [job], http)

    async def completion(self, req: CompletionRequest, http: Request) -> Response:
        request_id = new_id("cmpl")
        jobs = []
        sampling = self._sampling(req)
        for i, prompt in enumerate(req.prompts()):
            request = pb.GenerateRequest(sampling=sampling)
            if isinstance(prompt, str):
                request.text = prompt
                request.add_special_tokens = req.add_special_tokens
                text = prompt
            else:
                request.token_ids.ids.extend(prompt)
                request.return_prompt_text = req.echo  # the gateway has no tokenizer to spell the ids
                text = "ids:" + " ".join(map(str, prompt))
            if req.echo and req.logprobs is not None:
                request.prompt_logprobs = req.logprobs
            jobs.append(PromptJob(request, RouteKey(req.model, self._routing_text(req, text)), i * req.n, req.n))
        return await self._serve(request_id, "completions", req, jobs, http)

    def _sampling(self, req: ChatCompletionRequest | CompletionRequest) -> pb.SamplingParams:
        """The request's sampling parameters, checked against the serving workers' limits."""
        _check_limits(req, self.router.model_info(req.model))
        try:
            return req.sampling_params()
        except ValueError as exc:  # a tool list the schema builder refuses
            raise errors.bad_request(str(exc), "tools") from None

    def _chat_output(self, req: ChatCompletionRequest) -> ChatOutput:
        info = self.router.model_info(req.model)
        reasoning = info is not None and info.model_type in REASONING_MODEL_TYPES
        named = req.named_tool()
        return ChatOutput(req.tool_mode(), reasoning, named.name if named else None)

    @staticmethod
    def _routing_text(req: ChatCompletionRequest | CompletionRequest, text: str) -> str:
        # OpenAI's prompt_cache_key groups requests the client knows share a prefix
        return f"key:{req.prompt_cache_key}{_SEPARATOR}{text}" if req.prompt_cache_key else text

    # -- common path -----------------------------------------------------------------------------

    async def _serve(
        self,
        request_id: str,
        endpoint: str,
        req: ChatCompletionRequest | CompletionRequest,
        jobs: list[PromptJob],
        http: Request,
    ) -> Response:
        record = RequestRecord(request_id, endpoint, req.model, req.stream, req.n)
        if self.in_flight >= self.config.max_in_flight:
            return self._fail(record, errors.overloaded("the gateway is at its in-flight request limit"))
        self.in_flight += 1
        self.metrics.num_requests_running.set(self.in_flight)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1
                self.metrics.num_requests_running.set(self.in_flight)
                record.finish(self.metrics)

        run = GenerationRun(
            request_id,
            jobs,
            self.router,
            self.pool,
            self.metrics,
            self.config.max_attempts,
            buffered=not req.stream,
            max_migrations=self.config.max_migrations,
            start_timeout_s=self.config.start_timeout_s,
        )
        record.run = run
        try:
            accepted = await _unless_disconnected(run.start(), http)
        except APIError as exc:
            if exc.param == "constraint":
                exc.param = _constraint_param(req)
            response = self._fail(record, exc)  # records the status before release() logs the line
            release()
            return response
        except BaseException:
            release()
            raise
        if not accepted:  # the client left while its prompt waited or prefilled: stop the work now
            await run.close()
            record.status, record.disconnected = 499, True
            release()
            return Response(status_code=499)
        record.prompt_tokens = sum(run.num_prompt_tokens)
        num_choices = len(jobs) * req.n
        if req.stream:
            chunks = self._stream(run, req, num_choices, record)

            def on_close() -> None:
                run.cancel()
                release()

            return _StreamResponse(chunks, on_close)
        try:
            acc = await self._collect(run, num_choices, req.n, http)
            return self._response(request_id, req, acc, run, record)
        except APIError as exc:
            return self._fail(record, exc)
        except _ClientDisconnected:
            record.status, record.disconnected = 499, True
            return Response(status_code=499)
        finally:
            run.cancel()
            release()

    def _response(
        self,
        request_id: str,
        req: ChatCompletionRequest | CompletionRequest,
        acc: "_Accumulator",
        run: GenerationRun,
        record: RequestRecord,
    ) -> Response:
        """The whole (non-streamed) answer."""
        usage = acc.usage(run.num_prompt_tokens)
        record.completion_tokens = usage.completion_tokens
        record.cached_tokens = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
        record.finish_reasons = [r or "" for r in acc.finish_reasons]
        num_choices = len(acc.texts)
        if isinstance(req, ChatCompletionRequest):
            choices = []
            for i in range(num_choices):
                output = self._chat_output(req)
                parts = output.whole("".join(acc.texts[i]))
                calls = [ToolCall.model_validate(c.to_openai()) for c in parts.tool_calls] or None
                message = ChatResponseMessage(
                    content=parts.content, reasoning_content=parts.reasoning, tool_calls=calls
                )
                logprobs = ChatLogprobs.model_validate(_chat_logprobs(acc.logprobs[i])) if req.logprobs else None
                reason = output.finish_reason(acc.finish_reasons[i] or "stop")
                choices.append(ChatChoice(index=i, message=message, logprobs=logprobs, finish_reason=reason))  # type: ignore[arg-type]
            body: ChatCompletionResponse | CompletionResponse = ChatCompletionResponse(
                id=request_id, model=req.model, usage=usage, choices=choices
            )
        else:
            prompts = req.prompts()
            choices_c = []
            for i in range(num_choices):
                echoed, prompt_lps = _echo(req, prompts, run, i // req.n)
                text = echoed + "".join(acc.texts[i])
                logprobs_c = None
                if req.logprobs is not None:
                    items = _completion_logprobs(prompt_lps + acc.logprobs[i], 0, bool(req.logprobs))
                    logprobs_c = CompletionLogprobs.model_validate(items)
                reason = acc.finish_reasons[i]
                choices_c.append(CompletionChoice(index=i, text=text, logprobs=logprobs_c, finish_reason=reason))  # type: ignore[arg-type]
            body = CompletionResponse(id=request_id, model=req.model, usage=usage, choices=choices_c)
        return Response(body.model_dump_json(), media_type="application/json")

    def _fail(self, record: RequestRecord, exc: APIError) -> JSONResponse:
        record.status, record.error = exc.status, exc.code or exc.type
        record.finish(self.metrics)
        return exc.response()

    async def _collect(self, run: GenerationRun, num_choices: int, n: int, http: Request) -> _Accumulator:
        """All events of a non-streamed run; a client that hangs up cancels the run."""
        acc = _Accumulator(num_choices, n)

        async def gather() -> None:
            async for event in run.events():
                acc.add(event)

        collecting = asyncio.ensure_future(gather())
        disconnect = asyncio.ensure_future(_wait_for_disconnect(http))
        try:
            await asyncio.wait({collecting, disconnect}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            disconnect.cancel()
            if not collecting.done():
                collecting.cancel()
        if not collecting.done() or collecting.cancelled():
            raise _ClientDisconnected()
        collecting.result()
        return acc

    async def _stream(
        self,
        run: GenerationRun,
        req: ChatCompletionRequest | CompletionRequest,
        num_choices: int,
        record: RequestRecord,
    ) -> AsyncIterator[bytes]:
        """The SSE body: OpenAI's chunks, the usage chunk when asked for, then [DONE] (or an error event).

        Whatever arrived since the last write goes out in one write, one event per choice: a client
        that reads slowly gets events carrying several tokens, as OpenAI's own stream may.
        """
        chat = isinstance(req, ChatCompletionRequest)
        encoder = ChunkEncoder(record.request_id, req.model, chat, req.include_usage)
        outputs = [self._chat_output(req) for _ in range(num_choices)] if chat else []  # type: ignore[arg-type]
        acc = _Accumulator(num_choices, req.n)
        offsets = [0] * num_choices
        last_delta: list[float | None] = [None] * num_choices
        want_logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        with_top = bool(req.logprobs)
        itl = self.metrics.inter_token_latency
        try:
            if chat:
                yield b"".join(
                    encoder.event([ChunkEncoder.chat_choice(i, {"role": "assistant", "content": ""})])
                    for i in range(num_choices)
                )
            elif req.echo:  # type: ignore[union-attr]
                prompts = req.prompts()  # type: ignore[union-attr]
                echoes = []
                for i in range(num_choices):
                    text, prompt_lps = _echo(req, prompts, run, i // req.n)  # type: ignore[arg-type]
                    lps = None
                    if want_logprobs:
                        lps = _completion_logprobs(prompt_lps, 0, with_top)
                        offsets[i] = len(text)
                    echoes.append(encoder.event([ChunkEncoder.completion_choice(i, text, lps)]))
                yield b"".join(echoes)
            async for batch in run.batches():
                out = []
                moment = time.monotonic()
                for i, (deltas, finish) in _coalesce(batch).items():
                    for event in deltas:
                        acc.add(event)
                    if deltas:
                        if last_delta[i] is not None:
                            itl.observe(moment - last_delta[i])  # type: ignore[operator]
                        last_delta[i] = moment
                        text = deltas[0].text if len(deltas) == 1 else "".join(d.text for d in deltas)
                        items = [lp for d in deltas for lp in d.logprobs]
                        if chat:
                            lps = _chat_logprobs(items) if want_logprobs else None
                            delta = outputs[i].feed(text)
                            if delta or lps:
                                out.append(encoder.event([ChunkEncoder.chat_choice(i, delta, lps)]))
                        else:
                            lps = None
                            if want_logprobs:
                                lps = _completion_logprobs(items, offsets[i], with_top)
                                offsets[i] += sum(len(lp.token) for lp in items)
                            out.append(encoder.event([ChunkEncoder.completion_choice(i, text, lps)]))
                    if finish is not None:
                        acc.add(finish)
                        reason = finish.finish_reason
                        if chat:
                            rest = outputs[i].finish()
                            if rest:
                                out.append(encoder.event([ChunkEncoder.chat_choice(i, rest)]))
                            choice = ChunkEncoder.chat_choice(i, {}, None, outputs[i].finish_reason(reason))
                        else:
                            choice = ChunkEncoder.completion_choice(i, "", None, reason)
                        out.append(encoder.event([choice]))
                yield b"".join(out)
            usage = acc.usage(run.num_prompt_tokens)
            record.completion_tokens = usage.completion_tokens
            record.finish_reasons = [r or "" for r in acc.finish_reasons]
            tail = encoder.event([], usage.model_dump()) if req.include_usage else b""
            yield tail + SSE_DONE_BYTES
        except APIError as exc:
            record.status, record.error = exc.status, exc.code or exc.type
            record.finish_reasons = [r or "" for r in acc.finish_reasons]
            yield f"data: {exc.body().model_dump_json()}\n\n".encode() + SSE_DONE_BYTES
        except (asyncio.CancelledError, GeneratorExit):
            record.disconnected = True
            raise
        finally:
            run.cancel()
