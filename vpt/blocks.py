"""timm's pre-norm ViT block as a function of its weights, with per-sample biases and method hooks.

The backbone's modules are never mutated (training and serving share it across threads), so a
task's replaced weights (partial tuning) come in as `weights`, keyed by names relative to the
block (`"attn.qkv.weight"`), and a sample's tuned biases as `(B, n)` changes from the context.
"""
from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Block
from torch import Tensor, nn

from kernels import attention

if TYPE_CHECKING:
    from vpt.methods.context import BatchContext



# Per block: parameter name -> (the submodule that holds it, attribute). Resolving a dotted name walks
# the module tree (`get_submodule`), which a forward would otherwise do ~60 times; the attribute
# itself is still read at each call, so a reassigned parameter is seen.
_OWNERS: weakref.WeakKeyDictionary[nn.Module, dict[str, tuple[nn.Module, str]]] = weakref.WeakKeyDictionary()


def _param(blk: nn.Module, weights: dict[str, Tensor] | None, name: str) -> Tensor | None:
    if weights and name in weights:
        return weights[name]
    owners = _OWNERS.get(blk)
    if owners is None:
        owners = _OWNERS[blk] = {}
    owner = owners.get(name)
    if owner is None:
        mod_name, _, attr = name.rpartition(".")
        owner = owners[name] = (blk.get_submodule(mod_name), attr)
    return getattr(owner[0], owner[1], None)


def _run(module: nn.Module, x: Tensor) -> Tensor:
    """`module(x)`, skipping the call for what returns `x` unchanged (identity, dropout off or of rate 0)."""
    kind = type(module)
    if kind is nn.Identity or (kind is nn.Dropout and (not module.training or module.p == 0)) \
            or (kind is DropPath and (not module.training or module.drop_prob == 0)):
        return x
    return module(x)


def _add(y: Tensor, delta: Tensor | None) -> Tensor:
    return y if delta is None else y + delta[:, None, :].to(y.dtype)


def layer_norm(x: Tensor, norm: nn.LayerNorm, w: Tensor | None, b: Tensor | None, delta: Tensor | None) -> Tensor:
    """LayerNorm with weights `w`, `b` and a per-sample bias change `delta` (B, d)."""
    return _add(F.layer_norm(x, norm.normalized_shape, w, b, norm.eps), delta)


def _scale(ls: nn.Module, gamma: Tensor | None, x: Tensor) -> Tensor:
    if gamma is None or isinstance(ls, nn.Identity):
        return _run(ls, x)
    return x * gamma


def prompt_kv(blk: Block, prompts: Tensor, weights: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Keys and values of prompt tokens in one block; their queries are never computed.

    prompts: (S, p, d) -> k, v each (S, H, p, hd). `weights` replace the block's norm1/qkv.
    """
    attn = blk.attn
    S, p, _ = prompts.shape
    ad = attn.attn_dim
    h = layer_norm(prompts, blk.norm1, _param(blk, weights, "norm1.weight"), _param(blk, weights, "norm1.bias"),
                   None)                                                          # (S, p, d)
    w = _param(blk, weights, "attn.qkv.weight")[ad:]                              # (2 ad, d): the k and v rows
    b = _param(blk, weights, "attn.qkv.bias")
    kv = F.linear(h, w, b[ad:] if b is not None else None)
    kv = kv.reshape(S, p, 2, attn.num_heads, attn.head_dim)                       # (S, p, 2, H, hd)
    k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)                                    # each (S, H, p, hd)
    return attn.k_norm(k), v


def block_forward(blk: Block, x: Tensor, ctx: BatchContext, layer: int, seq_len: Tensor | None,
                  weights: dict[str, Tensor] | None = None) -> Tensor:
    """One block: image tokens attend to [own tokens ; the task's deep prompts]; method hooks applied."""
    B, N, _ = x.shape
    attn, pre = blk.attn, f"blocks.{layer}."

    def p(name: str) -> Tensor | None:
        return _param(blk, weights, name)

    def db(name: str) -> Tensor | None:
        return ctx.bias(pre + name)

    h = layer_norm(x, blk.norm1, p("norm1.weight"), p("norm1.bias"), db("norm1.bias"))           # (B, N, d)
    qkv = _add(F.linear(h, p("attn.qkv.weight"), p("attn.qkv.bias")), db("attn.qkv.bias"))       # (B, N, 3 ad)
    q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = _run(attn.q_norm, q), _run(attn.k_norm, k)                                             # (B, H, N, hd)
    bank = ctx.kv(ctx, layer) if ctx.kv is not None else None
    bk, bv, plen = bank if bank is not None else (None, None, None)
    o = attention(q, k, v, seq_len, bk, bv, ctx.slot, plen, attn.scale, check=False)             # (B, H, N, hd)
    o = _run(attn.norm, o.transpose(1, 2).reshape(B, N, attn.attn_dim))                           # (B, N, ad)
    if getattr(attn, "gate", None) is not None:
        o = o * attn.gate(h).sigmoid()
    o = _add(F.linear(o, p("attn.proj.weight"), p("attn.proj.bias")), db("attn.proj.bias"))
    x = x + _run(blk.drop_path1, _scale(blk.ls1, p("ls1.gamma"), _run(attn.proj_drop, o)))       # (B, N, d)
    mlp = blk.mlp
    h = layer_norm(x, blk.norm2, p("norm2.weight"), p("norm2.bias"), db("norm2.bias"))
    if type(mlp) is Mlp:
        h = _add(F.linear(h, p("mlp.fc1.weight"), p("mlp.fc1.bias")), db("mlp.fc1.bias"))        # (B, N, hidden)
        h = _run(mlp.norm, _run(mlp.drop1, mlp.act(h)))
        m = _run(mlp.drop2, _add(F.linear(h, p("mlp.fc2.weight"), p("mlp.fc2.bias")), db("mlp.fc2.bias")))  # (B, N, d)
    else:   # another MLP type: run as is (bias and partial tuning refuse such backbones)
        m = mlp(h)
    for hook in ctx.mlp_hooks:   # adapters: m -> m + up(act(down(m)))
        m = hook(ctx, layer, m)
    return x + _run(blk.drop_path2, _scale(blk.ls2, p("ls2.gamma"), m))
