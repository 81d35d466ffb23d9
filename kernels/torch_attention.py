"""The portable path: gather each sample's prompt keys from the bank, concatenate, run SDPA.

A key mask is built only when lengths differ inside the batch; with equal lengths SDPA runs
unmasked (on CUDA that keeps the Flash backend available). Finding that out reads the lengths back
to the host, which a CUDA graph capture cannot do: inside `static_masks()` the mask is always built
from the lengths on the device (same result, decided from shapes alone).
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

_STATIC = contextvars.ContextVar("vpt_static_masks", default=False)


@contextlib.contextmanager
def static_masks() -> Iterator[None]:
    """Masks decided from shapes only (no host reads) while inside: for CUDA graph capture."""
    token = _STATIC.set(True)
    try:
        yield
    finally:
        _STATIC.reset(token)


def _key_mask(n: int, p: int, seq_len: Tensor | None, plen: Tensor | None, device: torch.device) -> Tensor | None:
    """(B, 1, 1, n + p) boolean mask of valid keys, or None when every key is valid."""
    if _STATIC.get():
        own_full, prompt_full = seq_len is None, plen is None or p == 0
    else:
        own_full = seq_len is None or bool((seq_len == n).all())
        prompt_full = plen is None or p == 0 or bool((plen == p).all())
    if own_full and prompt_full:
        return None
    parts = []
    B = (seq_len if seq_len is not None else plen).shape[0]
    if own_full:
        parts.append(torch.ones(B, n, dtype=torch.bool, device=device))
    else:
        parts.append(torch.arange(n, device=device)[None, :] < seq_len[:, None])  # (B, n)
    if p > 0:
        if prompt_full:
            parts.append(torch.ones(B, p, dtype=torch.bool, device=device))
        else:
            parts.append(torch.arange(p, device=device)[None, :] < plen[:, None])  # (B, p)
    return torch.cat(parts, dim=1)[:, None, None, :]  # (B, 1, 1, n + p)


def torch_attention(
    q: Tensor, k: Tensor, v: Tensor,
    seq_len: Tensor | None,
    bank_k: Tensor | None, bank_v: Tensor | None,
    slot: Tensor | None, prompt_len: Tensor | None,
    scale: float,
) -> Tensor:
    """Attention of each sample's queries over [own keys ; its task's prompt keys]."""
    B, H, N, D = q.shape
    plen = None
    if bank_k is not None and bank_k.shape[2] > 0:  # callers trim the bank to the batch's longest prompt
        plen = prompt_len.index_select(0, slot) if prompt_len is not None else None  # (B,)
        k = torch.cat([k, bank_k.index_select(0, slot)], dim=2)  # (B, H, N + P, D)
        v = torch.cat([v, bank_v.index_select(0, slot)], dim=2)  # (B, H, N + P, D)
    p = k.shape[2] - N
    mask = _key_mask(N, p, seq_len, plen, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)  # (B, H, N, D)
