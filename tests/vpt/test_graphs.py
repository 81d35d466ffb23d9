"""Batch buckets for CUDA graphs: padding a batch to its bucket (zero images, a padded table) never
changes the real rows' features, for every tuning method, head and pooling in vpt/methods/ (checked
on the CPU, where the same padding runs eagerly); every method but partial tuning runs its forward
without reading a value back to the host (what a capture needs; checked on the CPU with a dispatch
mode); graph capture and replay need a GPU (`gpu`)."""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kernels.torch_attention import static_masks
from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from vpt.backbone import Backbone, load_backbone
from vpt.engine import forward_features, forward_grouped, pack_slots, task_slot_tensors
from vpt.graphs import (
    GraphedForward,
    batch_buckets,
    bucket_of,
    capturable,
    pad_rows,
    pad_table,
    padded_features,
    table_key,
)
from vpt.methods import COMPONENTS, POOLINGS
from vpt.task import TaskParams, TaskSpec

# Every component alone, combinations with mlp heads, and every pooling.
SPECS = ([{"method": name} for name in COMPONENTS] + [{"method": "linear"}]
         + [{"method": "vpt-deep+bias+adapter", "head": "mlp-2"}, {"method": "vpt-shallow+partial-1", "head": "mlp-3"}]
         + [{"method": "vpt-shallow", "pooling": p} for p in POOLINGS])


def _bb(device: str = "cpu", dtype: torch.dtype = torch.float64) -> Backbone:
    return load_backbone(TINY_NAME, pretrained=False, model_kwargs=TINY_KWARGS, device=device, dtype=dtype, seed=0)


def _tasks(bb: Backbone, spec: dict, n: int = 3) -> list:
    """`n` tasks of one kind with different prompt counts and class counts (so the table pads them)."""
    out = []
    for i in range(n):
        kind = TaskSpec(spec["method"], 2 + 3 * i, tuple(f"c{j}" for j in range(2 + i)), head=spec.get("head", "linear"),
                        pooling=spec.get("pooling", "cls"))
        params = TaskParams.new(kind, bb, generator=torch.Generator().manual_seed(i))
        with torch.no_grad():  # non-zero everywhere, so a padded slot that leaked in would show
            for p in params.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7 + i), dtype=p.dtype) * 0.1)
        out.append(task_slot_tensors(bb, params))
    return out


def test_buckets_cover_every_batch_size_with_at_most_double_padding() -> None:
    assert batch_buckets(64) == (1, 2, 4, 8, 16, 32, 64)
    assert batch_buckets(48) == (1, 2, 4, 8, 16, 32, 48) and batch_buckets(1) == (1,)
    buckets = batch_buckets(48)
    for n in range(1, 49):
        b = bucket_of(n, buckets)
        assert n <= b <= max(2 * n, 1) or b == 48
    with pytest.raises(ValueError):
        bucket_of(49, buckets)


