"""SlotTensors are handled generically (any method's fields just work); heads grouped by class count."""
from __future__ import annotations

import pytest
import torch

from vpt.engine import SlotTensors, apply_heads_grouped


def slot(c: int, d: int = 8, **extra: torch.Tensor) -> SlotTensors:
    return SlotTensors({"deep_k": torch.ones(2, 1, 3, 4), "deep_v": torch.ones(2, 1, 3, 4),
                        "head_w": torch.randn(c, d), "head_b": torch.randn(c), **extra})


def test_nbytes_and_to_cover_every_field() -> None:
    s = slot(5, bias=torch.zeros(24, dtype=torch.float64), partial=torch.zeros(7))
    expected = (2 * 24 + 5 * 8 + 5) * 4 + 24 * 8 + 7 * 4
    assert s.nbytes() == expected
    moved = s.to("meta")
    assert isinstance(moved, SlotTensors) and moved.nbytes() == expected
    assert all(t.device.type == "meta" for t in moved.tensors.values())
    assert s.tensors["head_w"].device.type == "cpu"   # a copy; the original is untouched


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs CUDA")
def test_pin_memory_pins_every_field() -> None:
    s = slot(3, bias=torch.zeros(4)).pin_memory()
    assert all(t.is_pinned() for t in s.tensors.values())


def test_heads_grouped_by_class_count_equal_per_sample_heads() -> None:
    slots = [slot(3), slot(10_000), slot(3), slot(5)]
    ids = [0, 1, 2, 0, 3, 2, 1]
    f = torch.randn(len(ids), 8, dtype=torch.float64)
    slots = [SlotTensors({"head_w": s.tensors["head_w"].double(), "head_b": s.tensors["head_b"].double()})
             for s in slots]
    groups = apply_heads_grouped(f, slots, ids)
    assert sorted(tuple(rows) for rows, _ in groups) == [(0, 2, 3, 5), (1, 6), (4,)]
    for rows, logits in groups:
        for r, row in zip(rows, logits):
            t = slots[ids[r]].tensors
            torch.testing.assert_close(row, t["head_w"] @ f[r] + t["head_b"], rtol=0, atol=1e-12)
