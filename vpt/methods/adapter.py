"""Adapters (Pfeiffer placement, as the official code): on each block's MLP output, before the residual.

Block i: `m = mlp(norm2(x)); x = x + ls2(m + up(act(down(m))))` with act = the block's GELU and
a bottleneck of d / r (r = `adapter_reduction`; the paper uses 8, 64, 256). `down` starts small
random and `up` at zero, so the adapter starts as the identity and can learn. (The official
code zero-initialises both, which leaves `down` and `up.weight` with zero gradient forever.)
In a mixed batch each sample's adapter weights are gathered and applied as batched matmuls;
tasks without an adapter gather zeros, which add exactly nothing.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vpt.errors import TaskSpecError
from vpt.methods.base import Build, Component, Field

if TYPE_CHECKING:
    from vpt.backbone import Backbone
    from vpt.methods.context import BatchContext
    from vpt.task import TaskSpec

_PARTS = ("down.weight", "down.bias", "up.weight", "up.bias")
_FIELDS = ("ad_dw", "ad_db", "ad_uw", "ad_ub")


class AdapterBlock(nn.Module):
    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)


class Adapter(Component):
    name = "adapter"
    fields = tuple(Field(f, length_dim=1 if f == "ad_db" else None) for f in _FIELDS)

    def check(self, spec: TaskSpec, backbone: Backbone | None) -> None:
        r = spec.adapter_reduction
        if backbone is not None and backbone.embed_dim % r != 0:
            raise TaskSpecError(f"adapter_reduction {r} must divide the embedding width {backbone.embed_dim}")

    def create(self, spec: TaskSpec, backbone: Backbone) -> nn.Module:
        m = backbone.embed_dim // spec.adapter_reduction
        return nn.ModuleList(AdapterBlock(backbone.embed_dim, m) for _ in range(backbone.depth))

    def init(self, module: nn.Module, spec: TaskSpec, backbone: Backbone, generator: torch.Generator | None) -> None:
        bound = 1.0 / math.sqrt(backbone.embed_dim)
        with torch.no_grad():
            for blk in module:
                blk.down.weight.uniform_(-bound, bound, generator=generator)
                blk.down.bias.zero_()
                blk.up.weight.zero_()
                blk.up.bias.zero_()

    def file_shapes(self, spec: TaskSpec, backbone: Backbone) -> dict[str, tuple[int, ...]]:
        d, m = backbone.embed_dim, backbone.embed_dim // spec.adapter_reduction
        shapes = dict(zip(_PARTS, ((m, d), (m,), (d, m), (d,))))
        return {f"adapter.{i}.{k}": s for i in range(backbone.depth) for k, s in shapes.items()}

    def to_file(self, module: nn.Module | None) -> dict[str, Tensor]:
        return {f"adapter.{k}": v for k, v in module.state_dict(keep_vars=True).items()}

    def from_file(self, module: nn.Module | None, tensors: dict[str, Tensor]) -> None:
        module.load_state_dict({k.removeprefix("adapter."): v for k, v in tensors.items()
                                if k.startswith("adapter.")})

    def zero_grad_ok(self, module: nn.Module | None) -> list[nn.Parameter]:
        return [p for blk in module for p in blk.down.parameters()]   # zero while `up` is still zero

    def slot_tensors(self, module: nn.Module | None, spec: TaskSpec, build: Build) -> dict[str, Tensor]:
        bb = build.backbone
        out = {}
        for field, part in zip(_FIELDS, _PARTS):
            mod, attr = part.split(".")
            out[field] = torch.stack([getattr(getattr(blk, mod), attr) for blk in module])[None].to(bb.dtype)
        return out   # (1, L, m, d), (1, L, m), (1, L, d, m), (1, L, d)

    def prepare(self, ctx: BatchContext) -> None:
        ctx.mlp_hooks.append(_apply)  # a task without an adapter has zero rows: it adds exactly 0


def _apply(ctx: BatchContext, layer: int, m: Tensor) -> Tensor:
    """m (B, N, d) -> m + up(act(down(m))), each sample with its own task's adapter."""
    act = ctx.backbone.model.blocks[layer].mlp.act
    t = ctx.table.tensors
    if t["ad_dw"].shape[0] == 1:   # one task for the whole batch
        a = act(torch.nn.functional.linear(m, t["ad_dw"][0, layer], t["ad_db"][0, layer]))       # (B, N, r)
        return m + torch.nn.functional.linear(a, t["ad_uw"][0, layer], t["ad_ub"][0, layer])
    dw, db = ctx.gather("ad_dw", layer), ctx.gather("ad_db", layer)                              # (B, r, d), (B, r)
    uw, ub = ctx.gather("ad_uw", layer), ctx.gather("ad_ub", layer)                              # (B, d, r), (B, d)
    a = act(torch.baddbmm(db[:, None, :], m, dw.transpose(1, 2)))                                 # (B, N, r)
    return m + torch.baddbmm(ub[:, None, :], a, uw.transpose(1, 2))                               # (B, N, d)
