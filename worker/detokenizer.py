"""IncrementalDetokenizer: token ids in, text deltas out, never splitting a character."""

from typing import Protocol

_REPLACEMENT = "\ufffd"


class Decoder(Protocol):
    """The part of a transformers tokenizer the detokenizer needs."""

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class IncrementalDetokenizer:
    """Turns one completion's tokens into text deltas whose concatenation is the decode of all of them.

    A token may end inside a multi-byte character (byte-level BPE, byte fallback); its text is held
    until a later token completes it. Each step decodes only a short window starting one emitted
    chunk back, because decoders treat a sequence's first token specially (leading-space rules),
    so text is always measured against the same window's decode rather than decoded alone.
    """

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self._prefix = 0  # window start: the first token of the last emitted chunk
        self._read = 0  # tokens before this have had their text emitted

    def _decode(self, start: int, end: int | None = None) -> str:
        return self._tokenizer.decode(self.token_ids[start:end], skip_special_tokens=self._skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (maybe empty)."""
        self.token_ids.append(token_id)
        done = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        # A trailing replacement character is an incomplete character that later bytes may finish.
        if len(text) <= len(done) or text.endswith(_REPLACEMENT):
            return ""
        self._prefix, self._read = self._read, len(self.token_ids)
        return text[len(done) :]

    def flush(self) -> str:
        """The held-back text at the end of the completion, as the full decode shows it."""
        done = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix)
        self._prefix = self._read = len(self.token_ids)
        return text[len(done) :]
