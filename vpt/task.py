"""Tasks: their trainable tensors and the portable task file (safetensors); the spec is `vpt.spec`.

What each method trains, stores and serves is declared by its component in `vpt.methods`;
this module only composes them. `vpt-task/1` files (linear, vpt-shallow, vpt-deep with a linear
head on CLS) keep loading unchanged; anything else is written as `vpt-task/2`.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from vpt.errors import TaskFileError, TaskSpecError
from vpt.methods import HEAD_BIAS_INIT, Build, components_of
from vpt.spec import (
    FORMAT,
    FORMAT_V2,
    MAX_CLASSES,
    MAX_PROMPTS,
    MAX_REDUCTION,
    METHODS,
    TaskSpec,
    parse_layers,
    read_metadata,
    spec_from_metadata,
)

if TYPE_CHECKING:  # annotations only: a task's file and spec checks need no timm
    from vpt.backbone import Backbone

_FILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

__all__ = ["FORMAT", "FORMAT_V2", "HEAD_BIAS_INIT", "MAX_CLASSES", "MAX_PROMPTS", "MAX_REDUCTION", "METHODS",
           "LoadedTask", "TaskParams", "TaskSpec", "load_task_file", "parse_layers", "read_metadata",
           "save_task_file"]


class TaskParams(nn.Module):
    """The trainable part of a task: one submodule per component that trains something (`parts`)."""

    def __init__(self, spec: TaskSpec, backbone: Backbone) -> None:
        super().__init__()
        spec.check(backbone)
        self.spec = spec
        self.parts = nn.ModuleDict()
        self._components = components_of(spec.components, spec.head)
        for key, comp in self._components:
            module = comp.create(spec, backbone)
            if module is not None:
                self.parts[key] = module

    @classmethod
    def new(cls, spec: TaskSpec, backbone: Backbone, generator: torch.Generator | None = None) -> TaskParams:
        """Initialised as each component says (the official init for prompts and heads)."""
        params = cls(spec, backbone)
        for key, comp, module in params.components():
            comp.init(module, spec, backbone, generator)
        return params

    def components(self) -> list[tuple[str, Any, nn.Module | None]]:
        parts = dict(self.parts.items())
        return [(key, comp, parts.get(key)) for key, comp in self._components]

    @property
    def prompts(self) -> nn.Parameter | None:
        for key in ("vpt-deep", "vpt-shallow"):
            if key in self.parts:
                return self.parts[key].prompts
        return None

    @property
    def head(self) -> nn.Module:
        return self.parts["head"]

    def num_trainable(self) -> dict[str, int]:
        """Trainable values per component (prompts, bias, adapter, partial, head) and their total."""
        counts: dict[str, int] = {"prompts": 0}
        for key, comp, module in self.components():
            if module is not None:
                name = comp.count_key or comp.name
                counts[name] = counts.get(name, 0) + sum(p.numel() for p in module.parameters())
        counts["total"] = sum(counts.values())
        return counts

    def weight_overrides(self, backbone: Backbone) -> dict[str, Tensor]:
        """Backbone parameter name -> this task's value, for every weight its components replace."""
        out: dict[str, Tensor] = {}
        for _, comp, module in self.components():
            out.update(comp.weight_overrides(module, backbone))
        return out

    def slot_tensors(self, backbone: Backbone, samples: int = 1, dropout: float = 0.0) -> dict[str, Tensor]:
        """Every component's bank tensors, each with a leading rows dim (1, or `samples`)."""
        build = Build(backbone, self.weight_overrides(backbone), samples, dropout)
        out: dict[str, Tensor] = {}
        for _, comp, module in self.components():
            out.update(comp.slot_tensors(module, self.spec, build))
        return out


@dataclass
class LoadedTask:
    spec: TaskSpec
    params: TaskParams
    metadata: dict[str, str] = field(default_factory=dict)


def save_task_file(params: TaskParams, backbone: Backbone, extra: dict[str, Any] | None = None) -> bytes:
    """The portable task file: safetensors tensors + string metadata (see DESIGN.md)."""
    spec = params.spec
    tensors: dict[str, Tensor] = {}
    for _, comp, module in params.components():
        for name, t in comp.to_file(module).items():
            tensors[name] = t.detach().float().cpu().contiguous()
    meta = {
        "format": FORMAT if spec.is_v1 else FORMAT_V2, **spec.metadata(),
        "classes": json.dumps(list(spec.classes)), "prompt_dropout": repr(spec.prompt_dropout),
        "backbone": backbone.name, "backbone_fingerprint": backbone.fingerprint,
        "created_at": repr(time.time()),
        "trainable_parameters": str(params.num_trainable()["total"]),
        "bank_values": str(bank_values(params, backbone)),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return st_save(tensors, metadata=meta)


def bank_values(params: TaskParams, backbone: Backbone) -> int:
    """Scalars the bank holds for this task (times the serving dtype's size = its bank bytes)."""
    with torch.inference_mode():
        return sum(t[0].numel() for t in params.slot_tensors(backbone).values())


def _check_tensor(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...]) -> Tensor:
    t = tensors[name]
    if tuple(t.shape) != shape:
        raise TaskFileError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {shape}")
    if t.dtype not in _FILE_DTYPES:
        raise TaskFileError(f"tensor {name!r} has dtype {t.dtype}, expected float32 (or float16/bfloat16/float64)")
    if not torch.isfinite(t.float()).all():
        raise TaskFileError(f"tensor {name!r} holds NaN or infinite values")
    return t.float()


def load_task_file(blob: bytes, backbone: Backbone, *, check_fingerprint: bool = True) -> LoadedTask:
    """Parse and validate a task file against the running backbone; typed errors name the problem."""
    meta = read_metadata(blob)
    spec = spec_from_metadata(meta)
    if check_fingerprint and meta.get("backbone_fingerprint") != backbone.fingerprint:
        raise TaskFileError(
            f"task was trained on backbone {meta.get('backbone')!r} "
            f"(fingerprint {str(meta.get('backbone_fingerprint'))[:12]}), but the backbone loaded here is "
            f"{backbone.name!r} (fingerprint {backbone.fingerprint[:12]}); load the backbone it was trained on "
            "(same name, weights and model kwargs)", code="backbone_mismatch")
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise TaskFileError(f"task file tensors cannot be read: {e}") from e
    try:
        params = TaskParams(spec, backbone)
    except TaskSpecError as e:
        raise TaskFileError(f"task file spec does not fit the backbone: {e}") from e
    parts = params.components()
    expected = {n: s for _, comp, _ in parts for n, s in comp.file_shapes(spec, backbone).items()}
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise TaskFileError(f"task file tensors do not fit method {spec.method!r} (head {spec.head}): "
                            f"missing {missing[:6]}, unexpected {extra[:6]}")
    checked = {n: _check_tensor(tensors, n, s) for n, s in expected.items()}
    with torch.no_grad():
        for _, comp, module in parts:
            comp.from_file(module, checked)
    params.requires_grad_(False)
    return LoadedTask(spec=spec, params=params, metadata=meta)


