"""Chat templating: a conversation to prompt token ids with the model's chat template.

The engine's loader gives every tokenizer it can a template (Gemma's turn format for GGUF Gemma);
a model left without one gets chat input refused.
"""

from collections.abc import Sequence
from typing import Any

from sfllm_core.errors import InvalidRequestError


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def apply_chat_template(tokenizer: Any, messages: Sequence[tuple[str, str]]) -> list[int]:
    """Render (role, content) messages with a generation prompt and tokenize them.

    Special-token text inside message content is encoded as plain text, so a user cannot forge turns.
    """
    if not has_chat_template(tokenizer):
        raise InvalidRequestError("this model has no chat template; send text or token_ids instead", "chat")
    if not messages:
        raise InvalidRequestError("chat.messages must not be empty", "chat.messages")
    for i, (role, _) in enumerate(messages):
        if not role:
            raise InvalidRequestError(f"chat.messages[{i}].role must be set", f"chat.messages[{i}].role")
    conversation = [{"role": role, "content": content} for role, content in messages]
    try:
        ids = tokenizer.apply_chat_template(
            conversation,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=False,
            sanitize_control_tokens=True,
        )
    except Exception as exc:  # templates refuse conversations with raise_exception(...); jinja errors too
        raise InvalidRequestError(f"chat.messages rejected by the chat template: {exc}", "chat.messages") from exc
    return list(ids)
