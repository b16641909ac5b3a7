"""SGLang's native API on the gateway: /generate, /get_model_info, /get_server_info and /health_generate.

The shapes are SGLang's, so its native clients work unchanged: /generate takes GenerateReqInput's
fields (`text` or `input_ids`, one prompt or a batch, `sampling_params` by SGLang's names, `rid`,
`return_logprob`, `stream`) and answers {"text", "output_ids", "meta_info"} per completion, a list
of them for a batch or n > 1 (prompt by prompt, each prompt's n samples together). A stream sends
each completion's output so far (cumulative text and output_ids, as SGLang does by default), tagged
with its "index" in a batch, then `data: [DONE]`.

Where this server differs: errors carry the OpenAI error body the other routes use; unknown
sampling parameters and request fields are refused by name instead of ignored; `model` (not
SGLang's) names the model where the gateway serves several.
"""

import asyncio
import dataclasses
import importlib.metadata
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from gateway import errors
from gateway.errors import APIError
from gateway.generation import Delta, Finish, GenerationRun, PromptJob
from gateway.protocol import (
    INT32_MAX,
    MAX_N,
    MAX_TOP_LOGPROBS,
    SEED_LIMIT,
    SSE_DONE_BYTES,
    check_logit_bias,
    check_stop,
    check_stop_token_ids,
    first_refused_extra,
)
from gateway.router import RouteKey
from gateway.serving import OpenAIServing, RequestRecord, _StreamResponse, _unless_disconnected
from protos.sfllm.v1 import worker_pb2 as pb

ENDPOINTS = frozenset({"/generate", "/get_model_info", "/get_server_info", "/health_generate"})
DEFAULT_MAX_NEW_TOKENS = 128  # SGLang's default (OpenAI's completions default to 16)
HEALTH_GENERATE_TIMEOUT_S = 20.0
_CONSTRAINTS = ("json_schema", "regex", "ebnf")
_LOGIT_BIAS_RANGE = 100.0


