"""sfllm_core/models/loader.py refuses a GGUF tokenizer converted into single characters instead of serving garbage."""

import re
from pathlib import Path

import pytest
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from sfllm_core.errors import UnsupportedModelError
from sfllm_core.models import loader
from sfllm_core.models.loader import load_tokenizer

PROBE = loader._TOKENIZER_PROBE


def char_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A BPE with single characters and no merges: one id per character, as a bad GGUF conversion gives."""
    vocab = {"<unk>": 0} | {c: i + 1 for i, c in enumerate(sorted(set(PROBE)))}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")), unk_token="<unk>"
    )


def word_level_tokenizer() -> transformers.PreTrainedTokenizerFast:
    vocab = {"<unk>": 0} | {w: i + 1 for i, w in enumerate(sorted(set(PROBE.split())))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def fake_gguf(tmp_path: Path) -> str:
    """Enough of a GGUF for load_tokenizer to take the GGUF path: the magic bytes."""
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF" + bytes(60))
    return str(file)


def test_character_level_tokenizer_is_refused_naming_file_counts_and_version():
    tokenizer = char_level_tokenizer()
    assert len(tokenizer.encode(PROBE, add_special_tokens=False)) == len(PROBE) == 79
    with pytest.raises(UnsupportedModelError) as refused:
        loader._check_subword_tokenizer(tokenizer, "/models/gemma.gguf")
    message = str(refused.value)
    assert message.startswith("/models/gemma.gguf: ")
    assert "79 ids for 79 characters" in message
    assert f"transformers {transformers.__version__}" in message
    assert "5.17" in message and "transformers >= 5.24" in message


def test_subword_tokenizer_passes():
    tokenizer = word_level_tokenizer()
    assert len(tokenizer.encode(PROBE, add_special_tokens=False)) == 16
    loader._check_subword_tokenizer(tokenizer, "/models/gemma.gguf")


def test_character_level_conversion_is_refused_and_not_cached(tmp_path, monkeypatch):
    gguf = fake_gguf(tmp_path)
    monkeypatch.setattr(loader.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: char_level_tokenizer())
    with pytest.raises(UnsupportedModelError, match="79 ids for 79 characters"):
        load_tokenizer(gguf, cache_dir=str(tmp_path / "cache"))
    assert not any((tmp_path / "cache").rglob("tokenizer*"))


def test_cached_character_level_tokenizer_is_refused_naming_the_cache_and_kept(tmp_path):
    gguf = fake_gguf(tmp_path)
    cache = loader._cache_dir(gguf, str(tmp_path / "cache"))
    char_level_tokenizer().save_pretrained(cache)
    files = sorted(cache.iterdir())
    with pytest.raises(UnsupportedModelError, match=re.escape(f"delete {cache}")):
        load_tokenizer(gguf, cache_dir=str(tmp_path / "cache"))
    assert sorted(cache.iterdir()) == files
