"""Tensor-parallel state: the process group of one engine's ranks and the collectives the model uses.

One engine with --tensor-parallel-size N is N processes on one host, one per device; rank 0 is the
engine process (scheduler, sampler, logits), ranks 1..N-1 only run the model (engine/ranks.py). The
group is NCCL on CUDA and gloo on the CPU, rendezvous through a file every rank can reach.

The collectives are plain torch.distributed calls on the current stream's tensors: NCCL's are
captured into CUDA graphs as they are (the communicator is set up by a warm-up collective first),
and nothing here reads a value back to the host.
"""

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

GLOO_TIMEOUT_S = 60.0


@dataclass
class TensorParallel:
    """This process's place in its tensor-parallel group; layers built with one shard their weights by it."""

    rank: int
    size: int
    device: torch.device
    group: "dist.ProcessGroup | None" = None  # None only for size 1

    @property
    def is_leader(self) -> bool:
        return self.rank == 0

    def shard(self, total: int, what: str) -> tuple[int, int]:
        """(start, length) of this rank's equal part of `total` (heads, rows); refuses uneven splits."""
        if total % self.size:
            raise ValueError(f"{what} ({total}) is not divisible by the tensor-parallel size ({self.size})")
        part = total // self.size
        return self.rank * part, part

    def kv_head_shard(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, count) on this rank: an equal share, or, with fewer KV heads than ranks, the one
        head this rank's query heads use (replicated on size / num_kv_heads ranks)."""
        if num_kv_heads >= self.size:
            return self.shard(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise ValueError(
                f"the tensor-parallel size ({self.size}) must be a multiple of num_key_value_heads ({num_kv_heads})"
            )
        return self.rank * num_kv_heads // self.size, 1

    def split(self, module: torch.nn.Module, dim: int, start: int, length: int, bias: str = "split") -> None:
        """Mark a layer of this rank to hold `length` of its weight's dim from `start` (what the loader
        cuts from the checkpoint's whole tensor, see `shard_slices`). bias "split" takes the same rows,
        "leader" keeps the whole bias on rank 0 and zeros elsewhere (row-parallel: added once to the sum)."""
        bias_spec = (0, start, length) if bias == "split" else "whole" if self.rank == 0 else "zero"
        module.tp_shard = (dim, start, length, bias_spec)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group, in place; returns x."""
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """x from rank src on every rank, in place."""
        if self.size > 1:
            dist.broadcast(x, src, group=self.group)
        return x

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (a start-up agreement, e.g. on the KV pages all can hold)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


def init_tensor_parallel(rank: int, size: int, device: torch.device, init_file: str) -> TensorParallel:
    """Join (or form) the group of `size` ranks meeting at init_file; NCCL on CUDA, gloo on the CPU."""
    if device.type == "cuda":
        backend, kwargs = "nccl", {"device_id": device}
    else:
        # A rank that dies inside a collective leaves the others waiting this long, not gloo's 30 minutes.
        backend, kwargs = "gloo", {"timeout": timedelta(seconds=GLOO_TIMEOUT_S)}
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=size, **kwargs)
    tp = TensorParallel(rank, size, device, dist.group.WORLD)
    # Sets up the communicator now, outside any graph capture, and checks every rank is there.
    tp.all_reduce(torch.ones(1, device=device))
    return tp


def is_tensor_parallel_initialized() -> bool:
    """Whether this process is in a group already (one tensor-parallel engine per process)."""
    return dist.is_initialized()


def destroy_tensor_parallel() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_slices(model: torch.nn.Module) -> dict[str, tuple[int, int, int] | None]:
    """Checkpoint name -> (dim, start, length) to cut from the whole tensor, or None: zeros on this rank.

    Built from the layers `TensorParallel.split` marked; names not listed load whole (replicated).
    """
    slices: dict[str, tuple[int, int, int] | None] = {}
    for name, module in model.named_modules():
        spec = getattr(module, "tp_shard", None)
        if spec is None:
            continue
        dim, start, length, bias = spec
        slices[f"{name}.weight"] = (dim, start, length)
        if getattr(module, "bias", None) is not None and bias != "whole":
            slices[f"{name}.bias"] = None if bias == "zero" else bias
    return slices
