"""A float64 loop reference: one sample at a time, keys concatenated explicitly."""
from __future__ import annotations

import torch
from torch import Tensor


def attention_reference(
    q: Tensor, k: Tensor, v: Tensor,
    seq_len: Tensor | None,
    bank_k: Tensor | None, bank_v: Tensor | None,
    slot: Tensor | None, prompt_len: Tensor | None,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """Returns (out (B, H, N, D), lse (B, H, N)) in float64; natural-log LSE.

    Every query row attends to the sample's valid keys; rows at or past `seq_len[b]` are computed
    the same way but carry no meaning.
    """
    B, H, N, D = q.shape
    out = torch.zeros(B, H, N, D, dtype=torch.float64)
    lse = torch.zeros(B, H, N, dtype=torch.float64)
    for b in range(B):
        n = int(seq_len[b]) if seq_len is not None else N
        keys = [k[b, :, :n].double()]  # (H, n, D)
        vals = [v[b, :, :n].double()]
        if bank_k is not None:
            t = int(slot[b])
            p = int(prompt_len[t]) if prompt_len is not None else bank_k.shape[2]
            keys.append(bank_k[t, :, :p].double())  # (H, p, D)
            vals.append(bank_v[t, :, :p].double())
        kk, vv = torch.cat(keys, dim=1), torch.cat(vals, dim=1)  # (H, n + p, D)
        s = q[b].double() @ kk.transpose(-1, -2) * scale  # (H, N, n + p)
        lse[b] = torch.logsumexp(s, dim=-1)
        out[b] = torch.softmax(s, dim=-1) @ vv
    return out, lse
