"""The methods' names and the rules a spec obeys without a backbone: no torch here.

A front end checks training options and task specs with these alone; the components themselves
(`vpt.methods`, torch modules) load where tensors are made, served or trained, and add the checks
that depend on a backbone's shape.
"""
from __future__ import annotations

import re

from vpt.errors import TaskSpecError

# Method components in their canonical order within a method name (vpt.methods.COMPONENTS holds them).
COMPONENT_NAMES = ("vpt-shallow", "vpt-deep", "bias", "adapter", "partial-1")
PROMPTED = frozenset({"vpt-shallow", "vpt-deep"})
EXCLUSIVE = (PROMPTED,)
POOLINGS = ("cls", "image_mean", "prompt_mean", "all_mean")
MAX_HEAD_DEPTH = 8
_HEAD_RE = re.compile(r"mlp-([2-9])")


def parse_method(method: str) -> tuple[str, ...]:
    """`"vpt-deep+bias"` -> ("vpt-deep", "bias"); `"linear"` -> (). Any order in, canonical out."""
    if not isinstance(method, str) or not method:
        raise TaskSpecError(f"method must be a non-empty string, got {method!r}")
    if method == "linear":
        return ()
    parts = method.split("+")
    unknown = [p for p in parts if p not in COMPONENT_NAMES]
    if unknown:
        raise TaskSpecError(f"unknown method component(s) {unknown}; expected 'linear' or '+'-joined "
                            f"components of {list(COMPONENT_NAMES)}")
    if len(set(parts)) != len(parts):
        raise TaskSpecError(f"method {method!r} repeats a component")
    for group in EXCLUSIVE:
        if len(group & set(parts)) > 1:
            raise TaskSpecError(f"method {method!r} combines {sorted(group)}; pick one")
    return tuple(name for name in COMPONENT_NAMES if name in parts)


def canonical_method(method: str) -> str:
    return "+".join(parse_method(method)) or "linear"


def check_head(head: str) -> str:
    """`head` when it names a head (`linear` or `mlp-k`); TaskSpecError otherwise."""
    if head == "linear" or (isinstance(head, str) and _HEAD_RE.fullmatch(head)):
        return head
    raise TaskSpecError(f"unknown head {head!r}; expected 'linear' or 'mlp-k' with k in 2..{MAX_HEAD_DEPTH}")


def check_combination(components: tuple[str, ...], pooling: str) -> None:
    """The rules between a spec's parts that need no backbone."""
    if "partial-1" in components and "bias" in components:
        raise TaskSpecError("partial-1 already tunes the last block's biases; it cannot be combined with bias")
    if pooling not in POOLINGS:
        raise TaskSpecError(f"unknown pooling {pooling!r}; expected one of {list(POOLINGS)}")
    if pooling == "prompt_mean" and not PROMPTED & set(components):
        raise TaskSpecError("pooling prompt_mean needs prompts (vpt-shallow or vpt-deep)")


__all__ = ["COMPONENT_NAMES", "EXCLUSIVE", "MAX_HEAD_DEPTH", "POOLINGS", "PROMPTED", "canonical_method",
           "check_combination", "check_head", "parse_method"]
