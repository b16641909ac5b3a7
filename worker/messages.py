"""What crosses between a worker's three processes, as msgspec structs sent over ZeroMQ (msgpack).

    front (gRPC, tokenizer) ──AddEosTokens, TokenizerFile, AddRequest / AbortRequests, Shutdown──► engine (owns the GPU)
    engine ──StepBatch, one per engine step──► detokenizer ──TextBatch, one per batch it read──► front
    engine ──EngineReady / LoadReport / Rejected──► front

Batched messages carry every request a step touched, so the message rate follows the engine's
step rate, not the token rate. `Channels` names the sockets; each process binds what it pulls from.
"""

import os
import tempfile
from dataclasses import dataclass

import msgspec

from sfllm_core.engine.limits import EngineLimits
from sfllm_core.outputs import EngineLoad, StepOutput
from sfllm_core.sampling_params import SamplingParams

# -- front -> engine -------------------------------------------------------------------------------


class DetokParams(msgspec.Struct, array_like=True, frozen=True):
    """How the detokenizer turns one request's tokens into text; the engine passes it along unread."""

    stops: list[str]
    skip_special_tokens: bool
    # Output generated before (a continued request): the text state starts after it, its text not sent again.
    continuation: list[int] = msgspec.field(default_factory=list)


class AddRequest(msgspec.Struct, tag="add", array_like=True):
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    detok: DetokParams
    continuation: list[int] = msgspec.field(default_factory=list)  # output the sequence starts with


class AbortRequests(msgspec.Struct, tag="abort", array_like=True):
    rids: list[str]


class AddEosTokens(msgspec.Struct, tag="eos", array_like=True):
    """The tokenizer's end tokens, sent before any request: the engine process loads no tokenizer."""

    token_ids: list[int]


class TokenizerFile(msgspec.Struct, tag="tokenizer", array_like=True):
    """Where the front saved its tokenizer (one tokenizer.json), sent before any request: the engine
    reads its vocabulary from there for constrained decoding, on the first constrained request."""

    path: str


class Shutdown(msgspec.Struct, tag="shutdown", array_like=True):
    """Abort everything and exit."""


ToEngine = AddRequest | AbortRequests | AddEosTokens | TokenizerFile | Shutdown

# -- engine -> detokenizer -------------------------------------------------------------------------


class StepBatch(msgspec.Struct, tag="step", array_like=True):
    """One engine step's outputs; `announce` carries each request's DetokParams with its first output."""

    announce: list[tuple[str, DetokParams]]
    outputs: list[StepOutput]


# -- engine -> front -------------------------------------------------------------------------------


class EngineInfo(msgspec.Struct, array_like=True):
    served_model_name: str
    model_type: str
    eos_token_ids: list[int]
    limits: EngineLimits
    pid: int


class EngineReady(msgspec.Struct, tag="ready", array_like=True):
    info: EngineInfo


class LoadReport(msgspec.Struct, tag="load", array_like=True):
    load: EngineLoad


class Rejected(msgspec.Struct, tag="rejected", array_like=True):
    """The engine refused a request before it ran; kind is "invalid" or "queue_full"."""

    rid: str
    kind: str
    message: str
    param: str | None = None


class EngineFailed(msgspec.Struct, tag="engine_failed", array_like=True):
    """The engine could not start (a bad checkpoint, too little memory)."""

    error: str


# -- detokenizer -> front --------------------------------------------------------------------------


class TextLogprob(msgspec.Struct, array_like=True):
    token_id: int
    token: str  # the token decoded alone
    logprob: float
    top: list[tuple[int, str, float]]  # (token_id, token, logprob), best first


class TextOutput(msgspec.Struct, array_like=True):
    """A request's new tokens and text since the detokenizer's last TextBatch, and its end if it came."""

    rid: str
    token_ids: list[int]
    text: str
    logprobs: list[TextLogprob] | None
    num_cached_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_string: str | None = None
    stop_token_id: int | None = None
    error: str | None = None
    # The detokenizer ended it (a stop string) while the engine still runs it: the front aborts it there.
    abort_engine: bool = False
    # StepOutput.prompt_logprobs with text (prompt tokens 1..P-1), on the request's first output.
    prompt_logprobs: list[TextLogprob] | None = None
    num_accepted_draft_tokens: int = 0  # StepOutput's: the request's drafts kept so far


class TextBatch(msgspec.Struct, tag="text", array_like=True):
    outputs: list[TextOutput]


class DetokReady(msgspec.Struct, tag="detok_ready", array_like=True):
    pass


ToFront = TextBatch | LoadReport | Rejected | EngineReady | EngineFailed | DetokReady


@dataclass(frozen=True)
class Channels:
    """The ZeroMQ endpoints of one worker (ipc sockets in a private folder)."""

    engine: str  # the engine pulls requests here (the front binds its push end)
    detokenizer: str  # the detokenizer pulls step batches here
    front: str  # the front pulls text batches and engine reports here

    @classmethod
    def create(cls) -> "Channels":
        folder = tempfile.mkdtemp(prefix="sfllm-worker-")
        return cls(*(f"ipc://{os.path.join(folder, name)}" for name in ("engine", "detokenizer", "front")))

    def remove(self) -> None:
        folder = None
        for address in (self.engine, self.detokenizer, self.front):
            path = address.removeprefix("ipc://")
            folder = os.path.dirname(path)
            if os.path.exists(path):
                os.unlink(path)
        if folder and os.path.isdir(folder):
            os.rmdir(folder)


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def decoder(kind: type) -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(kind)
