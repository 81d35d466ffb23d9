"""The prompted forward: one pass over a frozen timm ViT for a batch that mixes tasks.

Deep prompts act on image tokens only through attention, so each (task, block) contributes
constant keys/values `LN1(P) W_k + b_k`, `LN1(P) W_v + b_v`; they are computed once per task
(`task_slot_tensors`) and read per sample through `slot[b]`. Shallow prompts are tokens: they ride
at the end of each sequence with a per-sample valid length. Heads are gathered per sample.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor

from kernels import attention
from vpt.backbone import Backbone
from vpt.task import TaskParams


@dataclass
class PromptTable:
    """Per-slot tensors a batch gathers from (the bank holds one of these on the device)."""

    deep_k: Tensor | None    # (L, S, H, P, hd) deep prompt keys per block
    deep_v: Tensor | None    # (L, S, H, P, hd)
    deep_len: Tensor         # (S,) valid deep prompt rows
    shallow: Tensor | None   # (S, Ps, d) shallow prompt tokens
    shallow_len: Tensor      # (S,) valid shallow prompts
    head_w: Tensor           # (S, C, d) heads padded to the widest class count
    head_b: Tensor           # (S, C)
    num_classes: Tensor      # (S,) valid classes per slot

    @property
    def slots(self) -> int:
        return self.head_w.shape[0]


@dataclass
class SlotTensors:
    """One task's share of a PromptTable (unpadded)."""

    deep_k: Tensor | None    # (L, H, p, hd)
    deep_v: Tensor | None    # (L, H, p, hd)
    shallow: Tensor | None   # (p, d)
    head_w: Tensor           # (C, d)
    head_b: Tensor           # (C,)

    def nbytes(self) -> int:
        ts = [self.deep_k, self.deep_v, self.shallow, self.head_w, self.head_b]
        return sum(t.numel() * t.element_size() for t in ts if t is not None)


def prompt_kv(blk: Block, prompts: Tensor) -> tuple[Tensor, Tensor]:
    """Keys and values of prompt tokens in one block; their queries are never computed.

    prompts: (S, p, d) -> k, v each (S, H, p, hd).
    """
    attn = blk.attn
    S, p, _ = prompts.shape
    ad = attn.attn_dim
    h = blk.norm1(prompts)                                                    # (S, p, d)
    w = attn.qkv.weight[ad:]                                                  # (2 ad, d): the k and v rows
    b = attn.qkv.bias[ad:] if attn.qkv.bias is not None else None
    kv = F.linear(h, w, b).reshape(S, p, 2, attn.num_heads, attn.head_dim)    # (S, p, 2, H, hd)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                                # each (S, H, p, hd)
    return attn.k_norm(k), v


def deep_prompt_kv(backbone: Backbone, prompts: Tensor) -> tuple[Tensor, Tensor]:
    """prompts (S, L, p, d) -> keys, values each (L, S, H, p, hd), one block at a time."""
    ks, vs = [], []
    for layer, blk in enumerate(backbone.model.blocks):
        k, v = prompt_kv(blk, prompts[:, layer])                              # (S, H, p, hd)
        ks.append(k)
        vs.append(v)
    return torch.stack(ks), torch.stack(vs)                                   # (L, S, H, p, hd)


def task_slot_tensors(backbone: Backbone, params: TaskParams) -> SlotTensors:
    """What the bank stores for a task, in the backbone's dtype and device (no grad)."""
    dev, dt = backbone.device, backbone.dtype
    method = params.spec.method
    deep_k = deep_v = shallow = None
    with torch.inference_mode():
        if method == "vpt-deep":
            prompts = params.prompts.detach().to(dev, dt)[None]               # (1, L, p, d)
            k, v = deep_prompt_kv(backbone, prompts)                          # (L, 1, H, p, hd)
            deep_k, deep_v = k[:, 0].clone(), v[:, 0].clone()                 # (L, H, p, hd)
        elif method == "vpt-shallow":
            shallow = params.prompts.detach()[0].to(dev, dt).clone()          # (p, d)
        head_w = params.head.weight.detach().to(dev, dt).clone()              # (C, d)
        head_b = params.head.bias.detach().to(dev, dt).clone()                # (C,)
    return SlotTensors(deep_k=deep_k, deep_v=deep_v, shallow=shallow, head_w=head_w, head_b=head_b)


