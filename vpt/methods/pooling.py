"""Which tokens the head reads, after the final norm (paper Fig. 8): `cls` (default), `image_mean`
(patch tokens), `prompt_mean` (prompt tokens), `all_mean` (every token but CLS and registers)."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from vpt.method_names import POOLINGS
from vpt.methods.base import Build, Component, Field

if TYPE_CHECKING:
    from vpt.methods.context import BatchContext
    from vpt.task import TaskSpec

class Pooling(Component):
    name = "pooling"
    kind = "pooling"
    fields = (Field("pool"),)

    def metadata(self, spec: TaskSpec) -> dict[str, str]:
        return {"pooling": spec.pooling} if spec.pooling != "cls" else {}

    def slot_tensors(self, module: object, spec: TaskSpec, build: Build) -> dict[str, Tensor]:
        if spec.pooling == "cls":
            return {}
        return {"pool": torch.tensor([POOLINGS.index(spec.pooling)], device=build.backbone.device)}   # (1,)

    def prepare(self, ctx: BatchContext) -> None:
        ctx.pool = _pool


def _pool(ctx: BatchContext, x: Tensor, seq_len: Tensor | None) -> Tensor:
    """x (B, N, d) after the final norm -> (B, d), each sample pooled its own way."""
    B, N, _ = x.shape
    bb = ctx.backbone
    npre, n0 = bb.num_prefix_tokens, bb.num_tokens
    code = ctx.gather("pool")                                                    # (B,)
    n_prompt = (seq_len - n0) if seq_len is not None else torch.zeros_like(code)  # (B,)
    col = torch.arange(N, device=x.device)[None, :]                              # (1, N)
    lo = torch.where(code == 2, n0, npre)[:, None]                               # prompt_mean starts at the prompts
    hi = torch.where(code == 1, n0, n0 + n_prompt)[:, None]                      # image_mean stops at them
    mean = ((col >= lo) & (col < hi)).to(x.dtype)                                # (B, N)
    mean = mean / mean.sum(1, keepdim=True).clamp_min(1)
    cls = (col == 0).to(x.dtype).expand(B, N)
    w = torch.where((code == 0)[:, None], cls, mean)                             # (B, N)
    return torch.bmm(w[:, None, :], x)[:, 0]                                     # (B, d)