def _is_falsy(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


def _is_default(*defaults: Any) -> Callable[[Any], bool]:
    return lambda value: any(value is d or (type(value) is type(d) and value == d) for d in (None, *defaults))


# ---------------------------------------------------------------------------------------------- requests


class NativeSamplingParams(BaseModel):
    """One prompt's `sampling_params`, by SGLang's names; unset fields keep the worker's defaults."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)  # strict, as the OpenAI routes are

    # SGLang parameters this server cannot honour: name -> "this value is harmless" (absent or the default)
    UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "min_new_tokens": _is_default(0),
        "stop_regex": _is_falsy,
        "structural_tag": _is_falsy,
        "spaces_between_special_tokens": _is_default(True),
        "no_stop_trim": _is_default(False),
        "custom_params": _is_falsy,
    }
    IGNORED: ClassVar[frozenset[str]] = frozenset({"stream_interval"})  # how often chunks go out, not what they say

    max_new_tokens: int | None = Field(default=DEFAULT_MAX_NEW_TOKENS, ge=1, le=INT32_MAX)  # null: up to the context
    temperature: float | None = Field(default=None, ge=0.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    sampling_seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    json_schema: str | None = None  # a JSON Schema as JSON text, as SGLang takes it
    regex: str | None = None
    ebnf: str | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON keys being strings) -> bias

    _check_stop = field_validator("stop")(check_stop)

    _check_stop_token_ids = field_validator("stop_token_ids")(check_stop_token_ids)

    @field_validator("json_schema")
    @classmethod
    def _check_json_schema(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"json_schema must be a JSON Schema as JSON text: {exc}") from None
        return value

    _check_logit_bias = field_validator("logit_bias")(check_logit_bias)

    def constraint(self) -> str | None:
        """The one grammar field set (json_schema, regex or ebnf), or None."""
        return next((name for name in _CONSTRAINTS if getattr(self, name) is not None), None)

    def refusal(self) -> tuple[str, str, str | None] | None:
        """(field, message, code) for the first parameter this server refuses, or None."""
        for name, value in (self.model_extra or {}).items():
            if name in self.IGNORED:
                continue
            harmless = self.UNSUPPORTED.get(name)
            if harmless is None:
                return name, f"Unrecognized sampling parameter: {name}", None
            if not harmless(value):
                return name, f"{name} is not supported by this server", "unsupported_parameter"
        grammars = [name for name in _CONSTRAINTS if getattr(self, name) is not None]
        if len(grammars) > 1:
            return grammars[1], f"only one of json_schema, regex and ebnf may be set; got {', '.join(grammars)}", None
        return None

    def to_pb(self, logprobs: bool, top_logprobs: int) -> pb.SamplingParams:
        """The worker's sampling parameters: fields left unset here stay unset there (the worker's defaults)."""
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        s = pb.SamplingParams(
            stop=stops,
            stop_token_ids=self.stop_token_ids or [],
            ignore_eos=bool(self.ignore_eos),
            logprobs=logprobs,
        )
        for ours, theirs in _PB_NAMES.items():
            value = getattr(self, ours)
            if value is not None:
                setattr(s, theirs, value)
        if logprobs and top_logprobs:
            s.top_logprobs = top_logprobs
        kind = self.constraint()
        if kind is not None:
            setattr(s.constraint, kind, getattr(self, kind))
        for key, bias in (self.logit_bias or {}).items():
            s.logit_bias[int(key)] = bias
        return s


# our field -> the worker's field, for the optional scalars that map one to one
_PB_NAMES = {
    "max_new_tokens": "max_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "sampling_seed": "seed",
    "repetition_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
    "n": "n",
    "skip_special_tokens": "skip_special_tokens",
}
# the worker's field names (in its INVALID_ARGUMENT errors) -> ours
_FROM_PB = {theirs: f"sampling_params.{ours}" for ours, theirs in _PB_NAMES.items()} | {
    "stop": "sampling_params.stop",
    "stop_token_ids": "sampling_params.stop_token_ids",
    "logit_bias": "sampling_params.logit_bias",
    "logprobs": "return_logprob",
    "top_logprobs": "top_logprobs_num",
    "prompt_logprobs": "logprob_start_len",
    "request_id": "rid",
    "token_ids": "input_ids",
    "input": "text",
}


class GenerateRequest(BaseModel):
    """POST /generate: the fields of SGLang's GenerateReqInput that a text model served here can honour."""

    model_config = ConfigDict(extra="allow", strict=True)

    # GenerateReqInput fields whose non-default values this server cannot honour
    UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "input_embeds": _is_falsy,
        "image_data": _is_falsy,
        "video_data": _is_falsy,
        "audio_data": _is_falsy,
        "lora_path": _is_falsy,
        "session_params": _is_falsy,
        "custom_logit_processor": _is_falsy,
        "token_ids_logprob": _is_falsy,
        "return_hidden_states": _is_falsy,
        "return_routed_experts": _is_falsy,
        "bootstrap_host": _is_falsy,
        "bootstrap_port": _is_falsy,
        "bootstrap_room": _is_falsy,
    }
    # fields that change how a request is scheduled or logged, not what it generates
    IGNORED: ClassVar[frozenset[str]] = frozenset(
        {"log_metrics", "no_logs", "custom_labels", "priority", "modalities", "routing_key", "conversation_id"}
    )

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] | None = None
    top_logprobs_num: int | list[int] | None = None
    logprob_start_len: int | list[int] | None = None  # -1 (the default): output tokens only
    return_text_in_logprobs: bool = False
    stream: bool = False
    model: str | None = None  # not SGLang's (it serves one model): which model, where the gateway serves several

    def first_unsupported_field(self) -> tuple[str, str] | None:
        """(field, message) for the first field this server refuses, or None."""
        return first_refused_extra(self.model_extra, self.IGNORED, self.UNSUPPORTED)


def parse_generate(data: Any) -> GenerateRequest:
    """Validate a /generate body: 400 naming the first bad or unsupported field."""
    try:
        req = GenerateRequest.model_validate(data)
    except ValidationError as exc:
        raise errors.from_validation_error(exc) from None
    unsupported = req.first_unsupported_field()
    if unsupported is not None:
        name, message = unsupported
        raise errors.bad_request(message, name, "unsupported_parameter")
    return req


