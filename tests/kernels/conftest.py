"""Shared setup for the Triton kernel tests: interpreter mode on CPU, and random paged batches."""

import os

import pytest
import torch

# Without a GPU the kernels run under Triton's interpreter; it must be chosen before any
# @triton.jit decorator runs, i.e. before the kernel modules are imported by the tests.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton.language.standard  # noqa: E402

from sfllm_core.layers.attention import BatchMetadata  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# If something imported triton before the line above ran (torch._dynamo does, via transformers),
# triton.language was built for compilation and interpreted kernels fail obscurely: say why instead.
_INTERPRETER_MISSING = DEVICE.type == "cpu" and type(triton.language.standard.zeros).__name__ != "InterpretedFunction"


@pytest.fixture(autouse=True)
def _require_interpreter_on_cpu() -> None:
    if _INTERPRETER_MISSING:
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set: set it at the top of tests/conftest.py")


def _make_paged_batch(
    seq_lens: list[int],
    query_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    dtype: torch.dtype,
    device: torch.device,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, BatchMetadata]:
    """Random q, a paged K/V cache holding every sequence's whole context, and its metadata.

    Pages are handed out in shuffled order and page 0 is never used, so padded page-table entries
    (0) point at it; every slot no sequence owns holds NaN, so reading one poisons the result.
    Sequences whose query length is 1 must come first (they are the decodes).
    """
    gen = torch.Generator().manual_seed(seed)
    num_pages = [(n + page_size - 1) // page_size for n in seq_lens]
    total_pages = sum(num_pages) + 3  # page 0 plus spares, so ids are not simply 1..N
    order = (torch.randperm(total_pages - 1, generator=gen) + 1).tolist()
    max_pages = max(num_pages) + 2
    page_table = torch.zeros(len(seq_lens), max_pages, dtype=torch.int32)
    k_cache = torch.full((total_pages * page_size, num_kv_heads, head_dim), float("nan"), dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    positions, slot_mapping, seq_slots = [], [], []
    for i, (length, qlen) in enumerate(zip(seq_lens, query_lens, strict=True)):
        pages = torch.tensor([order.pop() for _ in range(num_pages[i])], dtype=torch.int32)
        page_table[i, : len(pages)] = pages
        pos = torch.arange(length)
        slots = pages[pos // page_size].long() * page_size + pos % page_size
        seq_slots.append(slots)
        positions.append(pos[length - qlen :])
        slot_mapping.append(slots[length - qlen :])
    all_slots = torch.cat(seq_slots)
    k_cache[all_slots] = torch.randn(len(all_slots), num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache[all_slots] = torch.randn(len(all_slots), num_kv_heads, head_dim, generator=gen).to(dtype)
    num_tokens = sum(query_lens)
    q = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(query_lens).cumsum(0).tolist()], dtype=torch.int32)
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    meta = BatchMetadata(
        positions=torch.cat(positions).to(device),
        slot_mapping=torch.cat(slot_mapping).to(device),
        query_start_loc=qsl.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        page_table=page_table.to(device),
        logits_indices=(qsl[1:] - 1).long().to(device),
        page_size=page_size,
        num_decodes=num_decodes,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        seq_lens_cpu=list(seq_lens),
        query_lens_cpu=list(query_lens),
    )
    return q.to(device), k_cache.to(device), v_cache.to(device), meta


def _reference_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: BatchMetadata,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """TorchPagedAttention in float32 over the cache as it is (the new tokens' K/V are already there)."""
    from sfllm_core.layers.attention import TorchPagedAttention

    slots = meta.slot_mapping
    kc, vc = k_cache.float(), v_cache.float()
    return TorchPagedAttention().forward(q.float(), kc[slots], vc[slots], kc, vc, meta, scale, sliding_window)


def _poisoned_like(x: torch.Tensor) -> torch.Tensor:
    """An output buffer full of NaN, so any element a kernel fails to write shows up."""
    return torch.full_like(x, float("nan"))


@pytest.fixture
def device() -> torch.device:
    """CUDA when present (compiled kernels), else the CPU (interpreted kernels)."""
    return DEVICE


@pytest.fixture
def make_paged_batch():
    """Builder of random paged batches (see _make_paged_batch)."""
    return _make_paged_batch


@pytest.fixture
def reference_attention():
    """The float32 PyTorch reference over an already-filled cache."""
    return _reference_attention


@pytest.fixture
def poisoned_like():
    """NaN-filled output buffers."""
    return _poisoned_like
