"""A torch Dataset over (path, label) samples."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from vpt.data.images import open_rgb


class ImageDataset(Dataset):
    """Images decoded as RGB (EXIF orientation applied), passed through `transform`.

    Items are `(transform(image), label)`; without a transform the image is the PIL image.
    """

    def __init__(self, samples: Sequence[tuple[str | Path, int]],
                 transform: Callable[[Image.Image], Any] | None = None) -> None:
        self.samples = [(Path(p), int(label)) for p, label in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = open_rgb(path)
        return (self.transform(image) if self.transform is not None else image), label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]
