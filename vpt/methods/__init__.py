"""The registry of tuning methods. A task's method is `+`-joined components (DESIGN order:
`vpt-shallow` or `vpt-deep`, then `bias`, `adapter`, `partial-1`; `linear` = none), plus a head
(`linear` or `mlp-k`) and a pooling. Adding a method = adding one `Component` module here (and its
name to `vpt.method_names`, where the checks that need no torch live).
"""
from __future__ import annotations

from vpt.method_names import EXCLUSIVE, MAX_HEAD_DEPTH, POOLINGS, canonical_method, check_head, parse_method
from vpt.methods.adapter import Adapter
from vpt.methods.base import Build, Component, Field
from vpt.methods.bias import Bias
from vpt.methods.context import BatchContext
from vpt.methods.head_linear import HEAD_BIAS_INIT, LinearHead
from vpt.methods.head_mlp import MLPHeadComponent
from vpt.methods.partial import Partial1
from vpt.methods.pooling import Pooling
from vpt.methods.vpt_deep import VptDeep
from vpt.methods.vpt_shallow import VptShallow

COMPONENTS: dict[str, Component] = {c.name: c for c in (VptShallow(), VptDeep(), Bias(), Adapter(), Partial1())}
LINEAR_HEAD, MLP_HEAD, POOLING = LinearHead(), MLPHeadComponent(), Pooling()


def head_component(head: str) -> Component:
    return LINEAR_HEAD if check_head(head) == "linear" else MLP_HEAD


def components_of(components: tuple[str, ...], head: str) -> list[tuple[str, Component]]:
    """(module key, component) of a task: its method components, its head, its pooling."""
    out = [(name, COMPONENTS[name]) for name in components]
    return out + [("head", head_component(head)), ("pooling", POOLING)]


def forward_components() -> list[Component]:
    """Every registered component, in the order their forward hooks are installed."""
    return [*COMPONENTS.values(), LINEAR_HEAD, MLP_HEAD, POOLING]


FIELDS: dict[str, Field] = {f.name: f for c in forward_components() for f in c.fields}

__all__ = ["COMPONENTS", "EXCLUSIVE", "FIELDS", "HEAD_BIAS_INIT", "MAX_HEAD_DEPTH", "POOLINGS", "BatchContext", "Build",
           "Component", "Field", "canonical_method", "components_of", "forward_components", "head_component", "parse_method"]
