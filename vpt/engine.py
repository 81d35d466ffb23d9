"""The mixed-task forward: one pass over a frozen timm ViT for a batch whose samples use any methods.

A `PromptTable` holds, per bank slot, the tensors each task's method components declared (deep
prompt keys/values, shallow prompts, bias changes, adapters, partial blocks, heads...), padded
with zeros to the widest slot. The forward asks the batch context (filled by the components
found in the table, `vpt.methods`) what changes at each point; it knows no method by name.
Deep prompts act on image tokens only through attention, so each (task, block) contributes
constant keys/values computed once when the task is loaded. Shallow prompts are tokens riding
at the end of each sequence with a per-sample valid length.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpt.backbone import Backbone
from vpt.blocks import block_forward, layer_norm
from vpt.methods import FIELDS, BatchContext, forward_components
from vpt.task import TaskParams

HEAD_W, HEAD_B = "head_w", "head_b"
HEAD_ONLY = frozenset(f.name for c in forward_components() if c.kind == "head" for f in c.fields)


@dataclass
class PromptTable:
    """Per-slot tensors a batch gathers from (the bank holds one of these on the device).

    `tensors[name]` is (S, ...) (or (1, ...): one row shared by every slot, in training);
    `lengths[name]` (S,) is each slot's valid length of fields that declare one.
    """

    tensors: dict[str, Tensor]
    lengths: dict[str, Tensor]
    slots: int
    device: torch.device
    training: bool = False
    modules: dict[str, nn.Module] = field(default_factory=dict)   # training only: the head module

    @property
    def num_classes(self) -> Tensor:
        return self.lengths[HEAD_W]


@dataclass
class SlotTensors:
    """One task's share of a PromptTable (unpadded, no slot dim): field name -> tensor."""

    tensors: dict[str, Tensor]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SlotTensors:
        return SlotTensors({k: v.to(device, non_blocking=non_blocking) for k, v in self.tensors.items()})

    def pin_memory(self) -> SlotTensors:
        return SlotTensors({k: v.pin_memory() for k, v in self.tensors.items()})

    def dims(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}


Dims = dict[str, tuple[tuple[int, ...], torch.dtype]]


def task_slot_tensors(backbone: Backbone, params: TaskParams) -> SlotTensors:
    """What the bank stores for a task, in the backbone's dtype and device (no grad)."""
    with torch.inference_mode():
        rows = params.slot_tensors(backbone)
        return SlotTensors({k: v[0].to(backbone.device).clone() for k, v in rows.items()})


def merge_dims(a: Dims, b: Dims) -> Dims:
    """Per field, the elementwise widest shape of `a` and `b`."""
    out = dict(a)
    for name, (shape, dt) in b.items():
        if name in out:
            shape = tuple(max(x, y) for x, y in zip(out[name][0], shape))
        out[name] = (shape, dt)
    return out


def slot_bytes(dims: Dims) -> int:
    """Bytes of one slot of a table with `dims` (plus its lengths)."""
    total = 0
    for shape, dt in dims.values():
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty((), dtype=dt).element_size()
    return total + 8 * sum(1 for name in dims if FIELDS[name].length_dim is not None)


def allocate_table(backbone: Backbone, slots: int, dims: Dims, counted: tuple[str, ...] = (HEAD_W,)) -> PromptTable:
    """An all-zero table of `slots` slots, each field as wide as `dims` says; valid lengths are kept
    for the fields that declare one, and for `counted` (the class count) even without its tensor."""
    dev = backbone.device
    tensors = {name: torch.zeros(slots, *shape, device=dev, dtype=dt) for name, (shape, dt) in dims.items()}
    lengths = {name: torch.zeros(slots, dtype=torch.long, device=dev) for name in (*dims, *counted)
               if FIELDS[name].length_dim is not None}
    return PromptTable(tensors=tensors, lengths=lengths, slots=slots, device=dev)


