"""Attention kernels: the prompt-fused Triton kernel, the torch path and a float64 reference.

The names below load on first use: importing `kernels.errors` alone (as the HTTP front ends do,
for error translation) never imports torch or Triton. The attention function itself is
`kernels.attention.attention` (`kernels.attention` is its module).
"""
from __future__ import annotations

from vpt.lazy import lazy_exports

_WHERE = {
    "check_inputs": "kernels.attention", "get_backend": "kernels.attention",
    "resolve_backend": "kernels.attention", "set_backend": "kernels.attention",
    "AttentionInputError": "kernels.errors", "BackendUnavailable": "kernels.errors", "KernelError": "kernels.errors",
    "attention_reference": "kernels.reference",
}
__all__ = list(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
