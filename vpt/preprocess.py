"""timm's eval transform as batched tensor code, for uint8 images already on (or bound for) the device.

`preprocess(images, config, device)` takes decoded RGB images as uint8 (H, W, 3) tensors of any
sizes and returns the (n, 3, H', W') float batch the backbone eats, doing what
`vpt.transforms.eval_transform` does with PIL: resize (shorter side to `input / crop_pct`, or both
sides in `squash` mode) with the config's interpolation and antialiasing, centre crop, scale to
[0, 1], normalise. Images of one size are resized together; each size is one interpolation call.

Tolerance: PIL resizes uint8 with fixed-point filters; this code resizes in float32 with torch's
antialiased kernels and rounds to integers before normalising, as PIL's uint8 output does.
Measured on real photos at 224 px, in 0-255 pixel units before normalisation: mean absolute
difference ~0.15 for both interpolations, worst pixel 1 (bilinear) and up to ~10 at sharp edges
(bicubic: PIL's and torch's cubic kernels differ). tests/vpt/test_preprocess.py pins mean <= 0.5,
max <= 16 (bicubic) and <= 1 (bilinear). `border` crop mode (pad instead of crop) is not supported here.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from vpt.transforms import data_config

MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "nearest-exact": "nearest-exact"}
CROP_MODES = ("center", "squash")


@dataclass(frozen=True)
class EvalGeometry:
    """What the eval transform does to an image of a given size: resize to (rh, rw), crop at (top, left)."""

    rh: int
    rw: int
    top: int
    left: int


class Preprocessor:
    """Batched eval transform for one data config (see the module docstring)."""

    def __init__(self, config: Mapping[str, Any] | Any) -> None:
        cfg = data_config(config)
        _, self.height, self.width = cfg["input_size"]
        self.crop_pct = float(cfg["crop_pct"] or 0.875)
        self.crop_mode = cfg.get("crop_mode") or "center"
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r} is not supported on the device; use one of {CROP_MODES}")
        interp = str(cfg["interpolation"])
        if interp not in MODES:
            raise ValueError(f"interpolation {interp!r} is not supported on the device; use one of {list(MODES)}")
        self.mode = MODES[interp]
        self.mean = tuple(cfg["mean"])
        self.std = tuple(cfg["std"])
        self.scale = (math.floor(self.height / self.crop_pct), math.floor(self.width / self.crop_pct))

    @property
    def min_side(self) -> int:
        """Decoding may shrink an image (JPEG draft) as long as both sides stay at least this long."""
        return max(self.scale)

    def geometry(self, h: int, w: int) -> EvalGeometry:
        sh, sw = self.scale
        if self.crop_mode == "squash":
            rh, rw = sh, sw
        elif sh == sw:  # torchvision Resize(int): the shorter side to sh, the longer truncated
            short, long_ = (h, w) if h <= w else (w, h)
            new_long = int(sh * long_ / short)
            rh, rw = (sh, new_long) if h <= w else (new_long, sh)
        else:  # timm's ResizeKeepRatio: the smaller ratio wins
            ratio = min(h / sh, w / sw)
            rh, rw = round(h / ratio), round(w / ratio)
        top = round((rh - self.height) / 2.0)
        left = round((rw - self.width) / 2.0)
        return EvalGeometry(rh, rw, top, left)

    def __call__(self, images: Sequence[Tensor], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, pin: bool = False) -> Tensor:
        """uint8 (H, W, 3) images -> (n, 3, height, width) normalised `dtype` batch on `device`.

        `pin`: stage each size group in pinned host memory so the upload overlaps (CUDA only)."""
        out = torch.empty((len(images), 3, self.height, self.width), device=device,
                          dtype=torch.float32)                                              # (n, 3, H', W')
        for (h, w), idx in size_groups(images).items():
            g = self.geometry(h, w)
            x = upload(images, idx, device, pin)                                            # (k, 3, h, w)
            x = resize(x, (g.rh, g.rw), self.mode)                                          # (k, 3, rh, rw)
            out[idx] = _crop(x, g, self.height, self.width)                                 # (k, 3, H', W')
        return normalise(out, self.mean, self.std).to(dtype)


def size_groups(images: Sequence[Tensor]) -> dict[tuple[int, int], list[int]]:
    """Indices of the uint8 (H, W, 3) `images` by (H, W), in order; anything else is a ValueError."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        if img.dim() != 3 or img.shape[2] != 3 or img.dtype != torch.uint8:
            raise ValueError(f"image {i}: expected uint8 (H, W, 3), got {img.dtype} {tuple(img.shape)}")
        groups.setdefault((int(img.shape[0]), int(img.shape[1])), []).append(i)
    return groups


def upload(images: Sequence[Tensor], idx: Sequence[int], device: torch.device | str, pin: bool = False) -> Tensor:
    """Images `idx` (one size) as a float (k, 3, h, w) batch of 0..255 values on `device`.

    `pin`: stage the group in pinned host memory so the upload overlaps (CUDA only)."""
    batch = torch.stack([images[i] for i in idx])                                           # (k, h, w, 3) uint8
    batch = (batch.pin_memory() if pin else batch).to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).float()                                                # (k, 3, h, w)


def resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """(k, 3, h, w) 0..255 -> (k, 3, *size), antialiased for bilinear/bicubic, rounded as PIL's uint8 output."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    aa = mode in ("bilinear", "bicubic")
    x = F.interpolate(x, size=size, mode=mode, antialias=aa, **({"align_corners": False} if aa else {}))
    return x.clamp_(0, 255).round_()


def normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(n, 3, H, W) 0..255 -> (x / 255 - mean) / std, per channel, float32."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x - m) / s


def _crop(x: Tensor, g: EvalGeometry, height: int, width: int) -> Tensor:
    """torchvision's CenterCrop, padding with zeros where the image is smaller than the crop."""
    top, left = g.top, g.left
    if top < 0 or left < 0 or g.rh < height or g.rw < width:
        pad_t, pad_l = max(-top, 0), max(-left, 0)
        pad_b = max(height - g.rh - pad_t, 0)
        pad_r = max(width - g.rw - pad_l, 0)
        x = F.pad(x, (pad_l, pad_r, pad_t, pad_b))
        top, left = max(top, 0), max(left, 0)
    return x[:, :, top:top + height, left:left + width]


def to_uint8_hwc(image: Any) -> Tensor:
    """A PIL RGB image (or HWC uint8 array) -> uint8 (H, W, 3) tensor."""
    import numpy as np

    arr = np.array(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
    return torch.from_numpy(arr)


class ImageTransform:
    """`Preprocessor` as a per-image PIL transform (datasets, the offline `vpt-serve eval`): the same
    arithmetic the server applies to its batches, so offline accuracy is what serving gives."""

    def __init__(self, config: Mapping[str, Any] | Any) -> None:
        self.pre = Preprocessor(config)

    def __call__(self, image: Any) -> Tensor:
        return self.pre([to_uint8_hwc(image)])[0]                                   # (3, H, W)
