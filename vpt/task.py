"""Tasks: their spec, their trainable tensors, and the portable task file (safetensors).

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
from vpt.methods import HEAD_BIAS_INIT, POOLINGS, Build, components_of, head_component, parse_method

if TYPE_CHECKING:  # annotations only: a task's file and spec checks need no timm
    from vpt.backbone import Backbone

METHODS = ("linear", "vpt-shallow", "vpt-deep")        # the `vpt-task/1` methods
FORMAT = "vpt-task/1"
FORMAT_V2 = "vpt-task/2"
MAX_PROMPTS = 1024
MAX_CLASSES = 100_000
MAX_REDUCTION = 4096
_FILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_PROMPTED = {"vpt-shallow", "vpt-deep"}

__all__ = ["FORMAT", "FORMAT_V2", "HEAD_BIAS_INIT", "MAX_CLASSES", "MAX_PROMPTS", "METHODS", "LoadedTask",
           "TaskParams", "TaskSpec", "load_task_file", "parse_layers", "read_metadata", "save_task_file"]


def parse_layers(text: str | None) -> tuple[int, int] | None:
    """`"i-j"` (inclusive block indices) -> (i, j); None or "" -> None (all blocks)."""
    if text is None or text == "" or text == "all":
        return None
    try:
        first, last = (int(v) for v in str(text).split("-"))
    except ValueError:
        raise TaskSpecError(f"prompt_layers must look like 'i-j' (e.g. '0-5'), got {text!r}") from None
    if not 0 <= first <= last:
        raise TaskSpecError(f"prompt_layers must satisfy 0 <= i <= j, got {text!r}")
    return first, last


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: method (components), prompt count, class names, head, pooling and their options."""

    method: str
    num_prompts: int
    classes: tuple[str, ...]
    prompt_dropout: float = 0.0
    head: str = "linear"
    pooling: str = "cls"
    prompt_layers: tuple[int, int] | None = None
    adapter_reduction: int = 64

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", "+".join(parse_method(self.method)) or "linear")
        prompted = bool(_PROMPTED & set(self.components))
        if not prompted:
            object.__setattr__(self, "num_prompts", 0)
        elif not isinstance(self.num_prompts, int) or not 1 <= self.num_prompts <= MAX_PROMPTS:
            raise TaskSpecError(f"num_prompts must be in 1..{MAX_PROMPTS} for {self.method}, got {self.num_prompts}")
        if len(self.classes) < 1 or len(self.classes) > MAX_CLASSES:
            raise TaskSpecError(f"a task needs 1..{MAX_CLASSES} classes, got {len(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise TaskSpecError("class names must be unique")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise TaskSpecError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if isinstance(self.prompt_layers, str):
            object.__setattr__(self, "prompt_layers", parse_layers(self.prompt_layers))
        if self.prompt_layers is not None and "vpt-deep" not in self.components:
            raise TaskSpecError("prompt_layers applies to vpt-deep only")
        r = self.adapter_reduction
        if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= MAX_REDUCTION:
            raise TaskSpecError(f"adapter_reduction must be an integer in 1..{MAX_REDUCTION}, got {r!r}")
        head_component(self.head)
        if self.pooling not in POOLINGS:
            raise TaskSpecError(f"unknown pooling {self.pooling!r}; expected one of {list(POOLINGS)}")
        self.check(None)

    @property
    def components(self) -> tuple[str, ...]:
        return parse_method(self.method)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def is_v1(self) -> bool:
        """Expressible as a `vpt-task/1` file."""
        return (self.method in METHODS and self.head == "linear" and self.pooling == "cls"
                and self.prompt_layers is None)

    def check(self, backbone: Backbone | None) -> None:
        """Every component's own checks (with `backbone`: those that depend on its shape)."""
        for _, comp in components_of(self.components, self.head):
            comp.check(self, backbone)

    def metadata(self) -> dict[str, str]:
        meta = {"method": self.method, "num_prompts": str(self.num_prompts)}
        if not self.is_v1:
            meta["head"] = self.head
            meta["pooling"] = self.pooling
            if self.prompt_layers is not None:
                meta["prompt_layers"] = f"{self.prompt_layers[0]}-{self.prompt_layers[1]}"
            if "adapter" in self.components:
                meta["adapter_reduction"] = str(self.adapter_reduction)
        return meta


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


def read_metadata(blob: bytes) -> dict[str, str]:
    """The string metadata of a task file, without loading tensors."""
    if len(blob) < 8:
        raise TaskFileError("task file is truncated (shorter than its header length)")
    n = int.from_bytes(blob[:8], "little")
    if n <= 0 or 8 + n > len(blob):
        raise TaskFileError("task file is truncated or not a safetensors file")
    try:
        header = json.loads(blob[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TaskFileError(f"task file header is not valid JSON: {e}") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise TaskFileError("task file has no metadata")
    return {str(k): str(v) for k, v in meta.items()}


def _spec_from_metadata(meta: dict[str, str]) -> TaskSpec:
    fmt = meta.get("format")
    if fmt not in (FORMAT, FORMAT_V2):
        raise TaskFileError(f"unsupported task file format {fmt!r}; expected {FORMAT!r} or {FORMAT_V2!r}")
    try:
        classes = json.loads(meta["classes"])
        num_prompts = int(meta.get("num_prompts", "0"))
        dropout = float(meta.get("prompt_dropout", "0.0"))
        method = meta["method"]
        options = {"head": meta.get("head", "linear"), "pooling": meta.get("pooling", "cls"),
                   "prompt_layers": meta.get("prompt_layers"),
                   "adapter_reduction": int(meta.get("adapter_reduction", "64"))}
    except KeyError as e:
        raise TaskFileError(f"task file metadata lacks {e.args[0]!r}") from e
    except (ValueError, json.JSONDecodeError, RecursionError) as e:
        raise TaskFileError(f"task file metadata is malformed: {type(e).__name__}") from e
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise TaskFileError("task file metadata 'classes' must be a JSON list of strings")
    if fmt == FORMAT and method not in METHODS:
        raise TaskFileError(f"a {FORMAT} file holds one of {list(METHODS)}, not {method!r}")
    try:
        if fmt == FORMAT:
            options = {}
        return TaskSpec(method=method, num_prompts=num_prompts, classes=tuple(classes), prompt_dropout=dropout,
                        **options)
    except TaskSpecError as e:
        raise TaskFileError(f"task file spec is invalid: {e}") from e


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
    spec = _spec_from_metadata(meta)
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


