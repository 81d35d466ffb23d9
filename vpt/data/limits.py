"""Limits applied while ingesting an uploaded dataset archive."""
from __future__ import annotations

from dataclasses import dataclass, fields

GiB = 1 << 30
MiB = 1 << 20


@dataclass(frozen=True)
class IngestLimits:
    """Caps for one upload; the defaults suit a production server, which may pass its own.

    `max_ratio` bounds uncompressed/compressed bytes of each member (zip bombs); it is only
    enforced once a member has produced more than `ratio_floor_bytes`, since tiny files
    (a manifest, a flat icon) compress far better than any photo yet can do no harm.
    """

    max_archive_bytes: int = 2 * GiB
    max_members: int = 200_000
    max_total_bytes: int = 8 * GiB
    max_ratio: float = 200.0
    ratio_floor_bytes: int = 1 * MiB
    max_image_pixels: int = 50_000_000
    min_images_per_class: int = 2
    min_classes: int = 2
    max_classes: int = 10_000

    def __post_init__(self) -> None:
        for f in fields(self):
            if getattr(self, f.name) <= 0:
                raise ValueError(f"IngestLimits.{f.name} must be positive, got {getattr(self, f.name)!r}")
        if self.min_classes < 2:
            raise ValueError("IngestLimits.min_classes must be at least 2: a classifier needs two classes")