@dataclass
class _Plan:
    """A validated /generate request as worker calls: one job per prompt, its n completions in a row."""

    model: str
    run_id: str
    jobs: list[PromptJob]
    n: int
    entry_ids: list[str]  # meta_info.id of each completion, in answer order
    logprobs: list[bool]  # per prompt
    top_logprobs: list[int]  # per prompt
    logprob_starts: list[int]  # per prompt: the first prompt position with logprobs, -1 for none
    single: bool  # one prompt and n == 1: the answer is one object, not a list
    constraint: str | None  # the grammar field set, for naming it in the worker's errors


def _per_prompt(value: Any, count: int, name: str, default: Any) -> list[Any]:
    """A field that is one value for every prompt, or a list of one per prompt (batches only)."""
    if value is None:
        return [default] * count
    if not isinstance(value, list):
        return [value] * count
    if len(value) != count:
        raise errors.bad_request(f"{name} has {len(value)} entries for a batch of {count} prompts", name)
    return [default if v is None else v for v in value]


def _sampling(raw: Any, where: str) -> NativeSamplingParams:
    try:
        params = NativeSamplingParams.model_validate(raw)
    except ValidationError as exc:
        error = errors.from_validation_error(exc)
        error.message = f"{where}.{error.message}" if error.param else f"{where}: {error.message}"
        error.param = f"{where}.{error.param}" if error.param else where
        raise error from None
    refused = params.refusal()
    if refused is not None:
        name, message, code = refused
        raise errors.bad_request(message, f"{where}.{name}", code)
    return params


def _prompts(req: GenerateRequest) -> tuple[list[str | list[int]], bool, str]:
    """The prompts, whether the request named just one, and the field they came from."""
    if req.text is not None and req.input_ids is not None:
        raise errors.bad_request("give text or input_ids, not both", "input_ids")
    if req.text is None and req.input_ids is None:
        raise errors.bad_request("one of text and input_ids is required", "text")
    if req.text is not None:
        texts = [req.text] if isinstance(req.text, str) else req.text
        if not texts:
            raise errors.bad_request("text must not be an empty list", "text")
        if any(t == "" for t in texts):
            raise errors.bad_request("text must not be empty", "text")
        return list(texts), isinstance(req.text, str), "text"
    ids = req.input_ids or []
    if not ids:
        raise errors.bad_request("input_ids must not be empty", "input_ids")
    single = isinstance(ids[0], int)
    batch: list[list[int]] = [ids] if single else ids  # type: ignore[list-item]
    if any(not p for p in batch):
        raise errors.bad_request("a token-id prompt must not be empty", "input_ids")
    if any(not 0 <= t <= INT32_MAX for p in batch for t in p):
        raise errors.bad_request("token ids must be in [0, 2**31)", "input_ids")
    return list(batch), single, "input_ids"


def _entry_ids(rid: str | list[str] | None, num_prompts: int, n: int) -> list[str]:
    """meta_info.id of each completion: SGLang's rid (or rid_k over a batch), or a fresh id."""
    count = num_prompts * n
    if rid is None:
        return [uuid.uuid4().hex for _ in range(count)]
    if isinstance(rid, str):
        return [rid] if count == 1 else [f"{rid}_{k}" for k in range(count)]
    return list(rid) if n == 1 else [f"{r}_{j}" for r in rid for j in range(n)]


