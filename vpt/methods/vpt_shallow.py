"""VPT-Shallow: `p` prompt tokens inserted before block 0, carried through every block as tokens.

In a mixed batch they ride at the end of each sequence with a per-sample valid length (token
order does not matter to attention; prompts have no position embedding).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpt.methods.base import Build, Component, Field

if TYPE_CHECKING:
    from vpt.backbone import Backbone
    from vpt.methods.context import BatchContext
    from vpt.task import TaskSpec


class Prompts(nn.Module):
    def __init__(self, rows: int, p: int, d: int) -> None:
        super().__init__()
        self.prompts = nn.Parameter(torch.zeros(rows, p, d))   # (L_p, p, d)


def init_prompts(module: Prompts, backbone: Backbone, generator: torch.Generator | None) -> None:
    """The official init: uniform in +-sqrt(6 / (3 * patch_h * patch_w + d))."""
    bound = backbone.prompt_init_bound
    with torch.no_grad():
        module.prompts.uniform_(-bound, bound, generator=generator)


def dropped(prompts: Tensor, build: Build) -> Tensor:
    """(L_p, p, d) -> (rows, L_p, p, d): one row, or one per sample with its own dropout mask."""
    x = prompts.to(build.backbone.device, build.backbone.dtype)[None]
    if build.samples > 1:
        x = F.dropout(x.expand(build.samples, *prompts.shape), p=build.dropout, training=True)
    return x


class VptShallow(Component):
    name = "vpt-shallow"
    count_key = "prompts"
    fields = (Field("shallow", length_dim=0),)

    def create(self, spec: TaskSpec, backbone: Backbone) -> nn.Module:
        return Prompts(1, spec.num_prompts, backbone.embed_dim)

    def init(self, module: nn.Module, spec: TaskSpec, backbone: Backbone, generator: torch.Generator | None) -> None:
        init_prompts(module, backbone, generator)

    def file_shapes(self, spec: TaskSpec, backbone: Backbone) -> dict[str, tuple[int, ...]]:
        return {"prompts": (1, spec.num_prompts, backbone.embed_dim)}

    def to_file(self, module: nn.Module | None) -> dict[str, Tensor]:
        return {"prompts": module.prompts}

    def from_file(self, module: nn.Module | None, tensors: dict[str, Tensor]) -> None:
        module.prompts.copy_(tensors["prompts"])

    def slot_tensors(self, module: nn.Module | None, spec: TaskSpec, build: Build) -> dict[str, Tensor]:
        return {"shallow": dropped(module.prompts, build)[:, 0]}                  # (rows, p, d)

    def prepare(self, ctx: BatchContext) -> None:
        lens = ctx.length("shallow")                                             # (B,)
        ps = ctx.table.tensors["shallow"].shape[1]  # the table's width, not the batch's longest: no host read
        if ps > 0:
            ctx.per_sample["tokens"] = ctx.gather("shallow")[:, :ps]             # (B, ps, d)
            ctx.per_sample["tokens_len"] = lens
