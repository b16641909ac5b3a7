"""The OpenAI HTTP protocol as the gateway speaks it: request and response schemas, and SSE framing.

Requests accept OpenAI's fields plus vLLM's common sampling extensions (top_k, min_p,
repetition_penalty, ignore_eos). OpenAI fields the engine cannot honour are refused by name
(`first_unsupported_field`) instead of being silently dropped.
"""

import time
import uuid
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

MAX_N = 128
MAX_TOP_LOGPROBS = 20
SEED_LIMIT = 2**63  # the engine's seeds are unsigned 63-bit
INT32_MAX = 2**31 - 1  # token counts and ids travel as int32 to the worker


# ---------------------------------------------------------------------------------------------- errors


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# -------------------------------------------------------------------------------------------- requests


def _is_none(value: Any) -> bool:
    return value is None


def _is_falsy(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {} or value == ""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


class _RequestBase(BaseModel):
    """Fields and checks shared by chat and text completions."""

    # extra fields are kept so that first_unsupported_field can name them in a 400; NaN and infinities
    # would pass range checks that compare with them (and reach the sampler)
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    # OpenAI fields whose every non-default value changes the result in ways the engine cannot honour:
    # name -> predicate "this value is harmless" (absent, null, empty, or the default)
    UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = {}
    # OpenAI fields accepted and ignored because they do not change the generated text
    IGNORED: ClassVar[frozenset[str]] = frozenset(
        {"metadata", "service_tier", "safety_identifier", "parallel_tool_calls", "prompt_cache_retention"}
    )

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=INT32_MAX)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, lt=SEED_LIMIT)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None  # vLLM's extension: stop after any of these token ids
    skip_special_tokens: bool = True  # vLLM's extension: leave special tokens out of the text
    user: str | None = None
    prompt_cache_key: str | None = None  # OpenAI's cache-routing hint; the prefix policy uses it
    store: bool | None = None

    @field_validator("stop_token_ids")
    @classmethod
    def _check_stop_token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value and not all(0 <= t <= INT32_MAX for t in value):
            raise ValueError("token ids must be in [0, 2**31)")
        return value

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else value or []
        if any(s == "" for s in stops):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _check_stream_options(self) -> "_RequestBase":
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stop_list(self) -> list[str]:
        """Stop strings as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def first_unsupported_field(self) -> tuple[str, str] | None:
        """(field, message) for the first field this server refuses, or None if every field is served."""
        if self.store:
            return "store", "store=true is not supported by this server"
        for name, value in (self.model_extra or {}).items():
            if name in self.IGNORED:
                continue
            harmless = self.UNSUPPORTED.get(name)
            if harmless is None:
                return name, f"Unrecognized request argument supplied: {name}"
            if not harmless(value):
                return name, f"{name} is not supported by this server"
        return None


class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self) -> "TextContentPart":
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported; only 'text' is")
        if self.text is None:
            raise ValueError("a text content part needs a 'text' field")
        return self


class ChatMessage(BaseModel):
    """One message of a conversation; text content only (a string or a list of text parts)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContentPart] | None = None
    name: str | None = None

    @model_validator(mode="after")
    def _check(self) -> "ChatMessage":
        if self.role == "tool" or (self.model_extra or {}).get("tool_calls"):
            raise ValueError("tool messages and tool calls are not supported by this server")
        if self.content is None:
            raise ValueError(f"a {self.role} message needs content")
        # clients echo assistant messages back with empty extras (refusal: null, tool_calls: []); anything else matters
        for name, value in (self.model_extra or {}).items():
            if not _is_falsy(value):
                raise ValueError(f"the message field {name!r} is not supported by this server")
        return self

    def text(self) -> str:
        """The message's content as one string."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text or "" for part in self.content or [])

    def template_role(self) -> str:
        """The role a chat template understands: OpenAI's 'developer' is a system message."""
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(_RequestBase):
    """POST /v1/chat/completions."""

    UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "tools": _is_falsy,
        "tool_choice": lambda v: v in (None, "none", "auto"),
        "functions": _is_falsy,
        "function_call": lambda v: v in (None, "none", "auto"),
        "response_format": lambda v: v is None or (isinstance(v, dict) and v.get("type") == "text"),
        "logit_bias": _is_falsy,
        "audio": _is_none,
        "modalities": lambda v: v in (None, ["text"]),
        "prediction": _is_none,
        "web_search_options": _is_none,
        "reasoning_effort": _is_none,
        "verbosity": _is_none,
        "moderation": _is_none,
        "prompt_cache_options": _is_none,
    }

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=INT32_MAX)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _check_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def max_new_tokens(self) -> int | None:
        """max_completion_tokens (OpenAI's current name) wins over the deprecated max_tokens."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


PromptInput = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_RequestBase):
    """POST /v1/completions."""

    UNSUPPORTED: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "best_of": lambda v: v in (None, 1),
        "echo": _is_falsy,
        "suffix": _is_falsy,
        "logit_bias": _is_falsy,
    }

    prompt: PromptInput
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    add_special_tokens: bool = True  # vLLM's extension: whether text prompts get the tokenizer's BOS

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, value: PromptInput) -> PromptInput:
        if isinstance(value, list):
            if not value:
                raise ValueError("prompt must not be an empty list")
            if any(isinstance(p, list) and not p for p in value):
                raise ValueError("a token-id prompt must not be empty")
            if any(
                isinstance(t, int) and not 0 <= t <= INT32_MAX
                for p in value
                for t in (p if isinstance(p, list) else [p])
            ):
                raise ValueError("token ids must be in [0, 2**31)")
        return value

    def prompts(self) -> list[str | list[int]]:
        """The prompts of this request, each a string or a list of token ids (one choice set per prompt)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def max_new_tokens(self) -> int:
        """OpenAI's default for completions is 16 tokens."""
        return self.max_tokens if self.max_tokens is not None else 16


