"""Per-request sampling parameters, validated once when a request enters the engine."""

from dataclasses import dataclass, field
from typing import Literal

from sfllm_core.errors import InvalidRequestError

MAX_LOGIT_BIAS = 300  # most token ids one request may bias (OpenAI's own limit)
LOGIT_BIAS_RANGE = 100.0


@dataclass
class Constraint:
    """A grammar every generated token must keep the output inside (constrained decoding).

    kind "json_schema": spec is a JSON Schema as text; "json_object": any JSON object (spec empty);
    "regex": spec is a regular expression the whole output matches; "ebnf": spec is a GBNF grammar
    whose start rule is root.
    """

    kind: Literal["json_schema", "json_object", "regex", "ebnf"]
    spec: str = ""


@dataclass
class SamplingParams:
    """How one sequence is sampled and when it stops (token level; stop strings live in the worker).

    temperature 0 means greedy. top_k -1 (or 0) disables top-k; top_p 1.0 and min_p 0.0 disable theirs.
    repetition_penalty follows the CTRL / transformers convention (1.0 = off); presence and
    frequency penalties follow OpenAI's (0.0 = off) and count generated tokens only.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    # Logprobs of the prompt's tokens (each given the ones before it), with this many alternatives; None: off.
    prompt_logprobs: int | None = None
    constraint: Constraint | None = None
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self, vocab_size: int) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {self.max_tokens}", "max_tokens")
        if not self.temperature >= 0.0:  # also rejects NaN
            raise InvalidRequestError(f"temperature must be >= 0, got {self.temperature}", "temperature")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequestError(f"top_k must be -1 (disabled) or >= 0, got {self.top_k}", "top_k")
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if not self.repetition_penalty > 0.0:
            raise InvalidRequestError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}", "repetition_penalty"
            )
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise InvalidRequestError(
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}", "presence_penalty"
            )
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise InvalidRequestError(
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}", "frequency_penalty"
            )
        if not 0 <= self.top_logprobs <= 20:
            raise InvalidRequestError(f"top_logprobs must be in [0, 20], got {self.top_logprobs}", "top_logprobs")
        for tok in self.stop_token_ids:
            if not 0 <= tok < vocab_size:
                raise InvalidRequestError(
                    f"stop_token_ids contains {tok}, outside the vocabulary [0, {vocab_size})", "stop_token_ids"
                )
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise InvalidRequestError(
                f"prompt_logprobs must be in [0, 20], got {self.prompt_logprobs}", "prompt_logprobs"
            )
        if len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(
                f"logit_bias has {len(self.logit_bias)} entries, more than the limit of {MAX_LOGIT_BIAS}", "logit_bias"
            )
        for tok, bias in self.logit_bias.items():
            if not 0 <= tok < vocab_size:
                raise InvalidRequestError(
                    f"logit_bias has token id {tok}, outside the vocabulary [0, {vocab_size})", "logit_bias"
                )
            if not -LOGIT_BIAS_RANGE <= bias <= LOGIT_BIAS_RANGE:
                raise InvalidRequestError(f"logit_bias values must be in [-100, 100], got {bias}", "logit_bias")
        if self.constraint is not None:
            if self.constraint.kind not in ("json_schema", "json_object", "regex", "ebnf"):
                raise InvalidRequestError(f"unknown constraint kind {self.constraint.kind!r}", "constraint")
            # Parsed here (cached), so that a bad schema is refused before the request queues.
            from sfllm_core.engine.grammar import check_constraint  # imports xgrammar on first use

            check_constraint(self.constraint)
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise InvalidRequestError(f"seed must be in [0, 2**63), got {self.seed}", "seed")