def test_padding_shapes_and_padded_slots_are_empty() -> None:
    images, slot = torch.randn(3, 3, 4, 4), torch.tensor([2, 0, 1])
    x, s = pad_rows(images, slot, 8)
    assert x.shape == (8, 3, 4, 4) and torch.equal(x[:3], images) and not x[3:].any()
    assert s.tolist() == [2, 0, 1, 2, 2, 2, 2, 2]  # padded rows reuse a real slot: no new prompt length
    bb = _bb()
    table = pack_slots(bb, _tasks(bb, {"method": "vpt-deep"}))
    padded = pad_table(table, 8)
    assert padded.slots == 8
    for name, t in padded.tensors.items():
        assert t.shape == (8, *table.tensors[name].shape[1:]) and torch.equal(t[:3], table.tensors[name])
        assert not t[3:].any()
    assert all(not lens[3:].any() for lens in padded.lengths.values())
    assert table_key(table, 8) == table_key(padded) != table_key(table)  # a graph's key, known before padding
    assert table_key(table, 2) == table_key(table)                        # a table never shrinks


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: "-".join(s.values()))
def test_padded_rows_never_change_real_rows(spec: dict, one_thread) -> None:
    bb = _bb()
    slots = _tasks(bb, spec)
    table = pack_slots(bb, slots)
    g = torch.Generator().manual_seed(1)
    images = torch.randn(5, 3, 32, 32, generator=g, dtype=torch.float64)
    slot = torch.tensor([2, 0, 1, 0, 2])
    with torch.inference_mode():
        plain = forward_features(bb, images, table, slot)                                # (5, d)
        padded = padded_features(bb, images, table, slot, batch_buckets(16))             # bucket 8
        one = padded_features(bb, images[:1], table, slot[:1], batch_buckets(16))        # bucket 1: no padding
    torch.testing.assert_close(padded, plain, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(one, plain[:1], rtol=1e-9, atol=1e-9)


class HostReads(TorchDispatchMode):
    """Records every op that reads a tensor's values back to the host or sizes its output from them:
    what a CUDA graph capture cannot contain."""

    SYNCING = ("_local_scalar_dense", "is_nonzero", "item", "nonzero", "unique", "masked_select", "equal")

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(name in str(func) for name in self.SYNCING):
            self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("spec", SPECS + [{"method": "mixed"}], ids=lambda s: "-".join(s.values()))
def test_capturable_forwards_read_nothing_back_to_the_host(spec: dict, one_thread) -> None:
    """Every method but partial tuning decides its forward from shapes: no host read in the whole
    forward (so its batches can be captured), with the same features as the ordinary forward."""
    bb = _bb()
    if spec["method"] == "mixed":  # every capturable method in one table, one batch
        slots = [s for name in COMPONENTS if name != "partial-1" for s in _tasks(bb, {"method": name}, n=1)]
        slots += _tasks(bb, {"method": "linear"}, n=1)
    else:
        slots = _tasks(bb, spec)
    table = pack_slots(bb, slots)
    g = torch.Generator().manual_seed(2)
    images = torch.randn(6, 3, 32, 32, generator=g, dtype=torch.float64)
    slot = torch.arange(6) % len(slots)
    with torch.inference_mode():
        plain = forward_features(bb, images, table, slot)                                # (6, d)
        with static_masks(), HostReads() as reads:
            static = forward_features(bb, images, table, slot)
    torch.testing.assert_close(static, plain, rtol=1e-10, atol=1e-10)
    expected = "partial-1" not in spec["method"]
    assert capturable(table) == expected
    assert (reads.ops == []) == expected, reads.ops


def test_graphed_forward_is_the_plain_forward_off_cuda(one_thread) -> None:
    bb = _bb()
    slots = _tasks(bb, {"method": "vpt-deep"})
    table = pack_slots(bb, slots)
    images = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    graphed = GraphedForward(bb, 8, enabled=True)
    assert not graphed.active
    with torch.inference_mode():
        a = forward_grouped(bb, images, table, slots, [0, 2, 1], graphed)
        b = forward_grouped(bb, images, table, slots, [0, 2, 1])
    assert [rows for rows, _ in a] == [rows for rows, _ in b]
    for (_, x), (_, y) in zip(a, b):
        assert torch.equal(x, y)
    assert graphed.replays == graphed.captures == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("spec", [{"method": "linear"}, {"method": "bias"}, {"method": "vpt-deep"},
                                  {"method": "vpt-shallow"}, {"method": "adapter"}, {"method": "partial-1"}],
                         ids=lambda s: s["method"])
def test_graph_replays_match_the_eager_forward_on_cuda(spec: dict) -> None:
    bb = _bb("cuda", torch.float32)
    slots = _tasks(bb, spec)
    table = pack_slots(bb, slots)
    graphed = GraphedForward(bb, 16, enabled=True)
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for n in (5, 7, 5, 16, 1):  # a second batch of 5 replays the first one's graph
            images = torch.randn(n, 3, 32, 32, generator=g).cuda()
            slot = torch.randint(0, 3, (n,), generator=g).cuda()
            got = graphed(bb, images, table, slot)
            torch.testing.assert_close(got, forward_features(bb, images, table, slot), rtol=1e-4, atol=1e-4)
    if spec["method"] == "partial-1":  # grouped by task from the slots' values: never captured
        assert graphed.captures == graphed.replays == 0 and graphed.fallbacks == 5
    else:  # buckets 8, 16 and 1: three graphs, every batch replayed
        assert graphed.captures == 3 and graphed.replays == 5 and not graphed._eager
