"""Programmatic dependent launch (Hopper and later): a kernel starts while its predecessor finishes.

A kernel launched with `launch_pdl=True` may begin before the kernel ahead of it in the stream has
completed. It must call `tl.extra.cuda.gdc_wait()` before touching anything the predecessor may
write or read (its inputs, and its outputs too: their memory may be a buffer the predecessor is
still reading). What it may do first is read memory nobody writes during the step: weights. The
GEMV loads its weight tile before waiting, so the weight stream of one projection overlaps the
tail of the kernel before it. Each kernel calls `gdc_launch_dependents()` right after its wait,
which lets the next kernel start as soon as this one's last wave is running.

Correctness is transitive: a kernel cannot finish before its own wait returns, so waiting on the
predecessor means waiting on everything before it. CUDA graph capture keeps these launches as
programmatic edges. Kernels that are not ours (cuBLAS, PyTorch) launch normally and serialise.
"""

import torch

_enabled: dict[int, bool] = {}
# Process-wide, as the kernels are: InferenceEngine sets it from EngineConfig.pdl before it captures graphs.
_allowed = True


def set_pdl(enabled: bool) -> None:
    """Allow or forbid PDL launches from now on (graphs captured before keep what they were captured with)."""
    global _allowed
    _allowed = enabled


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on this device launch with PDL: CUDA, compute capability 9.0+, and not set_pdl(False)."""
    if device.type != "cuda" or not _allowed:
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _enabled:
        _enabled[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _enabled[index]


def pdl_launch(device: torch.device) -> dict:
    """Keyword arguments for a Triton launch: USE_PDL (a constexpr every PDL kernel takes), launch_pdl."""
    if pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}