# ------------------------------------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    """An OpenAI-style object id such as chatcmpl-<hex>."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] | None = None
    text_offset: list[int] = Field(default_factory=list)


FinishReason = Literal["stop", "length"]


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_nulls(self, handler: Callable[["DeltaMessage"], dict[str, Any]]) -> dict[str, Any]:
        # OpenAI's deltas carry only the keys that changed: {"role": ...} first, then {"content": ...}, last {}
        return {k: v for k, v in handler(self).items() if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReason | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class CompletionChunk(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=now)
    owned_by: str = "sfllm"
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------------- SSE

SSE_DONE = "data: [DONE]\n\n"


def sse_event(payload: BaseModel, include_usage: bool = True) -> str:
    """One server-sent event as OpenAI frames it; chunks carry "usage": null only when usage was asked for."""
    exclude = None if include_usage else {"usage"}
    return f"data: {payload.model_dump_json(exclude=exclude)}\n\n"


class ChunkEncoder:
    """One stream's SSE events as plain dicts encoded by orjson: the per-token path, ~20x cheaper than pydantic.

    Each event is exactly what `sse_event` makes of the chunk models above (tests hold the two together).
    """

    def __init__(
        self, request_id: str, model: str, chat: bool, include_usage: bool, created: int | None = None
    ) -> None:
        self.include_usage = include_usage
        self._head = {
            "id": request_id,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": now() if created is None else created,
            "model": model,
        }

    def event(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        body = {**self._head, "choices": choices, "system_fingerprint": None}
        if self.include_usage:
            body["usage"] = usage
        return b"data: " + orjson.dumps(body) + b"\n\n"

    @staticmethod
    def completion_choice(
        index: int, text: str, logprobs: dict[str, Any] | None = None, finish_reason: str | None = None
    ) -> dict[str, Any]:
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}

    @staticmethod
    def chat_choice(
        index: int, delta: dict[str, str], logprobs: dict[str, Any] | None = None, finish_reason: str | None = None
    ) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


SSE_DONE_BYTES = SSE_DONE.encode()
