"""Bias tuning: every backbone parameter whose name ends in `bias` is tuned per task.

The task file holds the tuned values (`bias.<name>`, absolute). The bank holds each task's
change from the backbone's values as one flat vector; in a mixed batch every sample adds its
own task's change after the layer (`W x + b0 + (b_t - b0)`), so one forward serves all.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vpt.block_names import BLOCK_PARAMS, TOP_PARAMS
from vpt.errors import TaskSpecError
from vpt.methods.base import Build, Component, Field

if TYPE_CHECKING:
    from vpt.backbone import Backbone
    from vpt.methods.context import BatchContext
    from vpt.task import TaskSpec


def bias_names(backbone: Backbone) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every backbone parameter ending in `bias`, in the model's order."""
    return [(n, tuple(p.shape)) for n, p in backbone.model.named_parameters() if n.endswith("bias")]


def _supported(name: str) -> bool:
    if name in TOP_PARAMS:
        return True
    parts = name.split(".", 2)
    return len(parts) == 3 and parts[0] == "blocks" and parts[2] in BLOCK_PARAMS


class FlatParams(nn.Module):
    """Named backbone-shaped tensors kept as one flat trainable vector (cheap to bank and gather)."""

    def __init__(self, names: list[tuple[str, tuple[int, ...]]]) -> None:
        super().__init__()
        self.names = names
        self.values = nn.Parameter(torch.zeros(sum(_numel(s) for _, s in names)))   # (n,)

    def split(self) -> dict[str, Tensor]:
        """name -> view of the parameter in its own shape."""
        return self.split_names(self.names, self.values)

    @staticmethod
    def split_names(names: list[tuple[str, tuple[int, ...]]], flat: Tensor) -> dict[str, Tensor]:
        """name -> view of the flat vector `flat` (n,) in its own shape."""
        out, at = {}, 0
        for name, shape in names:
            n = _numel(shape)
            out[name] = flat[at:at + n].reshape(shape)
            at += n
        return out

    def copy_from(self, backbone: Backbone) -> None:
        state = dict(backbone.model.named_parameters())
        with torch.no_grad():
            self.values.copy_(torch.cat([state[n].detach().reshape(-1).to(self.values) for n, _ in self.names]))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


class BackboneCopy(Component):
    """A component that tunes its own copy of some backbone parameters (`param_names`), kept as one
    flat vector (`FlatParams`) and stored in the task file as `<file_prefix>.<parameter name>`."""

    file_prefix = ""

    def param_names(self, backbone: Backbone) -> list[tuple[str, tuple[int, ...]]]:
        raise NotImplementedError

    def create(self, spec: TaskSpec, backbone: Backbone) -> nn.Module:
        module = FlatParams(self.param_names(backbone))
        module.copy_from(backbone)
        return module

    def init(self, module: nn.Module, spec: TaskSpec, backbone: Backbone, generator: torch.Generator | None) -> None:
        module.copy_from(backbone)   # tuning starts from the pretrained values

    def file_shapes(self, spec: TaskSpec, backbone: Backbone) -> dict[str, tuple[int, ...]]:
        return {f"{self.file_prefix}.{n}": s for n, s in self.param_names(backbone)}

    def to_file(self, module: nn.Module | None) -> dict[str, Tensor]:
        return {f"{self.file_prefix}.{n}": t for n, t in module.split().items()}

    def from_file(self, module: nn.Module | None, tensors: dict[str, Tensor]) -> None:
        module.values.copy_(torch.cat([tensors[f"{self.file_prefix}.{n}"].reshape(-1) for n, _ in module.names]))

    def weight_overrides(self, module: nn.Module | None, backbone: Backbone) -> dict[str, Tensor]:
        return {n: t.to(backbone.device, backbone.dtype) for n, t in module.split().items()}


class Bias(BackboneCopy):
    name = "bias"
    fields = (Field("bias", length_dim=0),)
    file_prefix = "bias"

    def param_names(self, backbone: Backbone) -> list[tuple[str, tuple[int, ...]]]:
        return bias_names(backbone)

    def check(self, spec: TaskSpec, backbone: Backbone | None) -> None:
        if backbone is None:
            return
        odd = [n for n, _ in bias_names(backbone) if not _supported(n)]
        if odd or type(backbone.model.patch_embed.norm) is not nn.Identity:
            raise TaskSpecError(f"bias tuning does not support this backbone (biases {odd[:4]} or a patch norm)")

    def slot_tensors(self, module: nn.Module | None, spec: TaskSpec, build: Build) -> dict[str, Tensor]:
        bb = build.backbone
        state = dict(bb.model.named_parameters())
        base = torch.cat([state[n].reshape(-1) for n, _ in module.names])                 # (n,)
        return {"bias": (module.values.to(bb.device, bb.dtype) - base)[None]}             # (1, n) change

    def prepare(self, ctx: BatchContext) -> None:
        # every sample adds its row: a task without biases has a zero row, and x + 0 is x exactly
        delta = ctx.gather("bias")                                                          # (B, n)
        at = 0
        for name, shape in bias_names(ctx.backbone):
            n = _numel(shape)
            ctx.per_sample["bias:" + name] = delta[:, at:at + n]                           # (B, n_name)
            at += n
