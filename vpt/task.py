"""Tasks: their spec, their trainable tensors, and the portable task file (safetensors)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor, nn

from vpt.backbone import Backbone
from vpt.errors import TaskFileError, TaskSpecError

METHODS = ("linear", "vpt-shallow", "vpt-deep")
FORMAT = "vpt-task/1"
MAX_PROMPTS = 1024
MAX_CLASSES = 100_000
_FILE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
HEAD_BIAS_INIT = -math.log(0.99 / 0.01)  # -4.59512, the official head's bias init


@dataclass(frozen=True)
class TaskSpec:
    """What a task is: method, prompt count, class names, prompt dropout (training only)."""

    method: str
    num_prompts: int
    classes: tuple[str, ...]
    prompt_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise TaskSpecError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.method == "linear" and self.num_prompts != 0:
            object.__setattr__(self, "num_prompts", 0)
        if self.method != "linear" and not 1 <= self.num_prompts <= MAX_PROMPTS:
            raise TaskSpecError(f"num_prompts must be in 1..{MAX_PROMPTS} for {self.method}, got {self.num_prompts}")
        if len(self.classes) < 1 or len(self.classes) > MAX_CLASSES:
            raise TaskSpecError(f"a task needs 1..{MAX_CLASSES} classes, got {len(self.classes)}")
        if len(set(self.classes)) != len(self.classes):
            raise TaskSpecError("class names must be unique")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise TaskSpecError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def prompt_layers(self, depth: int) -> int:
        """L_p: rows of the `prompts` tensor (depth for deep, 1 for shallow, 0 for linear)."""
        return {"linear": 0, "vpt-shallow": 1, "vpt-deep": depth}[self.method]


class TaskParams(nn.Module):
    """The trainable part of a task: prompts `(L_p, p, d)` (absent for linear) and a linear head."""

    def __init__(self, spec: TaskSpec, embed_dim: int, depth: int) -> None:
        super().__init__()
        self.spec = spec
        layers = spec.prompt_layers(depth)
        self.prompts = nn.Parameter(torch.zeros(layers, spec.num_prompts, embed_dim)) if layers else None
        self.head = nn.Linear(embed_dim, spec.num_classes)

    @classmethod
    def new(cls, spec: TaskSpec, backbone: Backbone, generator: torch.Generator | None = None) -> TaskParams:
        """Initialised as the official code does: uniform prompts, kaiming-normal(fan_out) head, bias -4.595."""
        params = cls(spec, backbone.embed_dim, backbone.depth)
        with torch.no_grad():
            if params.prompts is not None:
                bound = backbone.prompt_init_bound
                params.prompts.uniform_(-bound, bound, generator=generator)
            std = math.sqrt(2.0 / spec.num_classes)  # kaiming normal, fan_out = C, gain sqrt(2)
            params.head.weight.normal_(0.0, std, generator=generator)
            params.head.bias.fill_(HEAD_BIAS_INIT)
        return params

    def num_trainable(self) -> dict[str, int]:
        prompts = self.prompts.numel() if self.prompts is not None else 0
        head = self.head.weight.numel() + self.head.bias.numel()
        return {"prompts": prompts, "head": head, "total": prompts + head}


@dataclass
class LoadedTask:
    spec: TaskSpec
    params: TaskParams
    metadata: dict[str, str] = field(default_factory=dict)


def save_task_file(
    params: TaskParams, backbone: Backbone, extra: dict[str, Any] | None = None
) -> bytes:
    """The portable task file: safetensors tensors + string metadata (see DESIGN.md)."""
    spec = params.spec
    tensors = {
        "head.weight": params.head.weight.detach().float().cpu().contiguous(),
        "head.bias": params.head.bias.detach().float().cpu().contiguous(),
    }
    if params.prompts is not None:
        tensors["prompts"] = params.prompts.detach().float().cpu().contiguous()
    meta = {
        "format": FORMAT, "method": spec.method, "num_prompts": str(spec.num_prompts),
        "classes": json.dumps(list(spec.classes)), "prompt_dropout": repr(spec.prompt_dropout),
        "backbone": backbone.name, "backbone_fingerprint": backbone.fingerprint,
        "created_at": repr(time.time()),
    }
    for key, value in (extra or {}).items():
        meta[key] = value if isinstance(value, str) else json.dumps(value)
    return st_save(tensors, metadata=meta)


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
    if meta.get("format") != FORMAT:
        raise TaskFileError(f"unsupported task file format {meta.get('format')!r}; expected {FORMAT!r}")
    try:
        classes = json.loads(meta["classes"])
        num_prompts = int(meta.get("num_prompts", "0"))
        dropout = float(meta.get("prompt_dropout", "0.0"))
        method = meta["method"]
    except KeyError as e:
        raise TaskFileError(f"task file metadata lacks {e.args[0]!r}") from e
    except (ValueError, json.JSONDecodeError, RecursionError) as e:
        raise TaskFileError(f"task file metadata is malformed: {type(e).__name__}") from e
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise TaskFileError("task file metadata 'classes' must be a JSON list of strings")
    try:
        return TaskSpec(method=method, num_prompts=num_prompts, classes=tuple(classes), prompt_dropout=dropout)
    except TaskSpecError as e:
        raise TaskFileError(f"task file spec is invalid: {e}") from e


def _check_tensor(tensors: dict[str, Tensor], name: str, shape: tuple[int, ...]) -> Tensor:
    if name not in tensors:
        raise TaskFileError(f"task file lacks tensor {name!r}")
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
    d, layers = backbone.embed_dim, spec.prompt_layers(backbone.depth)
    expected = {"head.weight", "head.bias"} | ({"prompts"} if layers else set())
    if set(tensors) != expected:
        raise TaskFileError(f"task file tensors are {sorted(tensors)}, expected {sorted(expected)}")
    params = TaskParams(spec, d, backbone.depth)
    with torch.no_grad():
        params.head.weight.copy_(_check_tensor(tensors, "head.weight", (spec.num_classes, d)))
        params.head.bias.copy_(_check_tensor(tensors, "head.bias", (spec.num_classes,)))
        if layers:
            params.prompts.copy_(_check_tensor(tensors, "prompts", (layers, spec.num_prompts, d)))
    params.requires_grad_(False)
    return LoadedTask(spec=spec, params=params, metadata=meta)
