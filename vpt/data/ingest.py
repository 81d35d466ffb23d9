"""Turning an uploaded archive into a verified, labelled image dataset on disk.

`ingest_archive` streams a zip or tar (plain, gzip, bzip2, xz; recognised by its leading bytes)
into an empty directory, finds the layout (class folders, train/val folders or a manifest),
checks the classes, then decodes every image. Any problem raises `DatasetError` with a specific
code and up to 20 offending entries, after removing what was extracted.
"""
from __future__ import annotations

import logging
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from vpt.data import errors as E
from vpt.data.errors import DatasetError
from vpt.data.extract import extract_archive
from vpt.data.images import verify_images
from vpt.data.layout import Layout, find_layout, sort_classes
from vpt.data.limits import IngestLimits

log = logging.getLogger(__name__)


class Sample(NamedTuple):
    path: Path
    label: int


@dataclass(frozen=True)
class IngestedDataset:
    """A verified dataset: every path is a decodable image under `root`, labels index `classes`."""

    root: Path
    layout: str
    classes: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...] | None  # None when the archive gave no validation split
    skipped_entries: int = 0
    total_bytes: int = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train(self) -> int:
        return len(self.train)

    @property
    def num_val(self) -> int:
        return len(self.val) if self.val is not None else 0

    def class_counts(self, split: str = "train") -> dict[str, int]:
        samples = self.train if split == "train" else (self.val or ())
        counts = Counter(label for _, label in samples)
        return {name: counts.get(i, 0) for i, name in enumerate(self.classes)}

    def summary(self) -> dict[str, object]:
        """A JSON-serialisable description (no paths)."""
        return {
            "layout": self.layout,
            "classes": list(self.classes),
            "num_classes": self.num_classes,
            "num_train": self.num_train,
            "num_val": self.num_val if self.val is not None else None,
            "train_per_class": self.class_counts("train"),
            "val_per_class": self.class_counts("val") if self.val is not None else None,
            "skipped_entries": self.skipped_entries,
            "total_bytes": self.total_bytes,
        }


def ingest_archive(archive_path: Path, dest_dir: Path, limits: IngestLimits | None = None,
                   *, workers: int = 1) -> IngestedDataset:
    """Extract and verify `archive_path` into `dest_dir` (created if needed; must be empty).

    `workers` threads decode images in parallel. On DatasetError, `dest_dir` is left empty.
    """
    limits = limits or IngestLimits()
    archive_path, dest_dir = Path(archive_path), Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    if any(dest_dir.iterdir()):
        raise ValueError(f"the extraction directory {dest_dir} is not empty")
    try:
        extracted = extract_archive(archive_path, dest_dir, limits)
        layout = find_layout(dest_dir, max_rows=limits.max_members)
        dataset = build_dataset(dest_dir, layout, limits, extracted.skipped, extracted.total_bytes)
        samples = list(dataset.train) + list(dataset.val or ())
        names = [s.path.relative_to(dest_dir).as_posix() for s in samples]
        verify_images([s.path for s in samples], names, limits.max_image_pixels, workers)
    except BaseException as e:
        if isinstance(e, DatasetError):
            log.info("dataset %s refused: %s", archive_path.name, e)
        _empty(dest_dir)
        raise
    log.info("dataset %s: %d classes, %d train and %d val images (%s)", archive_path.name,
             dataset.num_classes, dataset.num_train, dataset.num_val, dataset.layout)
    return dataset


def build_dataset(dest: Path, layout: Layout, limits: IngestLimits, skipped: list[str],
                  total_bytes: int) -> IngestedDataset:
    """The dataset `layout` describes, once its classes pass `limits` (count, images per class)."""
    train_counts = Counter(name for _, name in layout.train)
    all_counts = train_counts + Counter(name for _, name in layout.val or ())
    classes = sort_classes(list(all_counts))
    untrained = [c for c in classes if train_counts[c] == 0]
    if untrained:
        raise DatasetError(E.EMPTY_CLASS, "classes with validation images but no training images", untrained)
    if len(classes) < limits.min_classes:
        raise DatasetError(E.TOO_FEW_CLASSES, f"found {len(classes)} classes; at least "
                           f"{limits.min_classes} are needed (class folders, train/ and val/ folders, "
                           "or manifest.csv/.jsonl)", classes)
    if len(classes) > limits.max_classes:
        raise DatasetError(E.TOO_LARGE, f"found {len(classes)} classes; the limit is {limits.max_classes}")
    few = [c for c in classes if all_counts[c] < limits.min_images_per_class]
    if few:
        raise DatasetError(E.TOO_FEW_IMAGES, f"every class needs at least "
                                             f"{limits.min_images_per_class} images",
                           [f"{c} ({all_counts[c]})" for c in few])
    index = {name: i for i, name in enumerate(classes)}
    train = tuple(Sample(p, index[c]) for p, c in layout.train)
    val = tuple(Sample(p, index[c]) for p, c in layout.val) if layout.val else None
    return IngestedDataset(dest, layout.kind, tuple(classes), train, val, len(skipped), total_bytes)


def _empty(dest: Path) -> None:
    """Remove everything extraction wrote (it made no links, so rmtree stays inside `dest`)."""
    for child in dest.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