def allocate_table(backbone: Backbone, slots: int, P: int, Ps: int, C: int) -> PromptTable:
    """An all-zero table of `slots` slots for up to P deep prompts, Ps shallow prompts, C classes."""
    dev, dt = backbone.device, backbone.dtype
    L, H, hd, d = backbone.depth, backbone.num_heads, backbone.head_dim, backbone.embed_dim
    return PromptTable(
        deep_k=torch.zeros(L, slots, H, P, hd, device=dev, dtype=dt) if P else None,
        deep_v=torch.zeros(L, slots, H, P, hd, device=dev, dtype=dt) if P else None,
        deep_len=torch.zeros(slots, dtype=torch.long, device=dev),
        shallow=torch.zeros(slots, Ps, d, device=dev, dtype=dt) if Ps else None,
        shallow_len=torch.zeros(slots, dtype=torch.long, device=dev),
        head_w=torch.zeros(slots, C, d, device=dev, dtype=dt),
        head_b=torch.zeros(slots, C, device=dev, dtype=dt),
        num_classes=torch.zeros(slots, dtype=torch.long, device=dev),
    )


def stack_slots(backbone: Backbone, slots: list[SlotTensors]) -> PromptTable:
    """A PromptTable holding `slots` in order, padded to the widest prompt and class counts."""
    S = len(slots)
    P = max((s.deep_k.shape[2] for s in slots if s.deep_k is not None), default=0)
    Ps = max((s.shallow.shape[0] for s in slots if s.shallow is not None), default=0)
    C = max(s.head_w.shape[0] for s in slots)
    table = allocate_table(backbone, S, P, Ps, C)
    for i, s in enumerate(slots):
        write_slot(table, i, s)
    return table


def write_slot(table: PromptTable, i: int, s: SlotTensors) -> None:
    """Copy one task's tensors into slot `i` (zero-padding the rest of the slot)."""
    with torch.no_grad():
        if table.deep_k is not None:
            table.deep_k[:, i].zero_()
            table.deep_v[:, i].zero_()
        p = 0
        if s.deep_k is not None:
            p = s.deep_k.shape[2]
            table.deep_k[:, i, :, :p] = s.deep_k
            table.deep_v[:, i, :, :p] = s.deep_v
        table.deep_len[i] = p
        ps = 0
        if table.shallow is not None:
            table.shallow[i].zero_()
            if s.shallow is not None:
                ps = s.shallow.shape[0]
                table.shallow[i, :ps] = s.shallow
        table.shallow_len[i] = ps
        c = s.head_w.shape[0]
        table.head_w[i].zero_()
        table.head_b[i].zero_()
        table.head_w[i, :c] = s.head_w
        table.head_b[i, :c] = s.head_b
        table.num_classes[i] = c


def training_table(backbone: Backbone, params: TaskParams, batch_size: int, dropout: float,
                   training: bool) -> tuple[PromptTable, Tensor]:
    """A differentiable table for one task: prompt K/V computed from the parameters.

    With prompt dropout in training, every sample gets its own mask (as the official code's
    dropout after `expand`), so each sample gets its own slot.
    """
    dev, dt = backbone.device, backbone.dtype
    method = params.spec.method
    per_sample = training and dropout > 0 and method != "linear"
    S = batch_size if per_sample else 1
    slot = torch.arange(S, device=dev) if per_sample else torch.zeros(batch_size, dtype=torch.long, device=dev)
    deep_k = deep_v = shallow = None
    deep_len = torch.zeros(S, dtype=torch.long, device=dev)
    shallow_len = torch.zeros(S, dtype=torch.long, device=dev)
    if params.prompts is not None:
        prompts = params.prompts.to(dev, dt)[None].expand(S, -1, -1, -1)        # (S, L_p, p, d)
        if per_sample:
            prompts = F.dropout(prompts, p=dropout, training=True)
        p = prompts.shape[2]
        if method == "vpt-deep":
            deep_k, deep_v = deep_prompt_kv(backbone, prompts)                   # (L, S, H, p, hd)
            deep_len.fill_(p)
        else:
            shallow = prompts[:, 0]                                              # (S, p, d)
            shallow_len.fill_(p)
    C = params.spec.num_classes
    table = PromptTable(  # one head for every slot: expanded views, no copies
        deep_k=deep_k, deep_v=deep_v, deep_len=deep_len, shallow=shallow, shallow_len=shallow_len,
        head_w=params.head.weight.to(dev, dt)[None].expand(S, -1, -1),                  # (S, C, d)
        head_b=params.head.bias.to(dev, dt)[None].expand(S, -1),                        # (S, C)
        num_classes=torch.full((S,), C, dtype=torch.long, device=dev),
    )
    return table, slot


