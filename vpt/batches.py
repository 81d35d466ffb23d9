"""Training batches as serving sees them: uint8 images preprocessed together on the device.

Training datasets yield decoded images as uint8 (H, W, 3) tensors (`ImageDataset(samples,
to_uint8_hwc)`); `collate_images` keeps a batch as a list (sizes may differ) and `device_batch`
turns it into the backbone's input on its device: validation and evaluation with
`vpt.preprocess.Preprocessor`, the arithmetic the server's engine and `vpt-serve eval` apply, so a
validation accuracy measured while training is what serving gives on the same images; training
with `TrainAugment` (the `fgvc` recipe, batched) or the Preprocessor (`none`).

Datasets that yield ready (3, H, W) float tensors (e.g. through `vpt.transforms`) still work: such
batches are stacked as before and only moved to the device.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

from vpt.preprocess import Preprocessor, normalise, resize, size_groups, upload
from vpt.transforms import AUGMENTATIONS, data_config

BatchTransform = Callable[..., Tensor]   # (uint8 images, device, dtype) -> (n, 3, H, W)


class TrainAugment:
    """The `fgvc` augmentation (`vpt.transforms.train_transform`) on uint8 batches: shorter side to
    `max(H, W) * 256 / 224`, a random (H, W) crop and a horizontal flip with probability 0.5 per
    image, drawn from torch's global generator in batch order (seeded by the training run), then
    the config's normalisation. Resizing is `vpt.preprocess.resize` (the serving arithmetic)."""

    def __init__(self, config: Mapping[str, Any] | Any) -> None:
        cfg = data_config(config)
        _, self.height, self.width = cfg["input_size"]
        self.side = int(max(self.height, self.width) * 256 / 224)  # 224 -> 256, as in the paper
        self.mode = Preprocessor(cfg).mode
        self.mean, self.std = cfg["mean"], cfg["std"]

    def resized_size(self, h: int, w: int) -> tuple[int, int]:
        """torchvision's Resize(side): the shorter side to `side`, the longer truncated."""
        if h <= w:
            return self.side, int(self.side * w / h)
        return int(self.side * h / w), self.side

    def __call__(self, images: Sequence[Tensor], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, pin: bool = False) -> Tensor:
        """uint8 (h, w, 3) images -> (n, 3, H, W) augmented, normalised `dtype` batch on `device`."""
        out = torch.empty((len(images), 3, self.height, self.width), device=device,
                          dtype=torch.float32)                                              # (n, 3, H, W)
        for (h, w), idx in size_groups(images).items():
            rh, rw = self.resized_size(h, w)
            x = resize(upload(images, idx, device, pin), (rh, rw), self.mode)               # (k, 3, rh, rw)
            for k, i in enumerate(idx):
                top = int(torch.randint(0, rh - self.height + 1, (1,)))
                left = int(torch.randint(0, rw - self.width + 1, (1,)))
                crop = x[k, :, top:top + self.height, left:left + self.width]                # (3, H, W)
                out[i] = crop.flip(-1) if float(torch.rand(1)) < 0.5 else crop
        return normalise(out, self.mean, self.std).to(dtype)


def train_batch_transform(config: Mapping[str, Any] | Any, augment: str = "fgvc") -> BatchTransform:
    """The training batches' transform: `fgvc` (TrainAugment) or `none` (the serving Preprocessor)."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose from {AUGMENTATIONS}")
    return TrainAugment(config) if augment == "fgvc" else Preprocessor(config)


def is_uint8_image(x: Any) -> bool:
    return isinstance(x, Tensor) and x.dtype == torch.uint8 and x.dim() == 3 and x.shape[2] == 3


def collate_images(batch: Sequence[tuple[Any, Any]]) -> tuple[Any, Tensor]:
    """A DataLoader collate: uint8 images stay a list of (h, w, 3) tensors, anything else is stacked."""
    if batch and is_uint8_image(batch[0][0]):
        return [image for image, _ in batch], torch.as_tensor([int(label) for _, label in batch])
    return default_collate(batch)


def device_batch(images: Tensor | Sequence[Tensor], device: torch.device, dtype: torch.dtype,
                 transform: BatchTransform | None, config: Mapping[str, Any] | Any = None) -> Tensor:
    """A collated batch as the backbone's (B, 3, H, W) input on `device`: a list of uint8 images goes
    through `transform` (default: the serving Preprocessor for `config`), a tensor is moved as it is."""
    if isinstance(images, Tensor):
        return images.to(device, dtype, non_blocking=True)                                  # (B, 3, H, W)
    pre = transform if transform is not None else Preprocessor(config)
    return pre(images, device, dtype, pin=device.type == "cuda")                            # (B, 3, H, W)
