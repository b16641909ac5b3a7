"""sfllm_core/models/loader.py: configs, weights and tokenizers from checkpoint folders and GGUF files."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from checkpoints import (
    BOS_ID,
    EOS_ID,
    make_gemma3_checkpoint,
    make_qwen3_checkpoint,
    read_config_json,
    write_gguf,
)
from safetensors.torch import load_file, save_file

from sfllm_core.errors import UnsupportedModelError
from sfllm_core.models import loader
from sfllm_core.models.loader import (
    default_eos_token_ids,
    load_model_config,
    load_tokenizer,
    load_weights,
    resolve_model_path,
)


def weights_of(path: str, dtype: torch.dtype = torch.float32, **kwargs) -> dict[str, torch.Tensor]:
    return {name: tensor for name, tensor, _ in load_weights(path, dtype, **kwargs)}


def reference_state_dict(config: transformers.PretrainedConfig) -> dict[str, torch.Tensor]:
    """Names and shapes transformers' own model has for this config (on the meta device: no memory)."""
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model.state_dict()


def copy_checkpoint(src: str, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --- configs --------------------------------------------------------------------------------------


def test_qwen3_config_from_folder(qwen3_path):
    config = load_model_config(qwen3_path)
    assert isinstance(config, transformers.Qwen3Config)
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (64, 2, 16)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)
    assert config.vocab_size == 384 and config.tie_word_embeddings


def test_gemma3_config_from_folder(gemma3_path):
    config = load_model_config(gemma3_path)
    assert isinstance(config, transformers.Gemma3TextConfig)
    assert config.layer_types == ["sliding_attention", "sliding_attention", "full_attention"]
    assert config.sliding_window == 8
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1000000.0
    assert config.query_pre_attn_scalar == 24


def test_multimodal_gemma3_folder_yields_the_text_model(gemma3_path, tmp_path):
    """A Gemma3ForConditionalGeneration folder: text_config, and tensors under model.language_model."""
    text_config = read_config_json(gemma3_path)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"], "text_config": text_config}
        )
    )
    tensors = load_file(str(Path(gemma3_path) / "model.safetensors"))
    nested = {name.replace("model.", "model.language_model.", 1): t for name, t in tensors.items()}
    nested["model.vision_tower.vision_model.post_layernorm.weight"] = torch.ones(8)
    nested["model.multi_modal_projector.mm_soft_emb_norm.weight"] = torch.ones(8)
    save_file(nested, str(tmp_path / "model.safetensors"))

    config = load_model_config(str(tmp_path))
    assert isinstance(config, transformers.Gemma3TextConfig)
    assert config.layer_types == load_model_config(gemma3_path).layer_types
    weights = weights_of(str(tmp_path))
    assert weights.keys() == tensors.keys()
    assert all(torch.equal(weights[name], tensors[name]) for name in tensors)


def test_unknown_architecture_is_refused_naming_file_and_architecture(qwen3_path, tmp_path):
    folder = copy_checkpoint(qwen3_path, tmp_path / "llama")
    raw = read_config_json(folder)
    raw.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UnsupportedModelError) as info:
        load_model_config(str(folder))
    assert str(folder / "config.json") in str(info.value)
    assert "llama" in str(info.value)


def test_missing_config_json_is_refused_naming_the_folder(tmp_path):
    with pytest.raises(UnsupportedModelError, match=str(tmp_path)):
        load_model_config(str(tmp_path))


def test_missing_model_path_is_refused():
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        resolve_model_path("/no/such/model")


# --- weights --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, kwargs",
    [
        (make_qwen3_checkpoint, {}),
        (make_qwen3_checkpoint, {"tie_word_embeddings": False}),
        (make_qwen3_checkpoint, {"num_shards": 3}),
        (make_qwen3_checkpoint, {"num_shards": 2, "tie_word_embeddings": False}),
        (make_gemma3_checkpoint, {}),
    ],
    ids=["qwen3-tied", "qwen3-untied", "qwen3-3-shards", "qwen3-untied-2-shards", "gemma3"],
)
def test_weights_are_named_and_shaped_as_transformers_state_dict(make, kwargs, tmp_path):
    folder = make(tmp_path / "ckpt", **kwargs)
    config = load_model_config(str(folder))
    expected = reference_state_dict(config)
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]  # tied: stored once, as the embedding
    weights = weights_of(str(folder))
    assert weights.keys() == expected.keys()
    assert all(weights[name].shape == expected[name].shape for name in weights)

    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    reference = model.state_dict()
    assert all(torch.equal(weights[name], reference[name]) for name in weights)


