"""Partial-1: the last block and the final norm tuned per task (the paper's Partial-1).

Served by running the shared blocks for the whole mixed batch, then the last block and the final
norm once per task that replaces them (and once, with the backbone's weights, for the rest). The
bank holds the replaced weights as one flat vector per task (7.1 M values for ViT-B).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vpt.block_names import BLOCK_PARAMS
from vpt.errors import TaskSpecError
from vpt.methods.base import Build, Field
from vpt.methods.bias import BackboneCopy, FlatParams

if TYPE_CHECKING:
    from vpt.backbone import Backbone
    from vpt.methods.context import BatchContext
    from vpt.task import TaskSpec


def partial_names(backbone: Backbone) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of the last block and the final norm."""
    last = f"blocks.{backbone.depth - 1}."
    return [(n, tuple(p.shape)) for n, p in backbone.model.named_parameters()
            if n.startswith((last, "norm."))]


class Partial1(BackboneCopy):
    name = "partial-1"
    count_key = "partial"
    fields = (Field("partial", length_dim=0),)
    file_prefix = "partial"

    def param_names(self, backbone: Backbone) -> list[tuple[str, tuple[int, ...]]]:
        return partial_names(backbone)

    def check(self, spec: TaskSpec, backbone: Backbone | None) -> None:
        if backbone is None:  # with bias: vpt.method_names.check_combination refuses it
            return
        last = f"blocks.{backbone.depth - 1}."
        odd = [n for n, _ in partial_names(backbone)
               if n.startswith(last) and n[len(last):] not in BLOCK_PARAMS]
        if odd:
            raise TaskSpecError(f"partial-1 does not support this backbone's last block (parameters {odd[:4]})")

    def slot_tensors(self, module: nn.Module | None, spec: TaskSpec, build: Build) -> dict[str, Tensor]:
        return {"partial": module.values.to(build.backbone.device, build.backbone.dtype)[None]}   # (1, n)

    capturable = False   # the tail runs once per task of the batch: the groups come from the slots' values

    def prepare(self, ctx: BatchContext) -> None:
        ctx.tail_groups = _groups


def _groups(ctx: BatchContext) -> list[tuple[Tensor | None, dict[str, Tensor]]]:
    """(sample indices or None for all, weights by backbone name) for each group of the batch's tail."""
    flat = ctx.table.tensors["partial"]                                          # (S, n)
    names = partial_names(ctx.backbone)
    if flat.shape[0] == 1 and int(ctx.table.lengths["partial"][0]) > 0:          # one task for the whole batch
        return [(None, FlatParams.split_names(names, flat[0]))]
    has = ctx.length("partial") > 0                                             # (B,)
    groups: list[tuple[Tensor | None, dict[str, Tensor]]] = []
    rest = (~has).nonzero()[:, 0]
    if rest.numel():
        groups.append((rest, {}))
    for s in torch.unique(ctx.slot[has]).tolist():
        idx = (ctx.slot == s).nonzero()[:, 0]
        groups.append((idx, FlatParams.split_names(names, flat[s])))
    return groups
