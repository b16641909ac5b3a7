"""Tiny random-weight Qwen3 and Gemma3 checkpoints, built on the fly for tests (no model hub needed).

Each is a real Hugging Face folder: config.json and safetensors written by transformers'
save_pretrained, plus a byte-level BPE tokenizer trained here with a chat template.
"""

import json
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# The tiny tokenizer's first ids, in this order, then its chat style's two turn markers.
SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>"]
PAD_ID, EOS_ID, BOS_ID = 0, 1, 2
TURN_TOKENS = {"qwen3": ["<|im_start|>", "<|im_end|>"], "gemma3": ["<start_of_turn>", "<end_of_turn>"]}

# Enough distinct words that BPE finds well over the ~120 merges a 384-entry vocabulary needs;
# the multi-byte lines make sure accents, CJK and emoji survive byte-level round trips.
_CORPUS = [
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "A quick brown fox jumps over the lazy dog near the river bank.",
    "Language models predict the next token from the tokens before it.",
    "Serving many requests at once needs batching, paging and careful scheduling.",
    "She sells sea shells by the sea shore; the shells she sells are surely seashells.",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "Numbers like 0123456789 and symbols such as #, $, %, & and @ appear in text.",
    "The weather today is sunny with a gentle breeze from the west.",
    "Please answer the question briefly and politely, then stop.",
    "Café, naïve, résumé, élève: les accents français sont courants.",
    "日本語のテキストも正しく扱えるべきです。東京は日本の首都です。",
    "Emoji too: 🙂 🚀 🎉 👍🏽 and a family 👨‍👩‍👧.",
    "Ελληνικά, русский текст, and עברית mix scripts in one line.",
]

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def make_tokenizer_files(folder: Path, vocab_size: int = 384, *, style: str = "qwen3") -> None:
    """Writes tokenizer.json + tokenizer_config.json of a tiny byte-level BPE with exactly vocab_size entries.

    Ids 0-3 are <pad>, <eos>, <bos>, <unk>; 4-5 the style's turn markers. style "qwen3": <|im_start|>,
    <|im_end|> and a ChatML template, no bos added; "gemma3": <start_of_turn>, <end_of_turn>, Gemma's
    turn template, and bos added to every encoding, as Gemma's own tokenizer does.
    """
    if style not in ("qwen3", "gemma3"):
        raise ValueError(f"style must be qwen3 or gemma3, got {style!r}")
    tokenizer = Tokenizer(models.BPE())
    # No prefix space and no normalizer: decode(encode(text)) must give back text exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + TURN_TOKENS[style],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise ValueError(f"the corpus yields {tokenizer.get_vocab_size()} tokens, not {vocab_size}")
    if style == "gemma3":
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", BOS_ID)]
        )
        from sfllm_core.models.loader import GEMMA_CHAT_TEMPLATE as chat_template
    else:
        chat_template = QWEN_CHAT_TEMPLATE
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        additional_special_tokens=TURN_TOKENS[style],
        model_max_length=1024,
    )
    fast.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)


def _randomize(model: torch.nn.Module, seed: int, norm_center: float) -> None:
    """Re-draws every parameter so that wrong wiring shows in the logits.

    Linear and embedding weights get std 0.15 (logits far from uniform); norm weights get
    norm_center + N(0, 0.2), so Gemma's (1 + w) norms and Qwen's w norms both differ per channel.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if "norm" in name:
                param.copy_(norm_center + 0.2 * noise)
            else:
                param.copy_(0.15 * noise)


def _save(model: transformers.PreTrainedModel, folder: Path, dtype: torch.dtype, num_shards: int, style: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = model.to(dtype)
    if num_shards > 1:
        # Shards are filled tensor by tensor, so total / num_shards can give one shard too many:
        # grow the limit until the count comes out right.
        size = sum(p.numel() * p.element_size() for p in model.state_dict().values()) // num_shards
        while True:
            for old in folder.glob("model*.safetensors*"):
                old.unlink()
            model.save_pretrained(folder, max_shard_size=size)
            if len(list(folder.glob("model-*.safetensors"))) <= num_shards:
                break
            size = size * 11 // 10 + 1
    else:
        model.save_pretrained(folder)
    make_tokenizer_files(folder, model.config.vocab_size, style=style)
    return folder


def make_qwen3_checkpoint(
    folder: Path,
    *,
    tie_word_embeddings: bool = True,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    dtype: torch.dtype = torch.float32,
    num_shards: int = 1,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """A 2-layer Qwen3 (hidden 64, head_dim 16, vocab 384) with random weights and a tokenizer, saved in folder."""
    settings = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=16,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tie_word_embeddings,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    settings.update(config_overrides)
    config = transformers.Qwen3Config(**settings)
    torch.manual_seed(seed)
    model = transformers.Qwen3ForCausalLM(config)
    _randomize(model, seed, norm_center=1.0)
    return _save(model, Path(folder), dtype, num_shards, "qwen3")


def make_gemma3_checkpoint(
    folder: Path,
    *,
    sliding_window: int = 8,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 1,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    **config_overrides,
) -> Path:
    """A 3-layer Gemma3 text model (sliding, sliding, full; head_dim 32, vocab 384) with random weights.

    Local and global RoPE bases differ, and query_pre_attn_scalar (24) is not head_dim, so either mix-up shows.
    """
    settings = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        head_dim=32,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
        },
        query_pre_attn_scalar=24,
        tie_word_embeddings=True,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    settings.update(config_overrides)
    config = transformers.Gemma3TextConfig(**settings)
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config)
    # Gemma scales by (1 + w), so centring its norms at 0 keeps them near the real models' range.
    _randomize(model, seed, norm_center=0.0)
    return _save(model, Path(folder), dtype, 1, "gemma3")


def read_config_json(folder: Path) -> dict:
    """The folder's config.json as a dict (tests edit and rewrite it)."""
    return json.loads((Path(folder) / "config.json").read_text())


