"""IncrementalDetokenizer: deltas add up to the full decode and never show half a character."""

import random

import pytest
from transformers import AutoTokenizer

from worker.detokenizer import IncrementalDetokenizer


def _byte_level_alphabet() -> dict[int, str]:
    """Byte-level BPE's printable stand-in for each byte: printable Latin-1 bytes stand for
    themselves, the others take code points from 256 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + i) for i, b in enumerate(others)})
    return table


_BYTE_TO_CHAR = _byte_level_alphabet()
TEXTS = ["héllo wörld", "日本語 text 🙂 emoji", "ünïcode 🙂🙂 é日", "plain ascii only"]


@pytest.fixture(scope="module")
def tokenizer(qwen3_path):
    return AutoTokenizer.from_pretrained(qwen3_path)


def _stream(tokenizer, ids: list[int], skip_special_tokens: bool = True) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
    return [detok.push(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_multibyte_characters_are_never_split(tokenizer, text):
    # One token per byte forces every multi-byte character across token boundaries.
    byte_ids = [tokenizer.convert_tokens_to_ids(_BYTE_TO_CHAR[b]) for b in text.encode()]
    assert tokenizer.decode(byte_ids) == text
    deltas = _stream(tokenizer, byte_ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_decode_of_normal_tokenization(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    deltas = _stream(tokenizer, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_random_token_soup_matches_the_full_decode(tokenizer, skip_special_tokens):
    # Random ids include lone continuation bytes and special tokens: whatever the full decode
    # makes of them, the deltas must add up to exactly that.
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 40))]
        deltas = _stream(tokenizer, ids, skip_special_tokens)
        assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
