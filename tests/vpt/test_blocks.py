"""The block forward's shortcuts: modules that return their input are skipped, parameters are read fresh."""
from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from vpt.blocks import _param, _run


def test_only_modules_that_return_their_input_are_skipped() -> None:
    x = torch.ones(4, 8)
    for module in (nn.Identity(), nn.Dropout(0.5).eval(), nn.Dropout(0.0).train(), DropPath(0.5).eval(),
                   DropPath(0.0).train()):
        assert _run(module, x) is x
    torch.manual_seed(0)
    assert not torch.equal(_run(nn.Dropout(0.5).train(), x), x)  # training dropout still drops
    assert not torch.equal(_run(DropPath(0.5).train(), torch.ones(64, 8)), torch.ones(64, 8))
    lin = nn.Linear(8, 8)
    assert torch.equal(_run(lin, x), lin(x))  # anything else runs


def test_parameters_are_read_at_each_call() -> None:
    blk = nn.Module()
    blk.norm1 = nn.LayerNorm(8)
    first = _param(blk, None, "norm1.weight")
    assert first is blk.norm1.weight
    blk.norm1.weight = nn.Parameter(torch.zeros(8))  # reassigned: the next read sees the new one
    assert _param(blk, None, "norm1.weight") is blk.norm1.weight and blk.norm1.weight is not first
    assert _param(blk, {"norm1.weight": first}, "norm1.weight") is first  # a task's replacement wins
    assert _param(blk, None, "norm1.missing") is None
