"""Attention kernels: the prompt-fused Triton kernel, the torch path and a float64 reference."""
from __future__ import annotations

from kernels.attention import attention, check_inputs, get_backend, resolve_backend, set_backend
from kernels.errors import AttentionInputError, BackendUnavailable, KernelError
from kernels.reference import attention_reference

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