def write_gguf(checkpoint: Path, gguf_file: Path, *, quantize: bool = False, architecture: str | None = None) -> Path:
    """Converts a tiny single-file checkpoint into a GGUF laid out as llama.cpp's converter does.

    Norm weights of Gemma are stored as 1 + w, as llama.cpp does. quantize stores 2-D weights as
    Q8_0. architecture overrides general.architecture (to test refusals).
    """
    import gguf
    from safetensors.torch import load_file

    config = transformers.AutoConfig.from_pretrained(checkpoint)
    is_gemma = config.model_type == "gemma3_text"
    arch = gguf.MODEL_ARCH.GEMMA3 if is_gemma else gguf.MODEL_ARCH.QWEN3
    writer = gguf.GGUFWriter(str(gguf_file), architecture or gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(config.head_dim)
    writer.add_value_length(config.head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = config.rope_parameters["full_attention"] if is_gemma else config.rope_parameters
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    if is_gemma:
        writer.add_sliding_window(config.sliding_window)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)

    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    for name, tensor in load_file(str(Path(checkpoint) / "model.safetensors")).items():
        base, suffix = name.rsplit(".", 1)
        data = tensor.float().numpy()
        if is_gemma and name.endswith("norm.weight"):
            data = data + 1.0
        if quantize and data.ndim == 2:
            packed = gguf.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", packed, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(f"{names.get_name(base)}.{suffix}", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(gguf_file)


def make_eagle3_checkpoint(
    folder: Path,
    target: Path,
    *,
    draft_vocab_size: int = 96,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    head_dim: int = 16,
    aux_layer_ids: list[int] | None = None,
    own_embeddings: bool = False,
    mirror: bool = False,
    seed: int = 0,
) -> Path:
    """A random-weight EAGLE-3 draft head for a target checkpoint, in the format SGLang and vLLM load.

    config.json names LlamaForCausalLMEagle3 with draft_vocab_size (and eagle_config's aux layer ids
    when given); the tensors are fc, midlayer.* (q/k/v over 2 x hidden), norm, lm_head over the
    draft vocabulary, d2t (draft id + d2t = target id) and t2d (which target ids are drafted).
    Without own_embeddings the head shares the target's embed_tokens, as trained heads usually do.

    mirror: instead of random weights, a head that predicts what a context-free target would: each
    row attends to itself alone (constant q and k biases, RoPE peaking at distance 0), passes its
    token's embedding through the target's final norm, and ranks the draft vocabulary with the
    target's own lm_head rows. Against a target whose layers add little (scale_layers), its drafts
    are mostly right and sometimes wrong, which is what tests of acceptance need.
    """
    from safetensors.torch import save_file

    target_config = read_config_json(target)
    hidden, vocab = target_config["hidden_size"], target_config["vocab_size"]
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": num_key_value_heads,
        "head_dim": head_dim,
        "num_hidden_layers": 1,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": target_config["max_position_embeddings"],
        "vocab_size": vocab,
        "draft_vocab_size": draft_vocab_size,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }
    if aux_layer_ids is not None:
        config["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": aux_layer_ids, "use_aux_hidden_state": True}
    generator = torch.Generator().manual_seed(seed)

    def weight(*shape: int, norm: bool = False) -> torch.Tensor:
        noise = torch.randn(shape, generator=generator)
        return (1.0 + 0.2 * noise) if norm else 0.15 * noise

    q, kv = num_attention_heads * head_dim, num_key_value_heads * head_dim
    inter = config["intermediate_size"]
    # The draft vocabulary: the special tokens and a random choice of the rest, in target order.
    rest = torch.randperm(vocab - 4, generator=generator)[: draft_vocab_size - 4] + 4
    draft_ids = torch.cat([torch.arange(4), rest.sort().values])
    t2d = torch.zeros(vocab, dtype=torch.bool)
    t2d[draft_ids] = True
    tensors = {
        "fc.weight": weight(hidden, 3 * hidden),
        "midlayer.self_attn.q_proj.weight": weight(q, 2 * hidden),
        "midlayer.self_attn.k_proj.weight": weight(kv, 2 * hidden),
        "midlayer.self_attn.v_proj.weight": weight(kv, 2 * hidden),
        "midlayer.self_attn.o_proj.weight": weight(hidden, q),
        "midlayer.mlp.gate_proj.weight": weight(inter, hidden),
        "midlayer.mlp.up_proj.weight": weight(inter, hidden),
        "midlayer.mlp.down_proj.weight": weight(hidden, inter),
        "midlayer.input_layernorm.weight": weight(hidden, norm=True),
        "midlayer.hidden_norm.weight": weight(hidden, norm=True),
        "midlayer.post_attention_layernorm.weight": weight(hidden, norm=True),
        "norm.weight": weight(hidden, norm=True),
        "lm_head.weight": weight(draft_vocab_size, hidden),
        "d2t": draft_ids - torch.arange(draft_vocab_size),
        "t2d": t2d,
    }
    if own_embeddings:
        tensors["embed_tokens.weight"] = weight(vocab, hidden)
    if mirror:
        if kv != hidden or q != hidden:
            raise ValueError("a mirror head needs as many q and kv heads as hidden / head_dim")
        _mirror(tensors, config, target, target_config, draft_ids)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return folder


