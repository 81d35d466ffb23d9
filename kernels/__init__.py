"""Attention kernels: the prompt-fused Triton kernel, the torch path and a float64 reference.

The errors load with the package; everything else needs torch and loads on first use (PEP 562), so a
process that only names the kernels' errors (a front end translating them) never imports torch.
"""
from __future__ import annotations

from kernels.errors import AttentionInputError, BackendUnavailable, KernelError
from vpt.lazy import lazy_exports

_WHERE = {name: "kernels.dispatch" for name in ("attention", "check_inputs", "get_backend", "resolve_backend",
                                                "set_backend")}
_WHERE["attention_reference"] = "kernels.reference"
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)


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
