"""The per-batch context: the table, each sample's slot, and the hooks the batch's components installed.

The engine asks the context at fixed points of the forward (patch tokens, extra input tokens,
attention prompt keys/values, per-sample biases, MLP output, the last block and final norm,
pooling, head). A component's `prepare` fills in what it changes; everything else stays the
frozen backbone's.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from vpt.backbone import Backbone
    from vpt.engine import PromptTable


@dataclass
class BatchContext:
    backbone: Backbone
    table: PromptTable
    slot: Tensor                                                   # (B,) slot per sample
    per_sample: dict[str, Tensor] = field(default_factory=dict)    # name -> (B, ...)
    kv: Callable[[BatchContext, int], Any] | None = None           # layer -> (bank_k, bank_v, prompt_len) | None
    mlp_hooks: list[Callable[[BatchContext, int, Tensor], Tensor]] = field(default_factory=list)
    tail_groups: Callable[[BatchContext], list[tuple[Tensor | None, dict[str, Tensor]]]] | None = None
    pool: Callable[[BatchContext, Tensor, Tensor | None], Tensor] | None = None
    head_hidden: Callable[[BatchContext, Tensor], Tensor] | None = None

    @property
    def batch(self) -> int:
        return self.slot.shape[0]

    @property
    def training(self) -> bool:
        return self.table.training

    def has(self, name: str) -> bool:
        return name in self.table.tensors

    def gather(self, name: str, layer: int | None = None) -> Tensor:
        """(B, ...) rows of table field `name` (optionally its `layer` index of dim 1) for each sample."""
        t = self.table.tensors[name]
        if layer is not None:
            t = t[:, layer]
        if t.shape[0] == 1:   # one row shared by every slot (training)
            return t.expand(self.batch, *t.shape[1:])
        return t.index_select(0, self.slot)

    def length(self, name: str) -> Tensor:
        """(B,) valid length of field `name` per sample."""
        lens = self.table.lengths[name]
        return lens.expand(self.batch) if lens.shape[0] == 1 else lens.index_select(0, self.slot)

    def bias(self, name: str) -> Tensor | None:
        """(B, n) per-sample change of backbone parameter `name` (a bias), or None."""
        return self.per_sample.get("bias:" + name)

    def subset(self, idx: Tensor) -> BatchContext:
        """The context of samples `idx` only (per-sample tensors and slots indexed)."""
        per = {k: v.index_select(0, idx) for k, v in self.per_sample.items()}
        return dataclasses.replace(self, slot=self.slot.index_select(0, idx), per_sample=per)


def valid_rows(lengths: Tensor, width: int) -> Tensor:
    """(B, width) bool: column j < lengths[b]."""
    return torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
