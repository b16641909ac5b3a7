"""Architecture name -> model class."""

from torch import nn

from sfllm_core.errors import UnsupportedModelError
from sfllm_core.models.gemma3 import Gemma3ForCausalLM
from sfllm_core.models.qwen3 import Qwen3ForCausalLM

MODELS: dict[str, type[nn.Module]] = {
    "qwen3": Qwen3ForCausalLM,
    "gemma3_text": Gemma3ForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}


def model_class(config) -> type[nn.Module]:
    """The class serving a transformers config, by its model_type."""
    try:
        return MODELS[config.model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {config.model_type!r} is not supported; supported: {', '.join(sorted(MODELS))}"
        ) from None