def test_sharded_weights_name_their_shard(tmp_path):
    folder = make_qwen3_checkpoint(tmp_path / "ckpt", num_shards=2)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    for name, _, source in load_weights(str(folder), torch.float32):
        assert Path(source) == folder / index[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_weights_are_cast_to_the_requested_dtype(qwen3_path, dtype):
    full = weights_of(qwen3_path, torch.float32)
    cast = weights_of(qwen3_path, dtype)
    assert {t.dtype for t in cast.values()} == {dtype}
    assert all(torch.equal(cast[name], full[name].to(dtype)) for name in full)


def test_bfloat16_checkpoint_is_cast_up(tmp_path):
    folder = make_qwen3_checkpoint(tmp_path / "bf16", dtype=torch.bfloat16)
    stored = load_file(str(folder / "model.safetensors"))
    weights = weights_of(str(folder), torch.float32)
    assert all(w.dtype == torch.float32 and torch.equal(w, stored[n].float()) for n, w in weights.items())


def test_truncated_safetensors_is_refused_naming_the_file(qwen3_path, tmp_path):
    folder = copy_checkpoint(qwen3_path, tmp_path / "truncated")
    weights_file = folder / "model.safetensors"
    os.truncate(weights_file, weights_file.stat().st_size // 2)
    with pytest.raises(UnsupportedModelError, match=str(weights_file)):
        weights_of(str(folder))


def test_corrupt_safetensors_header_is_refused_naming_the_file(qwen3_path, tmp_path):
    folder = copy_checkpoint(qwen3_path, tmp_path / "corrupt")
    weights_file = folder / "model.safetensors"
    weights_file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!" + b"\x00" * 64)
    with pytest.raises(UnsupportedModelError, match=str(weights_file)):
        weights_of(str(folder))


def test_missing_shard_is_refused_naming_the_file(tmp_path):
    folder = make_qwen3_checkpoint(tmp_path / "ckpt", num_shards=3)
    missing = folder / "model-00002-of-00003.safetensors"
    missing.unlink()
    with pytest.raises(UnsupportedModelError, match=str(missing)):
        weights_of(str(folder))


def test_folder_without_weights_is_refused(qwen3_path, tmp_path):
    folder = copy_checkpoint(qwen3_path, tmp_path / "empty")
    (folder / "model.safetensors").unlink()
    with pytest.raises(UnsupportedModelError, match=r"no \*\.safetensors"):
        weights_of(str(folder))


# --- GGUF (tiny files written here the way llama.cpp lays them out) ----------------------------------


@pytest.mark.parametrize("quantize", [False, True], ids=["f32", "q8_0"])
@pytest.mark.parametrize(
    "make, kwargs",
    [
        (make_qwen3_checkpoint, {}),
        (make_qwen3_checkpoint, {"tie_word_embeddings": False}),
        (make_gemma3_checkpoint, {}),
    ],
    ids=["qwen3", "qwen3-untied", "gemma3"],
)
def test_gguf_gives_the_checkpoint_back(make, kwargs, quantize, tmp_path):
    folder = make(tmp_path / "ckpt", **kwargs)
    gguf_file = write_gguf(folder, tmp_path / "model.gguf", quantize=quantize)
    cache = str(tmp_path / "cache")

    config, expected_config = load_model_config(str(gguf_file), cache), load_model_config(str(folder))
    assert type(config) is type(expected_config)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        assert getattr(config, key) == getattr(expected_config, key), key
    for key in ("num_key_value_heads", "head_dim", "tie_word_embeddings", "eos_token_id", "bos_token_id"):
        assert getattr(config, key) == getattr(expected_config, key), key

    weights, expected = weights_of(str(gguf_file), cache_dir=cache), weights_of(str(folder))
    assert weights.keys() == expected.keys()
    # Gemma's norms come back from the stored 1 + w. Q8_0 rounds to half of 1/127 of a block's
    # largest value (weights here have std 0.15, so about 0.6 / 254).
    tolerance = 0.005 if quantize else 1e-6
    for name in expected:
        assert torch.allclose(weights[name], expected[name], atol=tolerance, rtol=0), name
    assert all(source == str(gguf_file) for _, _, source in load_weights(str(gguf_file), torch.float32, cache))


def test_gguf_gemma3_config_follows_llama_cpp_assumptions(gemma3_path, tmp_path):
    """What a Gemma 3 GGUF does not store: every 6th layer global, local RoPE base 10000, 1/sqrt(head_dim)."""
    gguf_file = write_gguf(Path(gemma3_path), tmp_path / "g.gguf")
    config = load_model_config(str(gguf_file), str(tmp_path / "cache"))
    assert config.layer_types == ["sliding_attention"] * 3
    assert config.sliding_window == 8
    assert config.query_pre_attn_scalar == config.head_dim == 32
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1000000.0


def test_gguf_conversion_is_cached_and_keyed_on_the_file(qwen3_path, tmp_path, monkeypatch):
    gguf_file = write_gguf(Path(qwen3_path), tmp_path / "q.gguf")
    cache = tmp_path / "cache"
    first = weights_of(str(gguf_file), cache_dir=str(cache))
    (converted,) = cache.iterdir()
    assert converted.name.startswith("q-") and {"config.json", "model.safetensors"} <= set(os.listdir(converted))

    def no_reading(path):
        raise AssertionError("the GGUF was read again instead of the cache")

    monkeypatch.setattr(loader, "_GgufCheckpoint", no_reading)
    load_model_config(str(gguf_file), str(cache))
    second = weights_of(str(gguf_file), cache_dir=str(cache))
    assert all(torch.equal(first[name], second[name]) for name in first)

    monkeypatch.undo()
    os.utime(gguf_file, (1_000_000_000, 1_000_000_000))  # a replaced file: converted afresh
    weights_of(str(gguf_file), cache_dir=str(cache))
    assert len(list(cache.iterdir())) == 2


def test_gguf_loads_without_a_writable_cache(qwen3_path, tmp_path):
    gguf_file = write_gguf(Path(qwen3_path), tmp_path / "q.gguf")
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("")  # the cache root is a file, so nothing can be created under it
    config = load_model_config(str(gguf_file), str(blocked))
    assert config.hidden_size == 64
    assert weights_of(str(gguf_file), cache_dir=str(blocked)).keys() == weights_of(qwen3_path).keys()


def test_gguf_of_unknown_architecture_is_refused_naming_file_and_architecture(qwen3_path, tmp_path):
    gguf_file = write_gguf(Path(qwen3_path), tmp_path / "l.gguf", architecture="llama")
    with pytest.raises(UnsupportedModelError) as info:
        load_model_config(str(gguf_file), str(tmp_path / "cache"))
    assert str(gguf_file) in str(info.value) and "llama" in str(info.value)


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bogus = tmp_path / "model.bin"
    bogus.write_bytes(b"PK\x03\x04 not a model")
    with pytest.raises(UnsupportedModelError, match=str(bogus)):
        load_model_config(str(bogus))


# --- tokenizers and end-of-generation ids --------------------------------------------------------------


@pytest.mark.parametrize("text", ["The capital of France is Paris.", "Café naïve, 日本語 and 🙂 👨‍👩‍👧 too\n\n end "])
def test_tiny_tokenizers_round_trip(qwen3_path, gemma3_path, text):
    for path in (qwen3_path, gemma3_path):
        tokenizer = load_tokenizer(path)
        assert len(tokenizer) == 384
        assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text


def test_tiny_tokenizers_pin_their_special_ids(qwen3_path, gemma3_path):
    qwen, gemma = load_tokenizer(qwen3_path), load_tokenizer(gemma3_path)
    for tokenizer in (qwen, gemma):
        assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (0, EOS_ID, BOS_ID)
    assert qwen("hi").input_ids[0] != BOS_ID
    assert gemma("hi").input_ids[0] == BOS_ID  # as Gemma's own tokenizer does


def test_gemma_chat_template_is_supplied_when_missing(gemma3_path, tmp_path):
    folder = copy_checkpoint(gemma3_path, tmp_path / "no-template")
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    assert transformers.AutoTokenizer.from_pretrained(folder).chat_template is None

    tokenizer = load_tokenizer(str(folder))
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
    ]
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello.<end_of_turn>\n"
        "<start_of_turn>user\nCapital of France?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert tokenizer.apply_chat_template(messages[1:2], tokenize=False) == (
        "<bos><start_of_turn>user\nHi!<end_of_turn>\n"
    )


