"""SlotTensors are handled generically (new per-method fields just work); heads grouped by class count."""
from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor

from vpt.engine import SlotTensors, apply_heads_grouped


@dataclass
class WithExtras(SlotTensors):
    """A method's slot with tensors the bank has never heard of."""

    biases: dict[str, Tensor] = field(default_factory=dict)
    layers: list[Tensor] = field(default_factory=list)


def slot(c: int, d: int = 8, **extra) -> WithExtras:
    return WithExtras(deep_k=torch.ones(2, 1, 3, 4), deep_v=torch.ones(2, 1, 3, 4), shallow=None,
                      head_w=torch.randn(c, d), head_b=torch.randn(c), **extra)


def test_nbytes_and_to_cover_every_field() -> None:
    s = slot(5, biases={"blocks.0.attn.qkv.bias": torch.zeros(24, dtype=torch.float64)}, layers=[torch.zeros(7)])
    expected = (2 * 24 + 5 * 8 + 5) * 4 + 24 * 8 + 7 * 4
    assert s.nbytes() == expected
    moved = s.to("meta")
    assert isinstance(moved, WithExtras) and moved.nbytes() == expected
    assert moved.biases["blocks.0.attn.qkv.bias"].device.type == "meta" and moved.layers[0].device.type == "meta"
    assert moved.shallow is None and s.head_w.device.type == "cpu"   # a copy; the original is untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pin_memory_pins_every_field() -> None:
    s = slot(3, biases={"b": torch.zeros(4)}).pin_memory()
    assert s.head_w.is_pinned() and s.biases["b"].is_pinned() and s.deep_k.is_pinned()


def test_heads_grouped_by_class_count_equal_per_sample_heads() -> None:
    slots = [slot(3), slot(10_000), slot(3), slot(5)]
    ids = [0, 1, 2, 0, 3, 2, 1]
    f = torch.randn(len(ids), 8, dtype=torch.float64)
    slots = [SlotTensors(None, None, None, s.head_w.double(), s.head_b.double()) for s in slots]
    groups = apply_heads_grouped(f, slots, ids)
    assert sorted(tuple(rows) for rows, _ in groups) == [(0, 2, 3, 5), (1, 6), (4,)]
    for rows, logits in groups:
        for r, row in zip(rows, logits):
            s = slots[ids[r]]
            torch.testing.assert_close(row, s.head_w @ f[r] + s.head_b, rtol=0, atol=1e-12)
