"""VPT-Deep: every block in `prompt_layers` (default all) gets its own `p` prompts.

An image token meets a block's deep prompts only through attention, so a task's prompts are
stored as per-block keys/values `LN1(P) W_k + b_k`, `LN1(P) W_v + b_v` (with the task's own
tuned norm/qkv weights when it also tunes biases or the last block). Blocks outside the range
see no prompts. With a pooling other than `cls` and a range that reaches the last block, that
block's prompts run as real tokens there (their outputs are pooled), as in the official code.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from vpt.errors import TaskSpecError
from vpt.methods.base import Build, Component, Field
from vpt.methods.vpt_shallow import Prompts, dropped, init_prompts

if TYPE_CHECKING:
    from vpt.backbone import Backbone
    from vpt.methods.context import BatchContext
    from vpt.task import TaskSpec


def layer_range(spec: TaskSpec, depth: int) -> tuple[int, int]:
    """Inclusive (first, last) block with deep prompts."""
    return spec.prompt_layers if spec.prompt_layers is not None else (0, depth - 1)


def prompts_as_tokens(spec: TaskSpec, depth: int) -> bool:
    """The last block's prompts are real tokens there: pooled output and a range reaching it."""
    return spec.pooling != "cls" and layer_range(spec, depth)[1] == depth - 1


def block_weights(overrides: dict[str, Tensor], layer: int) -> dict[str, Tensor]:
    pre = f"blocks.{layer}."
    return {k[len(pre):]: v for k, v in overrides.items() if k.startswith(pre)}


class VptDeep(Component):
    name = "vpt-deep"
    count_key = "prompts"
    fields = (Field("deep_k"), Field("deep_v"), Field("deep_len"), Field("deep_last", length_dim=0))

    def check(self, spec: TaskSpec, backbone: Backbone | None) -> None:
        if backbone is not None and spec.prompt_layers is not None and spec.prompt_layers[1] >= backbone.depth:
            raise TaskSpecError(f"prompt_layers {spec.prompt_layers[0]}-{spec.prompt_layers[1]} exceed the "
                                f"backbone's {backbone.depth} blocks (0-{backbone.depth - 1})")
        if backbone is not None and spec.pooling == "prompt_mean" and not prompts_as_tokens(spec, backbone.depth):
            raise TaskSpecError("pooling prompt_mean needs deep prompts in the last block")

    def create(self, spec: TaskSpec, backbone: Backbone) -> nn.Module:
        first, last = layer_range(spec, backbone.depth)
        return Prompts(last - first + 1, spec.num_prompts, backbone.embed_dim)

    def init(self, module: nn.Module, spec: TaskSpec, backbone: Backbone, generator: torch.Generator | None) -> None:
        init_prompts(module, backbone, generator)

    def file_shapes(self, spec: TaskSpec, backbone: Backbone) -> dict[str, tuple[int, ...]]:
        first, last = layer_range(spec, backbone.depth)
        return {"prompts": (last - first + 1, spec.num_prompts, backbone.embed_dim)}

    def to_file(self, module: nn.Module | None) -> dict[str, Tensor]:
        return {"prompts": module.prompts}

    def from_file(self, module: nn.Module | None, tensors: dict[str, Tensor]) -> None:
        module.prompts.copy_(tensors["prompts"])

    def slot_tensors(self, module: nn.Module | None, spec: TaskSpec, build: Build) -> dict[str, Tensor]:
        bb = build.backbone
        L, H, hd, p = bb.depth, bb.num_heads, bb.head_dim, spec.num_prompts
        first, last = layer_range(spec, L)
        from vpt.blocks import prompt_kv  # the forward's code: loaded where tensors are made, not for checks

        tokens = prompts_as_tokens(spec, L)
        prompts = dropped(module.prompts, build)                                   # (rows, L_p, p, d)
        rows = prompts.shape[0]
        zero = torch.zeros(rows, H, p, hd, device=bb.device, dtype=bb.dtype)
        ks, vs, lens = [], [], []
        for layer, blk in enumerate(bb.model.blocks):
            kv_here = first <= layer <= last and not (tokens and layer == L - 1)
            if kv_here:
                k, v = prompt_kv(blk, prompts[:, layer - first], block_weights(build.overrides, layer))
            ks.append(k if kv_here else zero)                                       # (rows, H, p, hd)
            vs.append(v if kv_here else zero)
            lens.append(p if kv_here else 0)
        out = {"deep_k": torch.stack(ks, dim=1), "deep_v": torch.stack(vs, dim=1),  # (rows, L, H, p, hd)
               "deep_len": torch.tensor(lens, device=bb.device)[None].expand(rows, L)}
        if tokens:
            out["deep_last"] = prompts[:, -1]                                        # (rows, p, d)
        return out

    def prepare(self, ctx: BatchContext) -> None:
        lens = ctx.table.tensors["deep_len"]                                         # (S, L)
        P = ctx.table.tensors["deep_k"].shape[3]  # widths, not values: nothing is read back to the host
        if P > 0:
            per_layer = lens.t().contiguous()                                        # (L, S)

            def kv(c: BatchContext, layer: int) -> tuple[Tensor, Tensor, Tensor] | None:
                bk = c.table.tensors["deep_k"][:, layer, :, :P]                      # (S, H, P, hd)
                bv = c.table.tensors["deep_v"][:, layer, :, :P]
                return bk, bv, per_layer[layer]
            ctx.kv = kv
        if "deep_last" in ctx.table.lengths:
            last_len = ctx.length("deep_last")                                       # (B,)
            pl = ctx.table.tensors["deep_last"].shape[1]
            if pl > 0:
                ctx.per_sample["last_tokens"] = ctx.gather("deep_last")[:, :pl]      # (B, pl, d)
                ctx.per_sample["last_tokens_len"] = last_len