def _table_of(backbone: Backbone, slots: list[SlotTensors], skip: frozenset[str] = frozenset()) -> PromptTable:
    per_slot = [{k: v for k, v in s.dims().items() if k not in skip} for s in slots]
    if per_slot and all(d == per_slot[0] for d in per_slot[1:]):  # the common case: nothing to pad, one stack per field
        return _stacked(backbone, slots, per_slot[0])
    dims: Dims = {}
    for d in per_slot:
        dims = merge_dims(dims, d)
    table = allocate_table(backbone, len(slots), dims)
    for i, s in enumerate(slots):
        write_slot(table, i, s)
    return table


def _stacked(backbone: Backbone, slots: list[SlotTensors], dims: Dims) -> PromptTable:
    """`_table_of` for slots whose fields all have the same shapes: what `allocate_table` and
    `write_slot` would make, in one op per field instead of a few per field and slot."""
    dev = backbone.device
    tensors = {name: torch.stack([s.tensors[name] for s in slots]).to(dev) for name in dims}
    lengths = {}
    for name in dict.fromkeys((*dims, HEAD_W)):  # the class count is kept as `allocate_table` keeps it
        length_dim = FIELDS[name].length_dim
        if length_dim is not None:
            lengths[name] = torch.tensor([s.tensors[name].shape[length_dim] if name in s.tensors else 0
                                          for s in slots], dtype=torch.long, device=dev)
    return PromptTable(tensors=tensors, lengths=lengths, slots=len(slots), device=dev)


def stack_slots(backbone: Backbone, slots: list[SlotTensors]) -> PromptTable:
    """A PromptTable holding `slots` in order, heads included, padded to the widest of each field."""
    return _table_of(backbone, slots)


def pack_slots(backbone: Backbone, slots: list[SlotTensors]) -> PromptTable:
    """One batch's table of its distinct tasks (`slots`), padded only to this batch's widest of each
    field. Heads are not copied (`apply_heads_grouped` reads them from `slots`); class counts are kept."""
    return _table_of(backbone, slots, HEAD_ONLY)


def write_slot(table: PromptTable, i: int, s: SlotTensors) -> None:
    """Copy one task's tensors into slot `i` (zero-padding the rest of the slot); fields the table
    does not hold (heads in a packed table) are left out, their valid lengths still recorded."""
    with torch.no_grad():
        for name, t in table.tensors.items():
            t[i].zero_()
            src = s.tensors.get(name)
            if src is not None:
                t[i][tuple(slice(0, n) for n in src.shape)] = src
        for name, lens in table.lengths.items():
            src = s.tensors.get(name)
            lens[i] = src.shape[FIELDS[name].length_dim] if src is not None else 0


def training_table(backbone: Backbone, params: TaskParams, batch_size: int, dropout: float,
                   training: bool) -> tuple[PromptTable, Tensor]:
    """A differentiable table for one task, computed from its parameters.

    With prompt dropout in training, every sample gets its own mask (as the official code's
    dropout after `expand`), so prompt fields get one row per sample and each sample its slot.
    """
    dev = backbone.device
    per_sample = training and dropout > 0 and params.prompts is not None
    samples = batch_size if per_sample else 1
    params.train(training)
    tensors = params.slot_tensors(backbone, samples, dropout if per_sample else 0.0)
    lengths = {name: torch.tensor([t.shape[FIELDS[name].length_dim + 1]], device=dev)
               for name, t in tensors.items() if FIELDS[name].length_dim is not None}
    slot = torch.arange(batch_size, device=dev) if per_sample else torch.zeros(batch_size, dtype=torch.long,
                                                                                 device=dev)
    table = PromptTable(tensors=tensors, lengths=lengths, slots=samples, device=dev, training=training,
                        modules={"head": params.head})
    return table, slot


def make_context(backbone: Backbone, table: PromptTable, slot: Tensor, kinds: tuple[str, ...] | None = None
                 ) -> BatchContext:
    """The batch context with the hooks of every component whose fields the table holds."""
    ctx = BatchContext(backbone, table, slot)
    for comp in forward_components():
        if (kinds is None or comp.kind in kinds) and any(f.name in table.tensors for f in comp.fields):
            comp.prepare(ctx)
    return ctx