def plan_generate(req: GenerateRequest, model: str) -> _Plan:
    """Check a /generate request against itself (400 naming the field) and turn it into worker calls."""
    prompts, single, prompt_param = _prompts(req)
    count = len(prompts)
    raw = req.sampling_params
    if isinstance(raw, list):
        if single:
            raise errors.bad_request("sampling_params must be one object for a single prompt", "sampling_params")
        if len(raw) != count:
            raise errors.bad_request(
                f"sampling_params has {len(raw)} entries for a batch of {count} prompts", "sampling_params"
            )
        sampling = [_sampling(r, f"sampling_params.{i}") for i, r in enumerate(raw)]
    else:
        sampling = [_sampling(raw or {}, "sampling_params")] * count
    n = sampling[0].n or 1
    if any((s.n or 1) != n for s in sampling):
        raise errors.bad_request("n must be the same for every prompt of a batch", "sampling_params.n")
    if isinstance(req.rid, list):
        if single:
            raise errors.bad_request("rid must be a string for a single prompt", "rid")
        if len(req.rid) != count:
            raise errors.bad_request(f"rid has {len(req.rid)} entries for a batch of {count} prompts", "rid")
        if len(set(req.rid)) != count:
            raise errors.bad_request("rid must not repeat an id within a request", "rid")
    if req.rid == "" or (isinstance(req.rid, list) and "" in req.rid):
        raise errors.bad_request("rid must not be empty", "rid")
    logprobs = [bool(v) for v in _per_prompt(req.return_logprob, count, "return_logprob", False)]
    top = _per_prompt(req.top_logprobs_num, count, "top_logprobs_num", 0)
    if any(not 0 <= k <= MAX_TOP_LOGPROBS for k in top):
        raise errors.bad_request(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}]", "top_logprobs_num")
    starts = _per_prompt(req.logprob_start_len, count, "logprob_start_len", -1)
    if any(start < -1 for start in starts):
        raise errors.bad_request(
            "logprob_start_len must be -1 (output tokens only) or a prompt position", "logprob_start_len"
        )
    jobs = []
    for i, prompt in enumerate(prompts):
        request = pb.GenerateRequest(sampling=sampling[i].to_pb(logprobs[i], top[i]))
        if logprobs[i] and starts[i] >= 0:
            request.prompt_logprobs = top[i]
        if isinstance(prompt, str):
            request.text = prompt
            routing = prompt
        else:
            request.token_ids.ids.extend(prompt)
            routing = "ids:" + " ".join(map(str, prompt))  # as the completions route keys token prompts
        jobs.append(PromptJob(request, RouteKey(model, routing), i * n, n, prompt_param))
    return _Plan(
        model=model,
        run_id=req.rid if isinstance(req.rid, str) else uuid.uuid4().hex,
        jobs=jobs,
        n=n,
        entry_ids=_entry_ids(req.rid, count, n),
        logprobs=logprobs,
        top_logprobs=top,
        logprob_starts=starts,
        single=single and n == 1,
        constraint=next((s.constraint() for s in sampling if s.constraint()), None),
    )


# --------------------------------------------------------------------------------------------- answers


class _Completion:
    """One completion's output so far, as SGLang reports it: cumulative text and output_ids."""

    __slots__ = ("id", "prompt", "text", "output_ids", "logprobs", "finish")

    def __init__(self, entry_id: str, prompt: int) -> None:
        self.id = entry_id
        self.prompt = prompt
        self.text = ""
        self.output_ids: list[int] = []
        self.logprobs: list[pb.TokenLogprob] = []
        self.finish: Finish | None = None

    def add(self, event: Delta | Finish) -> None:
        if isinstance(event, Delta):
            self.text += event.text
            self.output_ids.extend(event.token_ids)
            self.logprobs.extend(event.logprobs)
            return
        self.finish = event
        self.output_ids.extend(event.token_ids)
        if isinstance(event.matched, int):
            self.output_ids.append(event.matched)  # SGLang's output_ids end with the stop token that matched

    def finish_reason(self) -> dict[str, Any] | None:
        """SGLang's finish_reason object: {"type": "stop", "matched": ...} or {"type": "length", "length": ...}."""
        f = self.finish
        if f is None:
            return None
        if f.finish_reason == "length":
            return {"type": "length", "length": f.completion_tokens}
        return {"type": "stop", "matched": f.matched}


def _logprob(logprob: float, token_id: int, token: str, with_text: bool) -> list[Any]:
    """SGLang's (logprob, token id, text or null); nothing predicts a prompt's first token: its logprob is null."""
    return [None if math.isnan(logprob) else logprob, token_id, token if with_text else None]


def _token_logprobs(items: Any, with_text: bool) -> list[list[Any]]:
    return [_logprob(lp.logprob, lp.token_id, lp.token, with_text) for lp in items]


