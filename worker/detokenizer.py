"""IncrementalDetokenizer: token ids in, text deltas out, never splitting a character.

It rides on tokenizers' own DecodeStream (Rust; the streaming decoder vLLM's fast detokenizer
uses): about 1 µs a token against ~28 µs for two full decodes of a window per token in Python.
"""

from typing import Any

from tokenizers.decoders import DecodeStream


class IncrementalDetokenizer:
    """Turns one completion's tokens into text deltas whose concatenation is the decode of all of them.

    A token may end inside a multi-byte character (byte-level BPE, byte fallback); DecodeStream
    holds its bytes until a later token completes them. At the end, `flush` returns whatever the
    full decode has beyond what was emitted (an incomplete character decodes to U+FFFD there).
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        # The Rust tokenizer itself, so that the final decode follows the stream's rules exactly.
        self._backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
        self._skip_special_tokens = skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.token_ids: list[int] = []
        self._emitted = 0  # characters handed out so far

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (maybe empty)."""
        self.token_ids.append(token_id)
        text = self._stream.step(self._backend, token_id)
        if not text:
            return ""
        self._emitted += len(text)
        return text

    def flush(self) -> str:
        """The held-back text at the end of the completion, as the full decode shows it."""
        full = self._backend.decode(self.token_ids, skip_special_tokens=self._skip_special_tokens)
        tail = full[self._emitted :]
        self._emitted = len(full)
        return tail
