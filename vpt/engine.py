"""The prompted forward: one pass over a frozen timm ViT for a batch that mixes tasks.

Deep prompts act on image tokens only through attention, so each (task, block) contributes
constant keys/values `LN1(P) W_k + b_k`, `LN1(P) W_v + b_v`; they are computed once per task
(`task_slot_tensors`) and read per sample through `slot[b]`. Shallow prompts are tokens: they ride
at the end of each sequence with a per-sample valid length. Heads are gathered per sample.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

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

    # Generic over the dataclass's fields (tensors, or dicts/lists/tuples of tensors), so that a
    # new per-method field is counted, moved and pinned without touching these methods. The bank
    # relies only on these and on `pack_slots` / `forward_grouped`; it reads no field by name.

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in _tensors_of(self))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SlotTensors:
        """A copy on `device` (the same tensors where they already are there)."""
        return _map_tensors(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> SlotTensors:
        """Host tensors in page-locked memory, so uploads can be asynchronous (CUDA only)."""
        return _map_tensors(self, lambda t: t.pin_memory())


def _map_value(v: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(v, Tensor):
        return fn(v)
    if isinstance(v, dict):
        return {k: _map_value(x, fn) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_map_value(x, fn) for x in v)
    return v


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    return replace(obj, **{f.name: _map_value(getattr(obj, f.name), fn) for f in fields(obj)})


def _tensors_of(obj: Any) -> list[Tensor]:
    found: list[Tensor] = []
    _map_value([getattr(obj, f.name) for f in fields(obj)], lambda t: found.append(t) or t)
    return found


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


# -- serving from per-task tensors ------------------------------------------------------------------
# Contract with the bank (prompt_store/bank.py): the bank keeps each task's `SlotTensors` exactly as
# `task_slot_tensors` built them (moved between host and device with `.to`, measured with
# `.nbytes()`), and per batch calls `pack_slots` with the batch's distinct tasks, then
# `forward_grouped`. It reads no field by name: a method that adds per-task tensors extends
# `SlotTensors`, `task_slot_tensors`, `pack_slots` and the forward, and the bank carries them.


def _padded(t: Tensor | None, n: int, dim: int, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """`t` zero-padded to `n` along `dim` (zeros of `shape` where the task has no such tensor)."""
    if t is None:
        return like.new_zeros(shape)
    if t.shape[dim] == n:
        return t
    return F.pad(t, [0, 0] * (t.dim() - 1 - dim) + [0, n - t.shape[dim]])


def pack_slots(backbone: Backbone, slots: list[SlotTensors]) -> PromptTable:
    """One batch's table: the prompt tensors of `slots` (its distinct tasks) stacked, padded only to
    the batch's own widest prompt count. Heads are not copied (`head_w`/`head_b` are empty,
    `num_classes` is set): `apply_heads_grouped` reads them from `slots`.
    """
    L, H, hd, d = backbone.depth, backbone.num_heads, backbone.head_dim, backbone.embed_dim
    like = slots[0].head_w
    deep = [s.deep_k.shape[2] if s.deep_k is not None else 0 for s in slots]
    shallow = [s.shallow.shape[0] if s.shallow is not None else 0 for s in slots]
    P, Ps = max(deep), max(shallow)
    deep_k = deep_v = sh = None
    if P:
        deep_k = torch.stack([_padded(s.deep_k, P, 2, (L, H, P, hd), like) for s in slots], dim=1)  # (L, S, H, P, hd)
        deep_v = torch.stack([_padded(s.deep_v, P, 2, (L, H, P, hd), like) for s in slots], dim=1)  # (L, S, H, P, hd)
    if Ps:
        sh = torch.stack([_padded(s.shallow, Ps, 0, (Ps, d), like) for s in slots])                 # (S, Ps, d)
    lens = torch.tensor([deep, shallow, [s.head_w.shape[0] for s in slots]]).to(like.device)        # (3, S)
    S = len(slots)
    return PromptTable(deep_k=deep_k, deep_v=deep_v, deep_len=lens[0], shallow=sh, shallow_len=lens[1],
                       head_w=like.new_empty(S, 0, d), head_b=like.new_empty(S, 0), num_classes=lens[2])


def apply_heads_grouped(features: Tensor, slots: list[SlotTensors], slot_ids: list[int]) -> list[tuple[list[int], Tensor]]:
    """Each sample through its own task's head, tasks grouped by class count, so no head is padded.

    (B, d) features, `slot_ids[b]` indexing `slots` -> one `(rows, logits (n, C))` per class count,
    `rows` the samples' batch positions in order. A 10,000-class task costs only its own samples.
    """
    groups: dict[int, list[int]] = {}
    for b, j in enumerate(slot_ids):
        groups.setdefault(slots[j].head_w.shape[0], []).append(b)
    out = []
    for rows, members in ((rows, sorted({slot_ids[b] for b in rows})) for rows in groups.values()):
        f = features.index_select(0, torch.tensor(rows, device=features.device))            # (n, d)
        if len(members) == 1:
            s = slots[members[0]]
            logits = F.linear(f.to(s.head_w.dtype), s.head_w, s.head_b)                       # (n, C)
        else:
            local = {j: i for i, j in enumerate(members)}
            sel = torch.tensor([local[slot_ids[b]] for b in rows], device=features.device)  # (n,)
            w = torch.stack([slots[j].head_w for j in members]).index_select(0, sel)         # (n, C, d)
            bias = torch.stack([slots[j].head_b for j in members]).index_select(0, sel)      # (n, C)
            logits = torch.baddbmm(bias[:, :, None], w, f[:, :, None].to(w.dtype))[:, :, 0]  # (n, C)
        out.append((rows, logits))
    return out


def forward_grouped(backbone: Backbone, images: Tensor, table: PromptTable, slots: list[SlotTensors],
                    slot_ids: list[int]) -> list[tuple[list[int], Tensor]]:
    """(B, 3, H, W) images, `table = pack_slots(backbone, slots)`, `slot_ids[b]` the sample's task
    -> per class count `(rows, logits (n, C))` (see `apply_heads_grouped`)."""
    slot = torch.tensor(slot_ids, dtype=torch.long).to(images.device)                       # (B,)
    return apply_heads_grouped(forward_features(backbone, images, table, slot), slots, slot_ids)