def test_a_tokenizer_own_chat_template_is_kept(qwen3_path):
    rendered = load_tokenizer(qwen3_path).apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_default_eos_token_ids(qwen3_path, gemma3_path):
    qwen, gemma = load_tokenizer(qwen3_path), load_tokenizer(gemma3_path)
    qwen_config, gemma_config = load_model_config(qwen3_path), load_model_config(gemma3_path)
    assert default_eos_token_ids(qwen_config, qwen) == [EOS_ID, qwen.convert_tokens_to_ids("<|im_end|>")]
    assert default_eos_token_ids(gemma_config, gemma) == [EOS_ID, gemma.convert_tokens_to_ids("<end_of_turn>")]
    gemma_config.eos_token_id = [EOS_ID, 7]
    assert default_eos_token_ids(gemma_config, gemma) == [EOS_ID, gemma.convert_tokens_to_ids("<end_of_turn>"), 7]


# --- the real Gemma 3 270M ----------------------------------------------------------------------------


@pytest.mark.slow  # on a fresh cache, the first real-model load dequantizes the GGUF (~20 s)
def test_real_gemma_config(gemma270m_path):
    config = load_model_config(gemma270m_path)
    assert isinstance(config, transformers.Gemma3TextConfig)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (18, 640, 2048)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 1, 256)
    assert config.vocab_size == 262144 and config.tie_word_embeddings
    assert config.sliding_window == 512 and config.query_pre_attn_scalar == 256
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 3
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10000.0
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1000000.0
    assert config.max_position_embeddings == 32768


