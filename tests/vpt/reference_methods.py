"""An independent per-sample implementation of every tuning method, from timm's own modules.

It never uses the engine: the task's file tensors are applied to a copy of the timm model (biases
set, MLPs wrapped with adapters, the last block and final norm replaced), prompts are inserted
as the official code does ([CLS, P, patches], deep slices replaced block by block), timm's own
`Block.forward` runs, and the head is the official `nn.Sequential`.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from vpt.backbone import Backbone
from vpt.task import TaskSpec


class AdaptedMlp(nn.Module):
    """mlp(h) + up(act(down(mlp(h)))), the Pfeiffer adapter on the MLP output."""

    def __init__(self, mlp: nn.Module, down: nn.Linear, up: nn.Linear) -> None:
        super().__init__()
        self.mlp, self.down, self.up = mlp, down, up

    def forward(self, h: Tensor) -> Tensor:
        m = self.mlp(h)
        return m + self.up(self.mlp.act(self.down(m)))


def tuned_model(bb: Backbone, spec: TaskSpec, files: dict[str, Tensor]) -> nn.Module:
    model = copy.deepcopy(bb.model)
    dt = bb.dtype
    with torch.no_grad():
        for name, t in files.items():
            if name.startswith(("bias.", "partial.")):
                model.get_parameter(name.split(".", 1)[1]).copy_(t.to(dt))
    if "adapter" in spec.components:
        for i, blk in enumerate(model.blocks):
            m = blk.mlp.fc2.out_features // spec.adapter_reduction
            down, up = nn.Linear(bb.embed_dim, m).to(dt), nn.Linear(m, bb.embed_dim).to(dt)
            with torch.no_grad():
                for part, lin in (("down", down), ("up", up)):
                    lin.weight.copy_(files[f"adapter.{i}.{part}.weight"])
                    lin.bias.copy_(files[f"adapter.{i}.{part}.bias"])
            blk.mlp = AdaptedMlp(blk.mlp, down, up)
    return model.eval()


def official_head(bb: Backbone, spec: TaskSpec, files: dict[str, Tensor]) -> nn.Module:
    if spec.head == "linear":
        head = nn.Linear(bb.embed_dim, spec.num_classes)
        head.load_state_dict({"weight": files["head.weight"], "bias": files["head.bias"]})
        return head.to(bb.dtype).eval()
    k = int(spec.head.split("-")[1])
    layers: list[nn.Module] = []
    for j in range(k - 1):
        lin, bn = nn.Linear(bb.embed_dim, bb.embed_dim), nn.BatchNorm1d(bb.embed_dim)
        lin.load_state_dict({p: files[f"head.layers.{j}.{p}"] for p in ("weight", "bias")})
        bn.load_state_dict({p: files[f"head.norms.{j}.{p}"]
                            for p in ("weight", "bias", "running_mean", "running_var")}, strict=False)
        layers += [lin, nn.ReLU(), bn, nn.Dropout(0.1)]
    last = nn.Linear(bb.embed_dim, spec.num_classes)
    last.load_state_dict({p: files[f"head.layers.{k - 1}.{p}"] for p in ("weight", "bias")})
    return nn.Sequential(*layers, last).to(bb.dtype).eval()


def reference_logits(bb: Backbone, image: Tensor, spec: TaskSpec, files: dict[str, Tensor]) -> Tensor:
    """(3, H, W) -> (C,) logits of one image through its task, the official way."""
    model = tuned_model(bb, spec, files)
    npre, L = model.num_prefix_tokens, len(model.blocks)
    x = model.norm_pre(model._pos_embed(model.patch_embed(image[None])))        # (1, N0, d)
    prompts = files.get("prompts")
    prompts = prompts.to(x.dtype) if prompts is not None else None
    p = spec.num_prompts
    deep = "vpt-deep" in spec.components
    first, last = spec.prompt_layers or (0, L - 1)
    present = 0   # prompt tokens currently in the sequence, right after the prefix tokens
    if "vpt-shallow" in spec.components:
        x = torch.cat([x[:, :npre], prompts[0][None], x[:, npre:]], dim=1)
        present = p
    for layer, blk in enumerate(model.blocks):
        if deep and layer == first:          # inserted when the range starts
            x = torch.cat([x[:, :npre], prompts[0][None], x[:, npre:]], dim=1)
            present = p
        elif deep and first < layer <= last:  # replaced block by block
            x = torch.cat([x[:, :npre], prompts[layer - first][None], x[:, npre + p:]], dim=1)
        elif deep and layer == last + 1:      # dropped after the range
            x = torch.cat([x[:, :npre], x[:, npre + p:]], dim=1)
            present = 0
        x = blk(x)
    x = model.norm(x)[0]                                                        # (N, d)
    pooled = {"cls": lambda: x[0], "image_mean": lambda: x[npre + present:].mean(0),
              "prompt_mean": lambda: x[npre:npre + present].mean(0), "all_mean": lambda: x[npre:].mean(0)}
    feature = pooled[spec.pooling]()
    return official_head(bb, spec, files)(feature[None])[0]
