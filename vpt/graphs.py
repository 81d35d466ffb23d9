"""Fixed batch buckets for the serving forward, and CUDA graphs captured at them (`VPT_CUDA_GRAPHS`).

A CUDA graph replays a captured sequence of kernels without Python launching each one, which is
what a small or mid-size ViT batch spends most of its time on. A graph has fixed shapes and fixed
input addresses, so the forward runs at a few batch sizes (`batch_buckets`): a batch of n images
is padded to the next bucket b (zero images, each pointing at the batch's first task), the
batch's packed prompt table is padded to b slots (zero slots of valid length 0), the captured
graph for (b, the table's field shapes) is replayed on static copies of the inputs, and the first
n rows are kept. Samples never interact in a ViT forward, so padded rows cannot change real rows;
tests/vpt/test_graphs.py checks that for every tuning method on the CPU, where the same padding
runs eagerly.

A capture cannot read a value back to the host. The forward decides everything from shapes: prompt
widths are the table's (not the batch's longest prompt), bias and adapter rows of tasks without
them are zero (adding exactly 0), and attention masks are built from the lengths on the device
(`kernels.torch_attention.static_masks`). tests/vpt/test_graphs.py runs every method's forward on
the CPU under a dispatch mode that fails on any host read (`.item()`, `nonzero`, `unique`...). The
one exception is partial tuning (`Component.capturable = False`): its last block runs once per task
of the batch, grouped by the slots' values; a table holding its fields runs without a graph, as
does any key whose capture fails anyway (remembered, never retried). Heads run after the graph.
Everything else about the batch (bank, heads, answers) is unchanged.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from kernels.torch_attention import static_masks
from vpt.backbone import Backbone
from vpt.engine import PromptTable, forward_features
from vpt.methods import forward_components

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to `max_batch`, and `max_batch` itself: at most 2x padding per batch."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return (*out, max_batch)


def bucket_of(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket holding `n` rows (ValueError past the largest)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"a batch of {n} is larger than the largest bucket {buckets[-1]}")


def pad_rows(images: Tensor, slot: Tensor, bucket: int) -> tuple[Tensor, Tensor]:
    """(n, 3, H, W), (n,) -> (bucket, 3, H, W) with zero images, (bucket,) with the first row's slot."""
    n = images.shape[0]
    if n == bucket:
        return images, slot
    x = F.pad(images, (0, 0, 0, 0, 0, 0, 0, bucket - n))                               # (bucket, 3, H, W)
    s = torch.cat([slot, slot[:1].expand(bucket - n)])                                   # (bucket,)
    return x, s


def pad_table(table: PromptTable, slots: int) -> PromptTable:
    """The table with its slot dim padded to `slots`: zero rows, valid length 0 (no task uses them).
    A batch has at most as many distinct tasks as rows, so a bucket's table never needs fewer."""
    if table.slots >= slots:
        return table
    extra = slots - table.slots
    tensors = {k: torch.cat([v, v.new_zeros(extra, *v.shape[1:])]) for k, v in table.tensors.items()}
    lengths = {k: torch.cat([v, v.new_zeros(extra)]) for k, v in table.lengths.items()}
    return PromptTable(tensors=tensors, lengths=lengths, slots=slots, device=table.device)


def table_key(table: PromptTable, slots: int | None = None) -> tuple:
    """What a captured graph depends on besides the batch size: every field's shape and dtype, with
    the slot dim as `pad_table(table, slots)` would make it (nothing is padded to know it)."""
    rows = table.slots if slots is None else max(table.slots, slots)
    return (tuple((k, (rows, *v.shape[1:]), v.dtype) for k, v in sorted(table.tensors.items())),
            tuple((k, (rows, *v.shape[1:])) for k, v in sorted(table.lengths.items())))


def capturable(table: PromptTable) -> bool:
    """Whether every component whose fields the table holds decides its forward from shapes alone."""
    return all(c.capturable for c in forward_components() if any(f.name in table.tensors for f in c.fields))


