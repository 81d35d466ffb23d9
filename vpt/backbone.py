"""The frozen backbone: a timm Vision Transformer, its weights, fingerprint and data config."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from vpt.errors import BackboneError

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float64": torch.float64, "fp64": torch.float64}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """`"bf16"`, `"float32"`, ... or a torch dtype -> torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    try:
        return _DTYPES[name.lower()]
    except KeyError:
        raise BackboneError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


@dataclass(frozen=True)
class Backbone:
    """A frozen timm ViT plus the facts the rest of the system needs about it."""

    model: VisionTransformer
    name: str
    fingerprint: str
    embed_dim: int
    depth: int
    num_heads: int
    head_dim: int
    patch_size: tuple[int, int]
    num_prefix_tokens: int   # CLS + register tokens; prompts go after them
    num_patches: int
    data_config: dict[str, Any] = field(hash=False)

    @property
    def device(self) -> torch.device:
        return self.model.cls_token.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.cls_token.dtype

    @property
    def element_size(self) -> int:
        """Bytes per value at the serving dtype (what a task's bank values cost)."""
        return self.dtype.itemsize

    @property
    def num_tokens(self) -> int:
        """Prompt-free sequence length (prefix tokens + patches): 197 for ViT-B/16 at 224."""
        return self.num_prefix_tokens + self.num_patches

    @property
    def prompt_init_bound(self) -> float:
        """Official VPT prompt init: uniform in +-sqrt(6 / (3 * patch_h * patch_w + d))."""
        return math.sqrt(6.0 / float(3 * self.patch_size[0] * self.patch_size[1] + self.embed_dim))

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable facts (what `GET /backbone` returns)."""
        dc = self.data_config
        return {
            "name": self.name, "fingerprint": self.fingerprint, "embed_dim": self.embed_dim,
            "depth": self.depth, "num_heads": self.num_heads, "patch_size": list(self.patch_size),
            "input_size": list(dc["input_size"]), "mean": list(dc["mean"]), "std": list(dc["std"]),
            "interpolation": dc["interpolation"], "crop_pct": dc["crop_pct"], "crop_mode": dc.get("crop_mode"),
            "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
        }


def fingerprint_state_dict(state: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise BackboneError(f"{path}: expected a state dict, found {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _check_readable(path: Path) -> None:
    """Not found, not a file, and unreadable by this process are three different errors."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise BackboneError(f"backbone weights file not found: {path}") from None
    except PermissionError:
        raise BackboneError(f"backbone weights {path}: permission denied: uid {os.geteuid()} cannot reach it "
                            "(a parent directory is not searchable)") from None
    if not stat.S_ISREG(st.st_mode):
        raise BackboneError(f"backbone weights {path} is not a regular file")
    if not os.access(path, os.R_OK):
        raise BackboneError(f"backbone weights {path}: permission denied: uid {os.geteuid()} cannot read it "
                            f"(owner uid {st.st_uid}, mode {stat.filemode(st.st_mode)})")


def _load_weights(model: VisionTransformer, path: Path) -> None:
    _check_readable(path)
    if path.suffix.lower() == ".npz":  # the original JAX checkpoints, through timm's own loader
        model.load_pretrained(str(path))
        return
    try:
        state = _read_checkpoint(path)
    except BackboneError:
        raise
    except Exception as e:  # corrupt file, pickle refused by weights_only, ...
        raise BackboneError(f"cannot read backbone weights {path}: {e}") from e
    state = {k: v for k, v in state.items() if not k.startswith(("head.", "fc_norm.")) or k in model.state_dict()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise BackboneError(f"{path} does not fit the model: missing {missing[:8]}, unexpected {unexpected[:8]}")


def check_architecture(model: torch.nn.Module) -> None:
    """Refuse what the prompted forward does not support, with the reason."""
    if not isinstance(model, VisionTransformer):
        raise BackboneError(f"only timm VisionTransformer backbones are supported, got {type(model).__name__}")
    if model.cls_token is None:
        raise BackboneError("the backbone has no class token; VPT reads the CLS token")
    if getattr(model, "dynamic_img_size", False):
        raise BackboneError("dynamic_img_size backbones are not supported")
    for i, blk in enumerate(model.blocks):
        if type(blk) is not Block or not isinstance(blk.attn, Attention):
            raise BackboneError(f"block {i} is {type(blk).__name__}; only timm's standard pre-norm Block is supported")


def random_init_seed(name: str, model_kwargs: dict[str, Any] | None) -> int:
    """The seed of a random backbone's weights: a hash of the name and the kwargs, so the same
    settings give the same weights (and fingerprint) in every process."""
    text = json.dumps([name, model_kwargs or {}], sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def _create(name: str, pretrained: bool, seed: int | None, kwargs: dict[str, Any]) -> VisionTransformer:
    """timm.create_model; random weights are drawn from a generator seeded with `seed` (or from the name
    and kwargs), so they are the same in every process; the global generator is restored afterwards."""
    if pretrained:
        return timm.create_model(name, pretrained=True, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(random_init_seed(name, kwargs) if seed is None else seed)
        return timm.create_model(name, pretrained=False, **kwargs)


def load_backbone(
    name: str,
    *,
    weights: str | Path | None = None,
    pretrained: bool = True,
    model_kwargs: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    seed: int | None = None,
) -> Backbone:
    """A frozen timm ViT: hub weights by name, a local checkpoint, or random (pretrained=False).

    Random weights are deterministic: seeded with `seed`, or by default from the name and kwargs.
    """
    kwargs = {"num_classes": 0, **(model_kwargs or {})}
    try:
        model = _create(name, pretrained and weights is None, seed, kwargs)
    except Exception as e:  # unknown name, bad kwargs, hub unreachable
        raise BackboneError(f"cannot create backbone {name!r} with {kwargs}: {e}") from e
    check_architecture(model)
    if weights is not None:
        _load_weights(model, Path(weights))
    model.eval().requires_grad_(False)
    fingerprint = fingerprint_state_dict(model.state_dict())
    model.to(device=torch.device(device), dtype=parse_dtype(dtype))

    data_config = dict(timm.data.resolve_model_data_config(model))
    data_config["input_size"] = (3, *model.patch_embed.img_size)  # the model's real size, not its pretrained cfg's
    attn = model.blocks[0].attn
    log.info("backbone %s loaded: fingerprint %s, %d blocks, d=%d", name, fingerprint[:12], len(model.blocks),
             model.embed_dim)
    return Backbone(
        model=model, name=name, fingerprint=fingerprint, embed_dim=model.embed_dim, depth=len(model.blocks),
        num_heads=attn.num_heads, head_dim=attn.head_dim, patch_size=tuple(model.patch_embed.patch_size),
        num_prefix_tokens=model.num_prefix_tokens, num_patches=model.patch_embed.num_patches,
        data_config=data_config,
    )
