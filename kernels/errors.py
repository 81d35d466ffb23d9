"""Errors raised by the attention kernels."""
from __future__ import annotations


class KernelError(Exception):
    """Root of every error raised by `kernels`."""


class AttentionInputError(KernelError, ValueError):
    """Shapes, dtypes or devices passed to `attention` do not fit together."""


class BackendUnavailable(KernelError, RuntimeError):
    """The requested attention backend cannot run here (e.g. Triton without CUDA or interpreter)."""
