"""Image transforms built from a backbone's timm data config.

The eval transform is timm's own (resize by `crop_pct`, centre crop, normalise) and is what the
server uses for prediction. The training augmentation defaults to the paper's FGVC recipe
(the official code's FGVC transforms), scaled to the input size: Resize(size * 256 / 224, shorter side) ->
RandomCrop(size) -> RandomHorizontalFlip -> ToTensor -> Normalize; at 224 that is exactly
Resize(256) -> RandomCrop(224). The resize uses the backbone's interpolation (the official code
uses torchvision's default, bilinear).

Normalisation caveat: the official VPT code feeds ImageNet mean/std
(0.485, 0.456, 0.406) / (0.229, 0.224, 0.225) even to the in21k ViT-B/16, which was pre-trained on
inputs scaled to [-1, 1] (timm's config for `orig_in21k` says mean = std = 0.5). We use the
backbone's config by default; pass `mean=IMAGENET_MEAN, std=IMAGENET_STD` to both transforms to
reproduce the paper exactly. Training and prediction must normalise the same way.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import timm.data
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torch import Tensor
from torchvision import transforms as T

from vpt.options import AUGMENTATIONS

IMAGENET_MEAN: tuple[float, float, float] = tuple(timm.data.IMAGENET_DEFAULT_MEAN)  # type: ignore[assignment]
IMAGENET_STD: tuple[float, float, float] = tuple(timm.data.IMAGENET_DEFAULT_STD)  # type: ignore[assignment]

_DEFAULTS: dict[str, Any] = {"interpolation": "bilinear", "mean": IMAGENET_MEAN, "std": IMAGENET_STD,
                             "crop_pct": 0.875, "crop_mode": "center"}

Transform = Callable[[Image.Image], Tensor]


def data_config(config: Mapping[str, Any] | Any, mean: Sequence[float] | None = None,
                std: Sequence[float] | None = None) -> dict[str, Any]:
    """Normalise a timm data config (mapping, dataclass or object with attributes) to a dict with
    `input_size` as (3, H, W), `mean`, `std`, `interpolation`, `crop_pct`, `crop_mode`."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, Mapping):
        config = {k: getattr(config, k) for k in ("input_size", *_DEFAULTS) if hasattr(config, k)}
    if "input_size" not in config:
        raise ValueError("the data config has no input_size")
    cfg = {**_DEFAULTS, **{k: v for k, v in config.items() if v is not None}}
    size = cfg["input_size"]
    if isinstance(size, int):
        size = (3, size, size)
    elif len(size) == 2:
        size = (3, *size)
    cfg["input_size"] = tuple(int(s) for s in size)
    cfg["mean"] = tuple(float(m) for m in (mean if mean is not None else cfg["mean"]))
    cfg["std"] = tuple(float(s) for s in (std if std is not None else cfg["std"]))
    if len(cfg["mean"]) != 3 or len(cfg["std"]) != 3 or min(cfg["std"]) <= 0:
        raise ValueError(f"mean and std need 3 values each, std > 0; got {cfg['mean']} and {cfg['std']}")
    return {k: cfg[k] for k in ("input_size", *_DEFAULTS)}


def eval_transform(config: Mapping[str, Any] | Any, *, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None) -> Transform:
    """timm's eval transform for `config`: PIL RGB image -> (3, H, W) float tensor."""
    cfg = data_config(config, mean, std)
    return timm.data.create_transform(is_training=False, **cfg)


def train_transform(config: Mapping[str, Any] | Any, augment: str = "fgvc", *,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> Transform:
    """The training transform: `fgvc` (the paper's recipe, scaled to the input size) or `none`
    (the eval transform)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose from {AUGMENTATIONS}")
    if augment == "none":
        return eval_transform(config, mean=mean, std=std)
    cfg = data_config(config, mean, std)
    _, height, width = cfg["input_size"]
    resize = int(max(height, width) * 256 / 224)  # 224 -> 256, 384 -> 438, 448 -> 512 as in the paper
    interp = str_to_interp_mode(cfg["interpolation"])
    return T.Compose([
        T.Resize(resize, interpolation=interp, antialias=True),  # shorter side
        T.RandomCrop((height, width)),
        T.RandomHorizontalFlip(0.5),
        T.ToTensor(),  # (3, H, W) in [0, 1]
        T.Normalize(cfg["mean"], cfg["std"]),
    ])
