"""EngineLimits: what a request must fit, checked once by whoever holds a copy (the engine, or its front)."""

from dataclasses import dataclass

from sfllm_core.errors import ContextLengthError, InvalidRequestError
from sfllm_core.sampling_params import SamplingParams


@dataclass(frozen=True)
class EngineLimits:
    """The numbers of one built engine that bound a request; a worker's front gets them from its engine process."""

    vocab_size: int
    max_context_length: int
    page_size: int
    num_pages: int

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens the KV cache holds in all: no request may need more."""
        return self.num_pages * self.page_size

    def check_prompt(self, token_ids: list[int], param: str = "prompt") -> None:
        """Raise InvalidRequestError (ContextLengthError) for an empty, out-of-vocabulary or too long prompt."""
        if not token_ids:
            raise InvalidRequestError(f"{param} must not be empty", param)
        vocab = self.vocab_size
        for tok in token_ids:
            if not isinstance(tok, int) or not 0 <= tok < vocab:
                raise InvalidRequestError(
                    f"{param} contains token id {tok!r}, outside the vocabulary [0, {vocab})", param
                )
        if len(token_ids) >= self.max_context_length:
            raise ContextLengthError(self.max_context_length, len(token_ids))

    def check(self, token_ids: list[int], params: SamplingParams, param: str = "prompt") -> None:
        """Raise InvalidRequestError naming the field when the request cannot run on this engine."""
        self.check_prompt(token_ids, param)
        self.check_fits(len(token_ids), params)

    def check_fits(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """The checks of `check` past the prompt's own: valid params, and room for their max_tokens."""
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("params must be a SamplingParams", "params")
        params.validate(self.vocab_size)
        if num_prompt_tokens + params.max_tokens > self.max_context_length:
            raise ContextLengthError(self.max_context_length, num_prompt_tokens, params.max_tokens)
        pages = -(-(num_prompt_tokens + params.max_tokens) // self.page_size)
        if pages > self.num_pages:
            raise InvalidRequestError(
                f"the request needs {pages} KV pages but the cache holds {self.num_pages}", "max_tokens"
            )

    def check_continuation(self, token_ids: list[int], params: SamplingParams, param: str = "continuation") -> None:
        """Raise InvalidRequestError for output already generated that is out of vocabulary or leaves no
        token to generate (it counts toward max_tokens)."""
        vocab = self.vocab_size
        for tok in token_ids:
            if not isinstance(tok, int) or not 0 <= tok < vocab:
                raise InvalidRequestError(
                    f"{param} contains token id {tok!r}, outside the vocabulary [0, {vocab})", param
                )
        if params.prompt_logprobs is not None:
            raise InvalidRequestError(f"{param} cannot be combined with prompt_logprobs", param)
        if len(token_ids) >= params.max_tokens:
            raise InvalidRequestError(
                f"{param} has {len(token_ids)} tokens, leaving none of max_tokens {params.max_tokens}", param
            )

    def room(self, num_prompt_tokens: int) -> int:
        """Most tokens a prompt of this length leaves for its completion (context and KV cache both)."""
        return min(self.max_context_length, self.kv_capacity_tokens) - num_prompt_tokens
