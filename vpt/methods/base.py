"""What a tuning method declares: one `Component` per method part, the head and the pooling.

A component owns
- its trainable parameters (`create`, `init`) and optimizer facts (`no_decay`, `zero_grad_ok`),
- its task-file tensors (`to_file`, `file_shapes`, `from_file`),
- the per-slot bank tensors it needs at serving (`fields`, `slot_tensors`),
- how it changes the forward (`prepare`: it reads its table fields and installs hooks on the
  batch context; the engine runs those hooks and knows nothing else about methods),
- the backbone weights it replaces for its task (`weight_overrides`: tuned biases, partial blocks),
  which other components use when they precompute (deep prompt keys/values).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from vpt.backbone import Backbone
    from vpt.methods.context import BatchContext
    from vpt.task import TaskSpec


@dataclass(frozen=True)
class Field:
    """A per-slot bank tensor. `length_dim`: the dim whose size is a slot's valid length
    (the table keeps it per slot); every dim pads with zeros to the widest slot."""

    name: str
    length_dim: int | None = None


@dataclass
class Build:
    """What `slot_tensors` gets: the task's merged weight overrides, and whether to make
    `samples` per-sample rows (prompt dropout in training) instead of one row."""

    backbone: Backbone
    overrides: dict[str, Tensor] = field(default_factory=dict)   # backbone param name -> tuned tensor
    samples: int = 1
    dropout: float = 0.0
    training: bool = False


class Component:
    """Base: a component that adds nothing. Subclasses override what they change."""

    name: str = ""
    kind: str = "method"          # "method" | "head" | "pooling"
    count_key: str = ""           # key in the trainable-parameter count ("" = the name)
    fields: tuple[Field, ...] = ()
    # `prepare` and the forward hooks decide from shapes only, never from values read back to the host,
    # so a batch of this component can be captured in a CUDA graph (vpt/graphs.py)
    capturable: bool = True

    def check(self, spec: TaskSpec, backbone: Backbone | None) -> None:
        """Raise TaskSpecError when `spec` (with this component) cannot work on `backbone`."""

    def create(self, spec: TaskSpec, backbone: Backbone) -> nn.Module | None:
        """The trainable parameters (any values); None when the component trains nothing."""
        return None

    def init(self, module: nn.Module, spec: TaskSpec, backbone: Backbone, generator: torch.Generator | None) -> None:
        """Initial values for training."""

    def file_shapes(self, spec: TaskSpec, backbone: Backbone) -> dict[str, tuple[int, ...]]:
        return {}

    def to_file(self, module: nn.Module | None) -> dict[str, Tensor]:
        return {}

    def from_file(self, module: nn.Module | None, tensors: dict[str, Tensor]) -> None:
        """Copy checked tensors (names from `file_shapes`) into `module`."""

    def no_decay(self, module: nn.Module | None) -> list[nn.Parameter]:
        return []

    def zero_grad_ok(self, module: nn.Module | None) -> list[nn.Parameter]:
        """Parameters whose first gradient may legitimately be all zero."""
        return []

    def weight_overrides(self, module: nn.Module | None, backbone: Backbone) -> dict[str, Tensor]:
        return {}

    def slot_tensors(self, module: nn.Module | None, spec: TaskSpec, build: Build) -> dict[str, Tensor]:
        """Bank tensors, each with a leading rows dim (1, or `build.samples`)."""
        return {}

    def prepare(self, ctx: BatchContext) -> None:
        """Install this component's forward hooks on `ctx` (called when its fields are in the table)."""

    def has_hidden(self, tensors: dict[str, Tensor]) -> bool:
        """Heads: does this task (its bank tensors) have layers before the last linear one?"""
        return False

    def hidden_one(self, tensors: dict[str, Tensor], x: Tensor) -> Tensor:
        """Heads: (n, d) features of one task's samples through its hidden layers (eval mode)."""
        return x

    def metadata(self, spec: TaskSpec) -> dict[str, str]:
        return {}


Hook = Callable[..., Any]
