"""The one exception type callers of the engine need to know."""


class InvalidRequestError(ValueError):
    """A request the engine refuses: the message says which field and why.

    `param` names the offending field (OpenAI's error body and gRPC messages carry it).
    """

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ContextLengthError(InvalidRequestError):
    """A prompt (plus the tokens requested) that does not fit the model's context."""

    def __init__(
        self, max_context_length: int, num_prompt_tokens: int, max_tokens: int | None = None, at_least: bool = False
    ) -> None:
        if max_tokens is None:
            detail = f"your prompt has {'at least ' if at_least else ''}{num_prompt_tokens} tokens"
        else:
            detail = (
                f"you requested {num_prompt_tokens + max_tokens} tokens "
                f"({num_prompt_tokens} in the prompt, {max_tokens} for the completion)"
            )
        super().__init__(
            f"This model's maximum context length is {max_context_length} tokens. However, {detail}. "
            "Please reduce the length of the prompt or the completion.",
            param="prompt" if max_tokens is None else "max_tokens",
        )
        self.max_context_length = max_context_length
        self.num_prompt_tokens = num_prompt_tokens


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at its bound; the caller should retry later."""

    def __init__(self, max_waiting: int) -> None:
        super().__init__(f"the engine's queue is full ({max_waiting} requests waiting); retry later")
        self.max_waiting = max_waiting


class UnsupportedModelError(ValueError):
    """A checkpoint the loader cannot serve: unknown architecture, missing or mismatched tensors."""