def _block_forward(blk: Block, x: Tensor, seq_len: Tensor | None, bank_k: Tensor | None, bank_v: Tensor | None,
                   slot: Tensor, prompt_len: Tensor) -> Tensor:
    """timm's pre-norm block with image tokens attending to [own tokens ; the task's deep prompts]."""
    B, N, D = x.shape
    attn = blk.attn
    h = blk.norm1(x)                                                               # (B, N, d)
    qkv = attn.qkv(h).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)                                                        # each (B, H, N, hd)
    q, k = attn.q_norm(q), attn.k_norm(k)
    o = attention(q, k, v, seq_len, bank_k, bank_v, slot, prompt_len, attn.scale, check=False)  # (B, H, N, hd)
    o = attn.norm(o.transpose(1, 2).reshape(B, N, attn.attn_dim))                  # (B, N, H*hd)
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(h).sigmoid()
    x = x + blk.drop_path1(blk.ls1(attn.proj_drop(attn.proj(o))))                  # (B, N, d)
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x))))


def forward_features(backbone: Backbone, images: Tensor, table: PromptTable, slot: Tensor) -> Tensor:
    """(B, 3, H, W) images, each with its bank slot -> (B, d) CLS features after the final norm."""
    m = backbone.model
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))             # (B, N0, d)
    B, N0, _ = x.shape
    seq_len = None
    if table.shallow is not None:
        slen = table.shallow_len.index_select(0, slot)                            # (B,)
        ps = int(slen.max())
        if ps > 0:
            x = torch.cat([x, table.shallow[:, :ps].index_select(0, slot)], dim=1)  # (B, N0 + ps, d)
            seq_len = N0 + slen                                                    # (B,)
    P = 0
    if table.deep_k is not None:
        P = int(table.deep_len.index_select(0, slot).max())
    for layer, blk in enumerate(m.blocks):
        bk = table.deep_k[layer, :, :, :P] if P else None                          # (S, H, P, hd)
        bv = table.deep_v[layer, :, :, :P] if P else None
        x = _block_forward(blk, x, seq_len, bk, bv, slot, table.deep_len)
    x = m.norm(x)
    return x[:, 0]                                                                 # (B, d) CLS


def apply_heads(features: Tensor, table: PromptTable, slot: Tensor) -> Tensor:
    """Per-sample heads: (B, d) -> (B, C_max) logits, -inf past each sample's class count."""
    w = table.head_w.index_select(0, slot)                                         # (B, C, d)
    b = table.head_b.index_select(0, slot)                                         # (B, C)
    logits = torch.baddbmm(b[:, :, None], w, features[:, :, None].to(w.dtype))[:, :, 0]  # (B, C)
    C = logits.shape[1]
    valid = torch.arange(C, device=logits.device)[None, :] < table.num_classes.index_select(0, slot)[:, None]
    return logits.masked_fill(~valid, float("-inf"))


def forward_logits(backbone: Backbone, images: Tensor, table: PromptTable, slot: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, C_max) logits, each sample through its own task's prompts and head."""
    return apply_heads(forward_features(backbone, images, table, slot), table, slot)
