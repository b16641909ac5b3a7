"""Merged projections compute their parts' outputs side by side; Linear is nn.Linear off the Triton path."""

import pytest
import torch
from torch import nn

from sfllm_core.layers.linear import Linear, merge_linears, project


def test_merge_linears_concatenates_outputs():
    torch.manual_seed(0)
    parts = [nn.Linear(16, n, bias=True) for n in (8, 4, 4)]
    merged = merge_linears(*parts)
    x = torch.randn(5, 16)
    assert isinstance(merged, Linear) and merged.weight.shape == (16, 16)
    assert not merged.weight.requires_grad
    torch.testing.assert_close(merged(x), torch.cat([p(x) for p in parts], dim=-1))


def test_linear_keeps_checkpoint_names_and_math():
    layer = Linear(8, 3, bias=False)
    assert [name for name, _ in layer.named_parameters()] == ["weight"]
    x = torch.randn(2, 8)
    torch.testing.assert_close(layer(x), x @ layer.weight.T)


@pytest.mark.parametrize("rows", [1, 3, 64, 65])
@pytest.mark.parametrize("inference", [False, True])
def test_project_equals_linear_on_the_cpu(rows, inference):
    """Every CPU route of `project` (split matvec, streamed order, plain) computes x @ W^T."""
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(65536, 257, generator=g)  # 67 MB: over the split threshold
    x = torch.randn(rows, 257, generator=g)
    with torch.inference_mode(inference):
        got = project(x, weight)
    assert got.shape == (rows, 65536)
    assert torch.allclose(got, torch.nn.functional.linear(x, weight), atol=1e-4, rtol=1e-5)