def _mirror(tensors: dict, config: dict, target: Path, target_config: dict, draft_ids: torch.Tensor) -> None:
    from safetensors.torch import load_file

    weights = load_file(str(Path(target) / "model.safetensors"))
    hidden = target_config["hidden_size"]
    gemma = target_config["model_type"].startswith("gemma")
    embed = weights["model.embed_tokens.weight"]
    head = weights.get("lm_head.weight", embed)
    final_norm = weights["model.norm.weight"] + (1.0 if gemma else 0.0)
    config.update(attention_bias=True, norm_before_residual=True)
    zeros = {k: torch.zeros_like(v) for k, v in tensors.items() if k.endswith("proj.weight") or k == "fc.weight"}
    tensors.update(zeros)
    # q = k = a constant vector per head: after RoPE their product peaks at distance 0.
    tensors["midlayer.self_attn.q_proj.bias"] = torch.full((hidden,), 8.0)
    tensors["midlayer.self_attn.k_proj.bias"] = torch.full((hidden,), 8.0)
    tensors["midlayer.self_attn.v_proj.bias"] = torch.zeros(hidden)
    tensors["midlayer.self_attn.o_proj.bias"] = torch.zeros(hidden)
    tensors["midlayer.self_attn.v_proj.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1)
    tensors["midlayer.self_attn.o_proj.weight"] = torch.eye(hidden)
    tensors["midlayer.input_layernorm.weight"] = final_norm.float()
    tensors["midlayer.hidden_norm.weight"] = torch.zeros(hidden)  # the hidden state adds nothing
    tensors["norm.weight"] = torch.ones(hidden)
    tensors["lm_head.weight"] = head[draft_ids].float()


def scale_layers(folder: Path, factor: float = 0.3) -> Path:
    """Scales what each layer adds to the residual stream by about factor, in place. Below 1 the next
    token depends mostly on the current one (see make_eagle3_checkpoint's mirror); above, less."""
    from safetensors.torch import load_file, save_file

    file = Path(folder) / "model.safetensors"
    weights = load_file(str(file))
    gemma = read_config_json(folder)["model_type"].startswith("gemma")
    for name, tensor in weights.items():
        if gemma and name.endswith(("post_attention_layernorm.weight", "post_feedforward_layernorm.weight")):
            weights[name] = (1.0 + tensor) * factor - 1.0  # Gemma's (1 + w) sandwich norms set the scale
        elif not gemma and name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = tensor * factor
    save_file(weights, str(file), metadata={"format": "pt"})
    return Path(folder)