def _append_tokens(x: Tensor, n0: int, seq_len: Tensor | None, tok: Tensor | None, tlen: Tensor | None
                   ) -> tuple[Tensor, Tensor | None]:
    """Append each sample's extra tokens after its valid ones; (B, N, d) -> (B, N', d), new lengths."""
    if tok is None:
        return x, seq_len
    if seq_len is None:
        return torch.cat([x, tok.to(x.dtype)], dim=1), n0 + tlen                 # (B, N0 + p, d)
    width = max(x.shape[1] - n0, tok.shape[1])  # a sample has old extra tokens or new ones, never both
    x = F.pad(x, (0, 0, 0, n0 + width - x.shape[1]))
    tok = F.pad(tok.to(x.dtype), (0, 0, 0, width - tok.shape[1]))
    region = torch.where((tlen > 0)[:, None, None], tok, x[:, n0:])              # (B, width, d)
    return torch.cat([x[:, :n0], region], dim=1), seq_len + tlen


def _tail_one(ctx: BatchContext, x: Tensor, seq_len: Tensor | None, weights: dict[str, Tensor]) -> Tensor:
    """The last block and the final norm, with `weights` (backbone names) replacing the backbone's."""
    m = ctx.backbone.model
    last = len(m.blocks) - 1
    pre = f"blocks.{last}."
    bw = {k[len(pre):]: v for k, v in weights.items() if k.startswith(pre)}
    x = block_forward(m.blocks[last], x, ctx, last, seq_len, bw)
    if not isinstance(m.norm, nn.LayerNorm):
        return m.norm(x)
    return layer_norm(x, m.norm, weights.get("norm.weight", m.norm.weight), weights.get("norm.bias", m.norm.bias),
                      ctx.bias("norm.bias"))


def _tail(ctx: BatchContext, x: Tensor, seq_len: Tensor | None) -> Tensor:
    groups = ctx.tail_groups(ctx) if ctx.tail_groups is not None else [(None, {})]
    if len(groups) == 1 and groups[0][0] is None:
        return _tail_one(ctx, x, seq_len, groups[0][1])
    out = torch.zeros_like(x)
    for idx, weights in groups:   # partial tuning: the last block once per task that replaces it
        sub_len = seq_len.index_select(0, idx) if seq_len is not None else None
        out = out.index_copy(0, idx, _tail_one(ctx.subset(idx), x.index_select(0, idx), sub_len, weights))
    return out


def forward_features(backbone: Backbone, images: Tensor, table: PromptTable, slot: Tensor) -> Tensor:
    """(B, 3, H, W) images, each with its bank slot -> (B, d) pooled features after the final norm."""
    m = backbone.model
    ctx = make_context(backbone, table, slot, ("method", "pooling"))
    x = m.patch_embed(images)                                                     # (B, Np, d)
    delta = ctx.bias("patch_embed.proj.bias")
    if delta is not None:
        x = x + delta[:, None, :].to(x.dtype)
    x = m.norm_pre(m.patch_drop(m._pos_embed(x)))                                # (B, N0, d)
    n0 = x.shape[1]
    x, seq_len = _append_tokens(x, n0, None, ctx.per_sample.get("tokens"), ctx.per_sample.get("tokens_len"))
    for layer, blk in enumerate(m.blocks[:-1]):
        x = block_forward(blk, x, ctx, layer, seq_len)
    x, seq_len = _append_tokens(x, n0, seq_len, ctx.per_sample.get("last_tokens"),
                                ctx.per_sample.get("last_tokens_len"))
    x = _tail(ctx, x, seq_len)                                                   # (B, N, d) after the final norm
    return ctx.pool(ctx, x, seq_len) if ctx.pool is not None else x[:, 0]        # (B, d)


def apply_heads(features: Tensor, table: PromptTable, slot: Tensor, backbone: Backbone | None = None) -> Tensor:
    """Per-sample heads: (B, d) -> (B, C_max) logits, -inf past each sample's class count."""
    ctx = make_context(backbone, table, slot, ("head",))
    if ctx.head_hidden is not None:
        features = ctx.head_hidden(ctx, features)                                 # (B, d)
    w = ctx.gather(HEAD_W)                                                        # (B, C, d)
    b = ctx.gather(HEAD_B)                                                        # (B, C)
    logits = torch.baddbmm(b[:, :, None], w, features[:, :, None].to(w.dtype))[:, :, 0]  # (B, C)
    C = logits.shape[1]
    valid = torch.arange(C, device=logits.device)[None, :] < ctx.length(HEAD_W)[:, None]
    return logits.masked_fill(~valid, float("-inf"))