def _top_logprobs(items: Any, with_text: bool) -> list[list[list[Any]] | None]:
    # a position without alternatives (a prompt's first token) is null, as in SGLang
    return [_token_logprobs(lp.top_logprobs, with_text) if lp.top_logprobs else None for lp in items]


class _Answer:
    """The completions of one /generate request and their JSON, for the answer and for each stream chunk.

    Plain dicts encoded by orjson, as the OpenAI stream's ChunkEncoder does: a stream re-sends every
    completion's output so far, so this is the per-token path.
    """

    def __init__(self, plan: _Plan, run: GenerationRun, with_text: bool) -> None:
        self.plan = plan
        self.run = run
        self.with_text = with_text
        self.started = time.monotonic()
        self.completions = [_Completion(entry, k // plan.n) for k, entry in enumerate(plan.entry_ids)]

    def output(self, k: int) -> dict[str, Any]:
        """Completion k as SGLang's {"text", "output_ids", "meta_info"}."""
        c = self.completions[k]
        finish = c.finish
        meta: dict[str, Any] = {
            "id": c.id,
            "finish_reason": c.finish_reason(),
            "prompt_tokens": self.run.num_prompt_tokens[c.prompt],
            "completion_tokens": finish.completion_tokens if finish else len(c.output_ids),
            "cached_tokens": finish.cached_prompt_tokens if finish else 0,
        }
        if finish is not None:
            meta["e2e_latency"] = time.monotonic() - self.started
        if self.plan.logprobs[c.prompt]:
            w = self.with_text
            start = self.plan.logprob_starts[c.prompt]
            info = self.run.prompts[c.prompt]
            prompt = info.prompt_logprobs[start:] if start >= 0 and info is not None else []
            meta["input_token_logprobs"] = _token_logprobs(prompt, w)
            meta["output_token_logprobs"] = _token_logprobs(c.logprobs, w)
            if self.plan.top_logprobs[c.prompt]:
                meta["input_top_logprobs"] = _top_logprobs(prompt, w)
                meta["output_top_logprobs"] = _top_logprobs(c.logprobs, w)
        return {"text": c.text, "output_ids": c.output_ids, "meta_info": meta}

    def chunk(self, k: int) -> bytes:
        """One SSE event: completion k so far, with its index when the request had several."""
        body = self.output(k)
        if not self.plan.single:
            body["index"] = k
        return b"data: " + orjson.dumps(body) + b"\n\n"

    def body(self) -> bytes:
        outputs = [self.output(k) for k in range(len(self.completions))]
        return orjson.dumps(outputs[0] if self.plan.single else outputs)

    def note(self, record: RequestRecord) -> None:
        """The usage facts of the request's log line."""
        record.completion_tokens = sum(c.finish.completion_tokens for c in self.completions if c.finish)
        cached: dict[int, int] = {}
        for c in self.completions:
            if c.finish is not None:
                cached[c.prompt] = max(cached.get(c.prompt, 0), c.finish.cached_prompt_tokens)
        record.cached_tokens = sum(cached.values())
        record.finish_reasons = [c.finish.finish_reason if c.finish else "" for c in self.completions]


class NativeModelInfo(BaseModel):
    """GET /get_model_info: SGLang's fields, then what the worker reports."""

    model_path: str | None
    tokenizer_path: str | None  # the worker loads its tokenizer from the model's own folder
    is_generation: bool = True
    preferred_sampling_params: str | None = None
    served_model_name: str
    max_context_length: int | None
    model_type: str | None
    vocab_size: int | None
    has_chat_template: bool


class WorkerLoadInfo(BaseModel):
    num_running: int
    num_waiting: int
    kv_cache_usage: float


class WorkerInfo(BaseModel):
    address: str
    model: str | None
    healthy: bool
    in_flight: int  # this gateway's open calls on the worker
    load: WorkerLoadInfo  # the worker's own last report
    max_context_length: int | None
    model_path: str | None


class ServerInfo(BaseModel):
    """GET /get_server_info: the gateway's version and settings (the number of API keys, not them), and its workers."""

    version: str | None
    settings: dict[str, Any]  # GatewayConfig's fields
    requests_in_flight: int
    workers: list[WorkerInfo]


def _version() -> str | None:
    try:
        return importlib.metadata.version("sfllm")
    except importlib.metadata.PackageNotFoundError:
        return None


# -------------------------------------------------------------------------------------------- handlers


class NativeServing:
    """The native routes' logic; admission shares the OpenAI routes' in-flight count and limit."""

    def __init__(self, openai: OpenAIServing) -> None:
        self.openai = openai
        self.config = openai.config
        self.router = openai.router
        self.pool = openai.pool
        self.metrics = openai.metrics

    def model_for(self, requested: str | None) -> str:
        """The model a request goes to: the one named, else the one model served."""
        if requested:
            return requested
        served = sorted(self.router.models()) or sorted({w.model for w in self.router.workers.values() if w.model})
        if not served:
            raise errors.no_healthy_worker()
        if len(served) > 1:
            raise errors.bad_request(f"this gateway serves several models ({', '.join(served)}); name one", "model")
        return served[0]

    async def generate(self, req: GenerateRequest, http: Request) -> Response:
        plan = plan_generate(req, self.model_for(req.model))
        record = RequestRecord(plan.run_id, "generate", plan.model, req.stream, plan.n)
        openai = self.openai
        if openai.in_flight >= self.config.max_in_flight:
            return self._fail(record, errors.overloaded("the gateway is at its in-flight request limit"))
        openai.in_flight += 1
        self.metrics.num_requests_running.set(openai.in_flight)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                openai.in_flight -= 1
                self.metrics.num_requests_running.set(openai.in_flight)
                record.finish(self.metrics)

        run = GenerationRun(
            plan.run_id,
            plan.jobs,
            self.router,
            self.pool,
            self.metrics,
            self.config.max_attempts,
            not req.stream,
            max_migrations=self.config.max_migrations,
            start_timeout_s=self.config.start_timeout_s,
        )
        record.run = run
        try:
            accepted = await _unless_disconnected(run.start(), http)
        except APIError as exc:
            response = self._fail(record, _native_error(exc, plan))
            release()
            return response
        except BaseException:
            release()
            raise
        if not accepted:  # the client left while its prompts waited or prefilled: stop the work now
            await run.close()
            record.status, record.disconnected = 499, True
            release()
            return Response(status_code=499)
        record.prompt_tokens = sum(run.num_prompt_tokens)
        answer = _Answer(plan, run, req.return_text_in_logprobs)
        if req.stream:

            def on_close() -> None:
                run.cancel()
                release()

            return _StreamResponse(self._stream(answer, record), on_close)  # type: ignore[arg-type]
        try:
            if not await _unless_disconnected(self._collect(answer), http):
                record.status, record.disconnected = 499, True
                return Response(status_code=499)
            answer.note(record)
            return Response(answer.body(), media_type="application/json")
        except APIError as exc:
            return self._fail(record, exc)
        finally:
            run.cancel()
            release()

    @staticmethod
    async def _collect(answer: _Answer) -> None:
        async for event in answer.run.events():
            answer.completions[event.choice].add(event)

    @staticmethod
    async def _stream(answer: _Answer, record: RequestRecord) -> AsyncIterator[bytes]:
        """The SSE body: each completion's output so far whenever it grew, then [DONE] (or an error event)."""
        try:
            async for batch in answer.run.batches():
                grown: dict[int, None] = {}  # completions in order of arrival, each sent once per batch
                for event in batch:
                    answer.completions[event.choice].add(event)
                    grown[event.choice] = None
                yield b"".join(answer.chunk(k) for k in grown)
            answer.note(record)
            yield SSE_DONE_BYTES
        except APIError as exc:
            record.status, record.error = exc.status, exc.code or exc.type
            answer.note(record)
            yield f"data: {exc.body().model_dump_json()}\n\n".encode() + SSE_DONE_BYTES
        except (asyncio.CancelledError, GeneratorExit):
            record.disconnected = True
            raise
        finally:
            answer.run.cancel()

    def _fail(self, record: RequestRecord, exc: APIError) -> JSONResponse:
        record.status, record.error = exc.status, exc.code or exc.type
        record.finish(self.metrics)
        return exc.response()

    def model_info(self, requested: str | None) -> NativeModelInfo:
        model = self.model_for(requested)
        info = self.router.model_info(model)
        if info is None:
            if requested and not any(w.model == model for w in self.router.workers.values()):
                raise errors.model_not_found(model)
            raise errors.no_healthy_worker()
        path = info.model_path or None
        return NativeModelInfo(
            model_path=path,
            tokenizer_path=path,
            served_model_name=info.served_model_name,
            max_context_length=info.max_context_length or None,
            model_type=info.model_type or None,
            vocab_size=info.vocab_size or None,
            has_chat_template=info.has_chat_template,
        )

    def server_info(self) -> ServerInfo:
        settings = dataclasses.asdict(self.config)
        settings["api_keys"] = len(settings["api_keys"])  # how many, never which
        workers = [
            WorkerInfo(
                address=w.address,
                model=w.model,
                healthy=w.healthy,
                in_flight=w.in_flight,
                load=WorkerLoadInfo.model_validate(dataclasses.asdict(w.load)),
                max_context_length=w.max_context_length,
                model_path=(w.info.model_path or None) if w.info is not None else None,
            )
            for w in sorted(self.router.workers.values(), key=lambda w: w.address)
        ]
        return ServerInfo(
            version=_version(), settings=settings, requests_in_flight=self.openai.in_flight, workers=workers
        )

    async def health_generate(self) -> JSONResponse:
        """One greedy token from a worker of each model in turn until one works: 200, else 503."""
        failure = "no worker serves a model"
        for model in sorted(self.router.models()):
            sampling = pb.SamplingParams(max_tokens=1, temperature=0.0)
            job = PromptJob(pb.GenerateRequest(text="s", sampling=sampling), RouteKey(model), 0, 1)
            run = GenerationRun(
                f"health-{uuid.uuid4().hex}",
                [job],
                self.router,
                self.pool,
                self.metrics,
                self.config.max_attempts,
                True,
            )
            try:
                async with asyncio.timeout(HEALTH_GENERATE_TIMEOUT_S):
                    await run.start()
                    async for _ in run.events():
                        pass
                return JSONResponse({"status": "ok", "model": model, "worker": run.stats.workers[-1]})
            except APIError as exc:
                failure = f"{model}: {exc.message}"
            except TimeoutError:
                failure = f"{model}: no token within {HEALTH_GENERATE_TIMEOUT_S:g}s"
            finally:
                await run.close()
        return errors.no_healthy_worker(f"no worker could generate a token ({failure})").response()


def _native_error(exc: APIError, plan: _Plan) -> APIError:
    """A worker's refusal with the field named as this API names it (max_new_tokens, not max_tokens)."""
    if exc.status == 400 and exc.param:
        if exc.param == "constraint" and plan.constraint:
            exc.param = f"sampling_params.{plan.constraint}"
        else:
            exc.param = _FROM_PB.get(exc.param, exc.param)
    return exc


def register(
    app: FastAPI,
    serving: OpenAIServing,
    dependencies: list[Any],
    read_json: Callable[[Request, int], Awaitable[Any]],
) -> None:
    """Add the native routes to the app; `dependencies` guard them as they guard the OpenAI routes.

    /health_generate is left open, as /health is (SGLang's API key spares /health* too).
    """
    native = NativeServing(serving)
    limit = serving.config.max_request_bytes

    @app.post("/generate", dependencies=dependencies)
    async def generate(request: Request) -> Response:
        req = parse_generate(await read_json(request, limit))
        return await native.generate(req, request)

    @app.get("/get_model_info", dependencies=dependencies)
    async def get_model_info(model: str | None = None) -> NativeModelInfo:
        return native.model_info(model)

    @app.get("/get_server_info", dependencies=dependencies)
    async def get_server_info() -> ServerInfo:
        return native.server_info()

    @app.get("/health_generate")
    async def health_generate() -> JSONResponse:
        return await native.health_generate()
