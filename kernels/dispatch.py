"""The single attention entry point every prompted block calls.

`attention(q, k, v, seq_len, bank_k, bank_v, slot, prompt_len, scale)`: each sample's queries
attend to its own first `seq_len[b]` keys and then to the first `prompt_len[slot[b]]` prompt keys
of bank slot `slot[b]`. On CUDA tensors the Triton kernel reads the prompt keys straight from the
bank; elsewhere the torch path gathers and concatenates them for SDPA.
"""
from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import Tensor

from kernels.errors import AttentionInputError, BackendUnavailable
from kernels.torch_attention import torch_attention

log = logging.getLogger(__name__)

Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")
_default_backend: Backend = "auto"


def set_backend(name: str) -> None:
    """Set the process-wide default backend (`auto`, `triton` or `torch`)."""
    global _default_backend
    if name not in _BACKENDS:
        raise AttentionInputError(f"unknown attention backend {name!r}; expected one of {_BACKENDS}")
    _default_backend = name  # type: ignore[assignment]


def get_backend() -> Backend:
    return _default_backend


def _triton_available_for(t: Tensor) -> bool:
    if t.is_cuda:
        try:
            import kernels.triton_attention  # noqa: F401
        except ImportError:
            return False
        return True
    return False


def resolve_backend(q: Tensor, backend: str | None = None, *, needs_grad: bool = False) -> str:
    """Pick the backend for these tensors: Triton on CUDA, torch elsewhere, unless overridden.

    The Triton kernel is forward-only: when gradients are needed the torch path runs, unless this
    call named `backend="triton"` itself, which is an error.
    """
    name = backend or _default_backend
    if name not in _BACKENDS:
        raise AttentionInputError(f"unknown attention backend {name!r}; expected one of {_BACKENDS}")
    if needs_grad:
        if backend == "triton":
            raise BackendUnavailable("the Triton attention kernel has no backward; use backend='torch' to train")
        return "torch"
    if name == "auto":
        return "triton" if _triton_available_for(q) else "torch"
    return name


def check_inputs(
    q: Tensor, k: Tensor, v: Tensor, seq_len: Tensor | None,
    bank_k: Tensor | None, bank_v: Tensor | None, slot: Tensor | None, prompt_len: Tensor | None,
) -> None:
    """Clear errors for inputs that do not fit together."""
    if q.dim() != 4:
        raise AttentionInputError(f"q must be (B, H, N, D), got shape {tuple(q.shape)}")
    B, H, N, D = q.shape
    if k.shape != q.shape or v.shape != q.shape:
        raise AttentionInputError(f"q, k, v shapes differ: {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise AttentionInputError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise AttentionInputError("q, k, v must be on one device")
    if seq_len is not None and (seq_len.shape != (B,) or seq_len.dtype.is_floating_point):
        raise AttentionInputError(f"seq_len must be an integer tensor of shape ({B},)")
    if (bank_k is None) != (bank_v is None):
        raise AttentionInputError("bank_k and bank_v must both be given or both be None")
    if bank_k is None:
        return
    if bank_k.dim() != 4 or bank_k.shape[1] != H or bank_k.shape[3] != D:
        raise AttentionInputError(f"bank must be (slots, {H}, P_max, {D}), got {tuple(bank_k.shape)}")
    if bank_v.shape != bank_k.shape:
        raise AttentionInputError(f"bank_k {tuple(bank_k.shape)} and bank_v {tuple(bank_v.shape)} differ")
    if bank_k.dtype != q.dtype or bank_v.dtype != q.dtype:
        raise AttentionInputError(f"bank dtype {bank_k.dtype} differs from q dtype {q.dtype}")
    if bank_k.device != q.device or bank_v.device != q.device:
        raise AttentionInputError("bank and q must be on one device")
    if slot is None or slot.shape != (B,) or slot.dtype.is_floating_point:
        raise AttentionInputError(f"slot must be an integer tensor of shape ({B},) when a bank is given")
    if prompt_len is not None and (prompt_len.shape != (bank_k.shape[0],) or prompt_len.dtype.is_floating_point):
        raise AttentionInputError(f"prompt_len must be an integer tensor of shape ({bank_k.shape[0]},)")


def attention(
    q: Tensor, k: Tensor, v: Tensor,
    seq_len: Tensor | None,
    bank_k: Tensor | None, bank_v: Tensor | None,
    slot: Tensor | None, prompt_len: Tensor | None,
    scale: float,
    *,
    backend: str | None = None,
    check: bool = True,
) -> Tensor:
    """(B, H, N, D) output of each sample over [own valid keys ; its task's valid prompt keys].

    q, k, v: (B, H, N, D); seq_len: (B,) or None (all N valid);
    bank_k, bank_v: (slots, H, P_max, D) or None (no prompts); slot: (B,) bank slot per sample;
    prompt_len: (slots,) valid prompt rows per slot, or None (all P_max valid).
    """
    if check:
        check_inputs(q, k, v, seq_len, bank_k, bank_v, slot, prompt_len)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, bank_k, bank_v))
    name = resolve_backend(q, backend, needs_grad=needs_grad)
    if name == "triton":
        try:
            from kernels.triton_attention import triton_attention
        except ImportError as e:
            raise BackendUnavailable(f"the Triton attention kernel is unavailable: {e}") from e
        return triton_attention(q, k, v, seq_len, bank_k, bank_v, slot, prompt_len, scale, check=False)  # checked above
    return torch_attention(q, k, v, seq_len, bank_k, bank_v, slot, prompt_len, scale)
