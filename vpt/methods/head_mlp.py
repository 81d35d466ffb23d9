"""The `mlp-k` head (the official MLP head): `[Linear(d, d), ReLU, BatchNorm1d, Dropout(0.1)] x (k-1)`,
then `Linear(d, C)`. BatchNorm runs in training mode while training and in eval mode at serving.

In a mixed batch the hidden layers run once per task that has them (grouped by slot).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpt.methods.base import Build, Component, Field
from vpt.methods.head_linear import HEAD_FIELDS, init_last, last_layer_slots

if TYPE_CHECKING:
    from vpt.backbone import Backbone
    from vpt.methods.context import BatchContext
    from vpt.task import TaskSpec

DROPOUT = 0.1
BN_EPS = 1e-5
_NORM_PARTS = ("weight", "bias", "running_mean", "running_var")
_FIELDS = ("mlp_w", "mlp_b", "mlp_nw", "mlp_nb", "mlp_rm", "mlp_rv")


class MLPHead(nn.Module):
    def __init__(self, d: int, classes: int, k: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(d, d) for _ in range(k - 1)] + [nn.Linear(d, classes)])
        self.norms = nn.ModuleList(nn.BatchNorm1d(d, eps=BN_EPS) for _ in range(k - 1))

    def hidden(self, x: Tensor) -> Tensor:
        """(B, d) -> (B, d) through the hidden layers (BatchNorm/Dropout follow `self.training`)."""
        for lin, norm in zip(self.layers, self.norms):
            x = F.dropout(norm(F.relu(lin(x))), DROPOUT, self.training)
        return x


def head_depth(head: str) -> int:
    """k of `mlp-k`."""
    return int(head.removeprefix("mlp-"))


class MLPHeadComponent(Component):
    name = "mlp"
    kind = "head"
    count_key = "head"
    fields = HEAD_FIELDS + (Field("mlp_w", length_dim=0),) + tuple(Field(f) for f in _FIELDS[1:])

    def create(self, spec: TaskSpec, backbone: Backbone) -> nn.Module:
        return MLPHead(backbone.embed_dim, spec.num_classes, head_depth(spec.head))

    def init(self, module: nn.Module, spec: TaskSpec, backbone: Backbone, generator: torch.Generator | None) -> None:
        with torch.no_grad():
            for lin in module.layers[:-1]:   # kaiming normal, fan_out = d; bias 0
                lin.weight.normal_(0.0, math.sqrt(2.0 / lin.out_features), generator=generator)
                lin.bias.zero_()
        init_last(module.layers[-1], generator)

    def file_shapes(self, spec: TaskSpec, backbone: Backbone) -> dict[str, tuple[int, ...]]:
        d, k, C = backbone.embed_dim, head_depth(spec.head), spec.num_classes
        out = {}
        for j in range(k):
            rows = C if j == k - 1 else d
            out[f"head.layers.{j}.weight"], out[f"head.layers.{j}.bias"] = (rows, d), (rows,)
            if j < k - 1:
                out.update({f"head.norms.{j}.{part}": (d,) for part in _NORM_PARTS})
        return out

    def to_file(self, module: nn.Module | None) -> dict[str, Tensor]:
        return {f"head.{k}": v for k, v in module.state_dict(keep_vars=True).items()
                if not k.endswith("num_batches_tracked")}

    def from_file(self, module: nn.Module | None, tensors: dict[str, Tensor]) -> None:
        module.load_state_dict({k.removeprefix("head."): v for k, v in tensors.items() if k.startswith("head.")},
                               strict=False)

    def no_decay(self, module: nn.Module | None) -> list[nn.Parameter]:
        return [module.layers[-1].bias]

    def slot_tensors(self, module: nn.Module | None, spec: TaskSpec, build: Build) -> dict[str, Tensor]:
        bb = build.backbone
        out = last_layer_slots(module.layers[-1], build)
        hidden = module.layers[:-1]
        parts = [[lin.weight for lin in hidden], [lin.bias for lin in hidden]]
        parts += [[getattr(n, p) for n in module.norms] for p in _NORM_PARTS]
        for field, ts in zip(_FIELDS, parts):
            out[field] = torch.stack(ts)[None].to(bb.device, bb.dtype)   # (1, k-1, d, d) or (1, k-1, d)
        return out

    def has_hidden(self, tensors: dict[str, Tensor]) -> bool:
        return "mlp_w" in tensors

    def hidden_one(self, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
        if "mlp_w" not in tensors:
            return x
        return _layers(x, tensors["mlp_w"].shape[0], lambda name, j: tensors[name][j])

    def prepare(self, ctx: BatchContext) -> None:
        if ctx.has("mlp_w"):
            ctx.head_hidden = _hidden


def _hidden(ctx: BatchContext, x: Tensor) -> Tensor:
    """(B, d) features -> (B, d) after each sample's hidden layers (none for linear heads)."""
    module = ctx.table.modules.get("head")
    if module is not None:   # training: the head module itself, so BatchNorm updates its statistics
        return module.hidden(x.to(module.layers[0].weight.dtype))
    t = ctx.table.tensors
    depth = ctx.length("mlp_w")                                                   # (B,)
    has = depth > 0
    for s in torch.unique(ctx.slot[has]).tolist():
        idx = (ctx.slot == s).nonzero()[:, 0]
        h = _layers(x.index_select(0, idx), int(ctx.table.lengths["mlp_w"][s]), lambda name, j, s=s: t[name][s, j])
        x = x.index_copy(0, idx, h)
    return x


def _layers(h: Tensor, depth: int, get: Callable[[str, int], Tensor]) -> Tensor:
    """(n, d) through `depth` hidden layers: Linear, ReLU, BatchNorm1d (eval); Dropout is the identity."""
    for j in range(depth):
        h = F.relu(F.linear(h.to(get("mlp_w", j).dtype), get("mlp_w", j), get("mlp_b", j)))
        h = F.batch_norm(h, get("mlp_rm", j), get("mlp_rv", j), get("mlp_nw", j), get("mlp_nb", j), False, 0.0, BN_EPS)
    return h