@pytest.mark.slow
def test_real_gemma_generates_sensible_text(gemma270m_path):
    """Weights dequantized, renamed and norm-fixed correctly make transformers' own Gemma3 speak English."""
    config = load_model_config(gemma270m_path)
    weights = weights_of(gemma270m_path)
    expected = reference_state_dict(config)
    del expected["lm_head.weight"]
    assert weights.keys() == expected.keys()
    assert all(weights[name].shape == expected[name].shape for name in weights)

    model = transformers.Gemma3ForCausalLM(config).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert missing == ["lm_head.weight"] and unexpected == []  # lm_head is tied to the embedding
    tokenizer = load_tokenizer(gemma270m_path)
    ids = tokenizer("<bos>The capital of France is", add_special_tokens=False, return_tensors="pt").input_ids
    assert ids[0].tolist() == [2, 818, 5279, 529, 7001, 563]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids.shape[1] :]).startswith(" the capital of")


def test_real_gemma_tokenizer_and_eos(gemma270m_path):
    tokenizer = load_tokenizer(gemma270m_path)
    assert tokenizer.chat_template == loader.GEMMA_CHAT_TEMPLATE
    assert len(tokenizer.encode(loader._TOKENIZER_PROBE, add_special_tokens=False)) == 16  # subword, not characters
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict | transformers.BatchEncoding) else ids
    assert ids[:2] == [2, 105] and ids[-3:] == [105, 4368, 107]  # <bos><start_of_turn> ... "model\n"
    assert default_eos_token_ids(load_model_config(gemma270m_path), tokenizer) == [1, 106]


@pytest.mark.slow
def test_real_gemma_tokenizer_is_converted_once_then_read_from_cache(gemma270m_path, tmp_path, monkeypatch):
    calls = []
    from_pretrained = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        calls.append(kwargs.get("gguf_file"))
        return from_pretrained(*args, **kwargs)

    monkeypatch.setattr(loader.AutoTokenizer, "from_pretrained", spy)
    converted = load_tokenizer(gemma270m_path, cache_dir=str(tmp_path))
    cached = load_tokenizer(gemma270m_path, cache_dir=str(tmp_path))
    assert calls[0] is not None and calls[1:] == [None]  # converted from the GGUF once, then the cache
    for text in ["The capital of France is", "<start_of_turn>user\nCafé 日本語 🙂<end_of_turn>\n", "  x\n\ny"]:
        assert converted(text).input_ids == cached(text).input_ids
    assert cached.chat_template == converted.chat_template == loader.GEMMA_CHAT_TEMPLATE


def test_a_tensor_parallel_rank_reads_only_its_slices_of_a_folder(qwen3_path):
    whole = {name: t for name, t, _ in loader.load_weights(qwen3_path, torch.float32)}
    q, down = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight"
    slices = {q: (0, 32, 32), down: (1, 64, 64)}
    cut = {name: t for name, t, _ in loader.load_weights(qwen3_path, torch.float32, slices=slices)}
    assert torch.equal(cut[q], whole[q][32:64]) and torch.equal(cut[down], whole[down][:, 64:128])
    assert cut.keys() == whole.keys()
    assert all(torch.equal(cut[name], whole[name]) for name in whole if name not in slices)
