"""The registry of tuning methods. A task's method is `+`-joined components (DESIGN order:
`vpt-shallow` or `vpt-deep`, then `bias`, `adapter`, `partial-1`; `linear` = none), plus a head
(`linear` or `mlp-k`) and a pooling. Adding a method = adding one `Component` module here.
"""
from __future__ import annotations

import re

from vpt.errors import TaskSpecError
from vpt.methods.adapter import Adapter
from vpt.methods.base import Build, Component, Field
from vpt.methods.bias import Bias
from vpt.methods.context import BatchContext
from vpt.methods.head_linear import HEAD_BIAS_INIT, LinearHead
from vpt.methods.head_mlp import MLPHeadComponent
from vpt.methods.partial import Partial1
from vpt.methods.pooling import POOLINGS, Pooling
from vpt.methods.vpt_deep import VptDeep
from vpt.methods.vpt_shallow import VptShallow

# Method components in their canonical order within a method name.
COMPONENTS: dict[str, Component] = {c.name: c for c in (VptShallow(), VptDeep(), Bias(), Adapter(), Partial1())}
EXCLUSIVE = ({"vpt-shallow", "vpt-deep"},)
LINEAR_HEAD, MLP_HEAD, POOLING = LinearHead(), MLPHeadComponent(), Pooling()
MAX_HEAD_DEPTH = 8
_HEAD_RE = re.compile(r"mlp-([2-9])")


def parse_method(method: str) -> tuple[str, ...]:
    """`"vpt-deep+bias"` -> ("vpt-deep", "bias"); `"linear"` -> (). Any order in, canonical out."""
    if not isinstance(method, str) or not method:
        raise TaskSpecError(f"method must be a non-empty string, got {method!r}")
    if method == "linear":
        return ()
    parts = method.split("+")
    unknown = [p for p in parts if p not in COMPONENTS]
    if unknown:
        raise TaskSpecError(f"unknown method component(s) {unknown}; expected 'linear' or '+'-joined "
                            f"components of {list(COMPONENTS)}")
    if len(set(parts)) != len(parts):
        raise TaskSpecError(f"method {method!r} repeats a component")
    for group in EXCLUSIVE:
        if len(group & set(parts)) > 1:
            raise TaskSpecError(f"method {method!r} combines {sorted(group)}; pick one")
    return tuple(name for name in COMPONENTS if name in parts)


def canonical_method(method: str) -> str:
    return "+".join(parse_method(method)) or "linear"


def head_component(head: str) -> Component:
    if head == "linear":
        return LINEAR_HEAD
    if isinstance(head, str) and _HEAD_RE.fullmatch(head):
        return MLP_HEAD
    raise TaskSpecError(f"unknown head {head!r}; expected 'linear' or 'mlp-k' with k in 2..{MAX_HEAD_DEPTH}")


def components_of(components: tuple[str, ...], head: str) -> list[tuple[str, Component]]:
    """(module key, component) of a task: its method components, its head, its pooling."""
    out = [(name, COMPONENTS[name]) for name in components]
    return out + [("head", head_component(head)), ("pooling", POOLING)]


def forward_components() -> list[Component]:
    """Every registered component, in the order their forward hooks are installed."""
    return [*COMPONENTS.values(), LINEAR_HEAD, MLP_HEAD, POOLING]


FIELDS: dict[str, Field] = {f.name: f for c in forward_components() for f in c.fields}

__all__ = ["COMPONENTS", "FIELDS", "HEAD_BIAS_INIT", "POOLINGS", "BatchContext", "Build", "Component", "Field",
           "canonical_method", "components_of", "forward_components", "head_component", "parse_method"]
