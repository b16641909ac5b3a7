"""Merged projections compute their parts' outputs side by side; Linear is nn.Linear off the Triton path."""

import torch
from torch import nn

from sfllm_core.layers.linear import Linear, merge_linears


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