def forward_logits(backbone: Backbone, images: Tensor, table: PromptTable, slot: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, C_max) logits, each sample through its own task's method and head."""
    return apply_heads(forward_features(backbone, images, table, slot), table, slot, backbone)


# -- serving from per-task tensors ------------------------------------------------------------------
# Contract with the bank (prompt_store/bank.py): the bank keeps each task's `SlotTensors` exactly as
# `task_slot_tensors` built them (moved with `.to`, measured with `.nbytes()`), and per batch calls
# `pack_slots` with the batch's distinct tasks, then `forward_grouped`. It reads no field by name.


def apply_heads_grouped(features: Tensor, slots: list[SlotTensors], slot_ids: list[int]) -> list[tuple[list[int], Tensor]]:
    """Each sample through its own task's head, tasks grouped by class count, so no head is padded.

    (B, d) features, `slot_ids[b]` indexing `slots` -> one `(rows, logits (n, C))` per class count,
    `rows` the samples' batch positions in order. Hidden head layers (mlp-k) run once per task.
    """
    heads = [c for c in forward_components() if c.kind == "head"]
    by_task: dict[int, list[int]] = {}
    for b, j in enumerate(slot_ids):
        by_task.setdefault(j, []).append(b)
    for j, rows in by_task.items():
        if any(c.has_hidden(slots[j].tensors) for c in heads):
            idx = torch.tensor(rows, device=features.device)
            f = features.index_select(0, idx)                                               # (n, d)
            for c in heads:
                f = c.hidden_one(slots[j].tensors, f)
            features = features.index_copy(0, idx, f.to(features.dtype))
    groups: dict[int, list[int]] = {}
    for b, j in enumerate(slot_ids):
        groups.setdefault(slots[j].tensors[HEAD_W].shape[0], []).append(b)
    out = []
    for rows, members in ((rows, sorted({slot_ids[b] for b in rows})) for rows in groups.values()):
        f = features.index_select(0, torch.tensor(rows, device=features.device))            # (n, d)
        if len(members) == 1:
            t = slots[members[0]].tensors
            logits = F.linear(f.to(t[HEAD_W].dtype), t[HEAD_W], t[HEAD_B])                   # (n, C)
        else:
            local = {j: i for i, j in enumerate(members)}
            sel = torch.tensor([local[slot_ids[b]] for b in rows], device=features.device)  # (n,)
            w = torch.stack([slots[j].tensors[HEAD_W] for j in members]).index_select(0, sel)   # (n, C, d)
            bias = torch.stack([slots[j].tensors[HEAD_B] for j in members]).index_select(0, sel)  # (n, C)
            logits = torch.baddbmm(bias[:, :, None], w, f[:, :, None].to(w.dtype))[:, :, 0]  # (n, C)
        out.append((rows, logits))
    return out


def forward_grouped(backbone: Backbone, images: Tensor, table: PromptTable, slots: list[SlotTensors],
                    slot_ids: list[int], features: Callable[..., Tensor] | None = None
                    ) -> list[tuple[list[int], Tensor]]:
    """(B, 3, H, W) images, `table = pack_slots(backbone, slots)`, `slot_ids[b]` the sample's task
    -> per class count `(rows, logits (n, C))` (see `apply_heads_grouped`). `features` replaces
    `forward_features` (same signature; vpt/graphs.py's bucketed CUDA graphs)."""
    slot = torch.tensor(slot_ids, dtype=torch.long).to(images.device)                       # (B,)
    return apply_heads_grouped((features or forward_features)(backbone, images, table, slot), slots, slot_ids)


__all__ = ["PromptTable", "SlotTensors", "allocate_table", "apply_heads", "apply_heads_grouped", "forward_features",
           "forward_grouped", "forward_logits", "make_context", "merge_dims", "pack_slots", "slot_bytes",
           "stack_slots", "task_slot_tensors", "training_table", "write_slot"]
