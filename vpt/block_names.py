"""The backbone parameters the block forward (vpt/blocks.py) reads, by name: method components that
replace weights or tune biases check names against these without loading the forward (torch, timm)."""
from __future__ import annotations

# Block parameters the forward reads (weights may be replaced; biases may change per sample).
BLOCK_PARAMS = ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                "mlp.fc2.weight", "mlp.fc2.bias", "ls1.gamma", "ls2.gamma")
TOP_PARAMS = ("patch_embed.proj.bias", "norm.weight", "norm.bias")
