"""A task's spec and its file's metadata: what a task is, checked without torch.

`TaskSpec` names a task's method, prompts, classes, head and pooling and refuses what cannot work;
the checks that depend on a backbone's shape run with the components (`TaskSpec.check`, torch).
`read_metadata` reads a task file's header alone. Front ends check training options and uploaded
files' headers with this module and never import torch for it; `vpt.task` builds the tensors.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING

from vpt.errors import TaskFileError, TaskSpecError
from vpt.method_names import PROMPTED, check_combination, check_head, parse_method

if TYPE_CHECKING:
    from vpt.backbone import Backbone

METHODS = ("linear", "vpt-shallow", "vpt-deep")        # the `vpt-task/1` methods
FORMAT = "vpt-task/1"
FORMAT_V2 = "vpt-task/2"
MAX_PROMPTS = 1024
MAX_CLASSES = 100_000
MAX_REDUCTION = 4096


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
        prompted = bool(PROMPTED & set(self.components))
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
        check_head(self.head)
        check_combination(self.components, self.pooling)

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

    def check(self, backbone: Backbone) -> None:
        """Every component's checks that depend on `backbone`'s shape (the rest ran at construction)."""
        from vpt.methods import components_of  # the components are torch modules: loaded where tensors are

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


def spec_from_metadata(meta: dict[str, str]) -> TaskSpec:
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


__all__ = ["FORMAT", "FORMAT_V2", "MAX_CLASSES", "MAX_PROMPTS", "MAX_REDUCTION", "METHODS", "TaskSpec",
           "parse_layers", "read_metadata", "spec_from_metadata"]
