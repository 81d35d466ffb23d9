"""The linear head: `Linear(d, C)` on the pooled feature, initialised as the official code does."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vpt.methods.base import Build, Component, Field

if TYPE_CHECKING:
    from vpt.backbone import Backbone
    from vpt.task import TaskSpec

HEAD_BIAS_INIT = -math.log(0.99 / 0.01)  # -4.59512, the official head's bias init
HEAD_FIELDS = (Field("head_w", length_dim=0), Field("head_b"))


def init_last(layer: nn.Linear, generator: torch.Generator | None) -> None:
    """kaiming normal (fan_out = C, gain sqrt 2) weight, bias -log(0.99 / 0.01)."""
    with torch.no_grad():
        layer.weight.normal_(0.0, math.sqrt(2.0 / layer.out_features), generator=generator)
        layer.bias.fill_(HEAD_BIAS_INIT)


def last_layer_slots(layer: nn.Linear, build: Build) -> dict[str, Tensor]:
    bb = build.backbone
    return {"head_w": layer.weight.to(bb.device, bb.dtype)[None],                 # (1, C, d)
            "head_b": layer.bias.to(bb.device, bb.dtype)[None]}                   # (1, C)


class LinearHead(Component):
    name = "linear"
    kind = "head"
    count_key = "head"
    fields = HEAD_FIELDS

    def create(self, spec: TaskSpec, backbone: Backbone) -> nn.Module:
        return nn.Linear(backbone.embed_dim, spec.num_classes)

    def init(self, module: nn.Module, spec: TaskSpec, backbone: Backbone, generator: torch.Generator | None) -> None:
        init_last(module, generator)

    def file_shapes(self, spec: TaskSpec, backbone: Backbone) -> dict[str, tuple[int, ...]]:
        return {"head.weight": (spec.num_classes, backbone.embed_dim), "head.bias": (spec.num_classes,)}

    def to_file(self, module: nn.Module | None) -> dict[str, Tensor]:
        return {"head.weight": module.weight, "head.bias": module.bias}

    def from_file(self, module: nn.Module | None, tensors: dict[str, Tensor]) -> None:
        module.weight.copy_(tensors["head.weight"])
        module.bias.copy_(tensors["head.bias"])

    def no_decay(self, module: nn.Module | None) -> list[nn.Parameter]:
        return [module.bias]

    def slot_tensors(self, module: nn.Module | None, spec: TaskSpec, build: Build) -> dict[str, Tensor]:
        return last_layer_slots(module, build)