def padded_features(backbone: Backbone, images: Tensor, table: PromptTable, slot: Tensor,
                    buckets: tuple[int, ...]) -> Tensor:
    """The bucketed forward run eagerly (what a graph replays): (n, 3, H, W) -> (n, d)."""
    n = images.shape[0]
    b = bucket_of(n, buckets)
    x, s = pad_rows(images, slot, b)
    return forward_features(backbone, x, pad_table(table, b), s)[:n]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    images: Tensor                 # static inputs the replay reads
    slot: Tensor
    table: PromptTable
    out: Tensor                    # (bucket, d), overwritten by each replay


class GraphedForward:
    """`forward_features` through CUDA graphs at batch buckets, when enabled and on CUDA; otherwise
    the plain forward. At most `max_graphs` graphs are kept (least recently used dropped)."""

    def __init__(self, backbone: Backbone, max_batch: int, enabled: bool, max_graphs: int = 32) -> None:
        self.backbone = backbone
        self.active = enabled and torch.device(backbone.device).type == "cuda"
        self.buckets = batch_buckets(max_batch)
        self.max_graphs = max_graphs
        self._graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self._eager: set[tuple] = set()  # keys run without a graph: not capturable, or their capture failed
        self._pool = None
        self.replays = self.captures = self.fallbacks = 0

    def __call__(self, backbone: Backbone, images: Tensor, table: PromptTable, slot: Tensor) -> Tensor:
        """(n, 3, H, W) images, their table and (n,) slots -> (n, d) features."""
        n = images.shape[0]
        if not self.active or n > self.buckets[-1]:
            return forward_features(backbone, images, table, slot)
        b = bucket_of(n, self.buckets)
        key = (b, table_key(table, b))
        g = self._graphs.get(key)
        if g is None and key not in self._eager and not capturable(table):
            self._eager.add(key)  # decided once per key, from the table's fields
        if key in self._eager:
            self.fallbacks += 1
            return forward_features(backbone, images, table, slot)
        x, s = pad_rows(images, slot, b)
        t = pad_table(table, b)
        if g is None:
            g = self._capture(key, x, t, s)
            if g is None:
                self.fallbacks += 1
                return forward_features(backbone, images, table, slot)
        else:
            self._graphs.move_to_end(key)
            g.images.copy_(x)
            g.slot.copy_(s)
            for name, v in t.tensors.items():
                g.table.tensors[name].copy_(v)
            for name, v in t.lengths.items():
                g.table.lengths[name].copy_(v)
        g.graph.replay()
        self.replays += 1
        return g.out[:n].clone()                                                        # (n, d)

    def _capture(self, key: tuple, x: Tensor, t: PromptTable, s: Tensor) -> _Graph | None:
        """Warm up on a side stream, then capture; None (and the key remembered) when capture fails."""
        bb = self.backbone
        static = _Graph(torch.cuda.CUDAGraph(), x.clone(), s.clone(),
                        PromptTable({k: v.clone() for k, v in t.tensors.items()},
                                    {k: v.clone() for k, v in t.lengths.items()}, t.slots, t.device), None)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side), static_masks():
                for _ in range(2):  # lazy initialisations (cuBLAS handles, kernel autotuning) happen here
                    forward_features(bb, static.images, static.table, static.slot)
            torch.cuda.current_stream().wait_stream(side)
            with torch.cuda.graph(static.graph, pool=self._pool), static_masks():
                static.out = forward_features(bb, static.images, static.table, static.slot)  # (b, d)
            self._pool = static.graph.pool()
        except Exception as e:  # a host sync or an uncapturable op in some component  # noqa: BLE001
            log.info("batch bucket %d runs without a CUDA graph for this table (%s: %s)", key[0],
                     type(e).__name__, str(e)[:200])
            self._eager.add(key)
            torch.cuda.synchronize()
            return None
        self.captures += 1
        self._graphs[key] = static
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return static


__all__ = ["GraphedForward", "batch_buckets", "bucket_of", "capturable", "pad_rows", "pad_table", "padded_features", "table_key"]
