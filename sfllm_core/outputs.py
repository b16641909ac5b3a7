"""What the engine hands back: per-step deltas for streaming, whole results for offline use.

StepOutput and TokenLogprob are msgspec structs: an engine process sends them as they are, one
msgpack message per step (worker/messages.py), and building them is cheaper than a dataclass.
"""

from dataclasses import dataclass

import msgspec


class TokenLogprob(msgspec.Struct, array_like=True):
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = msgspec.field(default_factory=list)  # (token_id, logprob), best first


class StepOutput(msgspec.Struct, array_like=True):
    """New tokens of one request from one engine step; the last one has finished=True."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_token_id: int | None = None  # the stop/eos token that ended it (not part of token_ids)
    logprobs: list[TokenLogprob] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    num_computed_tokens: int = 0  # tokens whose K/V the sequence held (how far an aborted prefill got)
    error: str | None = None
    # With SamplingParams.prompt_logprobs, on a request's first output only: prompt tokens 1..P-1,
    # each given the ones before it (nothing predicts token 0). None if it ended before its prefill did.
    prompt_logprobs: list[TokenLogprob] | None = None
    num_accepted_draft_tokens: int = 0  # of the request's tokens so far, drafts that verification kept


@dataclass
class GenerationOutput:
    """A finished request, as `InferenceEngine.generate` returns it."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    text: str | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob] | None = None  # as in StepOutput: prompt tokens 1..P-1


@dataclass
class EngineLoad:
    """A snapshot for routers and metrics."""

    num_running: int
    num_waiting: int
    kv_pages_used: int
    kv_pages_total: int
    prefix_cache_hit_rate: float = 0.0
    num_preemptions: int = 0
    # Speculative decoding, since start: draft tokens proposed and verified, and of those accepted;
    # num_drafts counts the drafts (one per sequence and verify step), so the mean acceptance length
    # is 1 + num_accepted_draft_tokens / num_drafts.
    num_draft_tokens: int = 0
    num_accepted_draft_tokens: int = 0
    num_drafts: int = 0

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_pages_used / self.kv_pages_total if self.kv_pages_total else 0.0
