"""Inputs for attention tests: strided views as the engine passes them, plus error measures."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kernels.reference import attention_reference

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class Case:
    B: int
    H: int
    N: int
    D: int
    plens: tuple[int, ...] | None = None   # valid rows per bank slot; None: no bank
    slots: tuple[int, ...] | None = None   # bank slot per sample
    seq: tuple[int, ...] | None = None     # valid own keys per sample; None: all N
    p_max: int | None = None               # bank rows (>= max(plens)); default max(plens)
    q_gain: float = 1.0                    # > 1 makes large logits
    contiguous: bool = False               # True: plain tensors instead of views

    def __str__(self) -> str:
        return f"B{self.B}H{self.H}N{self.N}D{self.D}p{self.plens}s{self.slots}n{self.seq}g{self.q_gain}"


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0, device: torch.device = DEVICE) -> dict:
    """q, k, v are slices of one fused (B, N, 3, H, D) projection; the bank is layer 1 of (L, S, H, P, D)."""
    g = torch.Generator().manual_seed(seed)
    B, H, N, D = case.B, case.H, case.N, case.D
    qkv = torch.randn(B, N, 3, H, D, generator=g).to(device, dtype).permute(2, 0, 3, 1, 4)  # (3, B, H, N, D)
    q, k, v = qkv.unbind(0)  # each (B, H, N, D), strided
    q = q * case.q_gain if case.q_gain != 1.0 else q
    bank_k = bank_v = slot = prompt_len = None
    if case.plens is not None:
        S, P = len(case.plens), case.p_max if case.p_max is not None else max(case.plens)
        bank = torch.randn(2, 3, S, H, P, D, generator=g).to(device, dtype)  # (kv, L, S, H, P, D)
        bank_k, bank_v = bank[0, 1], bank[1, 1]  # per-layer views (S, H, P, D)
        slot = torch.tensor(case.slots, device=device)
        prompt_len = torch.tensor(case.plens, device=device, dtype=torch.int32)
    if case.contiguous:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        bank_k = bank_k.contiguous() if bank_k is not None else None
        bank_v = bank_v.contiguous() if bank_v is not None else None
    seq_len = torch.tensor(case.seq, device=device) if case.seq is not None else None
    return {"q": q, "k": k, "v": v, "seq_len": seq_len, "bank_k": bank_k, "bank_v": bank_v, "slot": slot,
            "prompt_len": prompt_len, "scale": D ** -0.5}


def reference(inputs: dict) -> tuple[Tensor, Tensor]:
    """Float64 (out (B, H, N, D), lse (B, H, N)) on the CPU."""
    cpu = {k: (v.cpu() if isinstance(v, Tensor) else v) for k, v in inputs.items()}
    return attention_reference(**cpu)


def valid_rows(x: Tensor, seq_len: Tensor | None) -> list[Tensor]:
    """Per sample, the rows that carry meaning: x[b, :, :seq_len[b]]."""
    N = x.shape[2]
    lens = seq_len.tolist() if seq_len is not None else [N] * x.shape[0]
    return [x[b, :, :n] for b, n in enumerate(lens)]


def max_err(got: Tensor, want: Tensor, seq_len: Tensor | None) -> float:
    """Largest absolute difference over valid query rows."""
    errs = [(g.double().cpu() - w.double().cpu()).abs().max().item()
            for g, w in zip(valid_rows(got, seq_len), valid_rows(want, seq_len)) if g.numel()]
    return max(errs, default=0.0)
