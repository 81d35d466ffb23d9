"""Attention kernels: the prompt-fused Triton kernel, the torch path and a float64 reference.

The errors load with the package; everything else needs torch and loads on first use (PEP 562), so a
process that only names the kernels' errors (a front end translating them) never imports torch.
"""
from __future__ import annotations

import importlib
from typing import Any

from kernels.errors import AttentionInputError, BackendUnavailable, KernelError

_WHERE = {name: "kernels.dispatch" for name in ("attention", "check_inputs", "get_backend", "resolve_backend",
                                                "set_backend")}
_WHERE["attention_reference"] = "kernels.reference"


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # bound now: later lookups skip this function
    return value


__all__ = [
    "AttentionInputError",
    "BackendUnavailable",
    "KernelError",
    "attention",
    "attention_reference",
    "check_inputs",
    "get_backend",
    "resolve_backend",
    "set_backend",
]
