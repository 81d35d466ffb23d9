"""Cheap checks of an uploaded dataset, answered before a training job is queued.

`preflight_archive` runs the checks of `ingest_archive` that need names, not image bytes: the
archive type (from its leading bytes), every entry's path and kind, the declared sizes, the
layout, the classes and their image counts. It extracts only a sample, the first few files of
each folder (and any manifest), and writes every other file as an empty placeholder, so the same
layout code sees the same tree; then it decodes up to `sample_per_class` sampled images of each
class. A dataset that passes may still fail in the job, which validates every image.
"""
from __future__ import annotations

import logging
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from vpt.data import errors as E
from vpt.data.errors import DatasetError
from vpt.data.extract import extract_archive
from vpt.data.images import verify_images
from vpt.data.ingest import build_dataset
from vpt.data.layout import MANIFESTS, find_layout
from vpt.data.limits import IngestLimits

log = logging.getLogger(__name__)

SAMPLE_PER_CLASS = 3


@dataclass(frozen=True)
class Preflight:
    """What the checks saw: the archive's format and layout, class count, images, images decoded."""

    format: str
    layout: str
    num_classes: int
    num_images: int
    sampled: int


def _first_files(per_folder: int) -> Callable[[PurePosixPath], bool]:
    """A `keep` filter: the first `per_folder` files met in each folder, and every manifest."""
    seen: Counter[PurePosixPath] = Counter()

    def keep(rel: PurePosixPath) -> bool:
        if rel.name in MANIFESTS:
            return True
        seen[rel.parent] += 1
        return seen[rel.parent] <= per_folder

    return keep


def preflight_archive(archive: Path, scratch: Path, limits: IngestLimits | None = None, *,
                      name: str | None = None, sample_per_class: int = SAMPLE_PER_CLASS) -> Preflight:
    """Raise the DatasetError the job would raise for what is cheap to see; `scratch` is a folder for a
    temporary tree (removed before returning). `name` (the uploaded file's name) is named in the
    details of an error about the archive as a whole."""
    limits = limits or IngestLimits()
    scratch.mkdir(parents=True, exist_ok=True)
    tree = Path(tempfile.mkdtemp(dir=scratch, prefix="preflight-"))
    try:
        extracted = extract_archive(archive, tree, limits, keep=_first_files(sample_per_class))
        layout = find_layout(tree, max_rows=limits.max_members)
        dataset = build_dataset(tree, layout, limits, extracted.skipped, extracted.total_bytes)
        per_class: Counter[int] = Counter()
        sample = []
        for path, label in list(dataset.train) + list(dataset.val or ()):
            if path not in extracted.placeholders and per_class[label] < sample_per_class:
                per_class[label] += 1
                sample.append(path)
        verify_images(sample, [p.relative_to(tree).as_posix() for p in sample], limits.max_image_pixels)
    except DatasetError as e:
        if e.code == E.ARCHIVE_INVALID and not e.entries and name:
            raise DatasetError(e.code, e.message, [name]) from e
        raise
    finally:
        shutil.rmtree(tree, ignore_errors=True)
    log.info("dataset %s passed the submit checks: %d classes, %d images, %d decoded", name or archive.name,
             dataset.num_classes, dataset.num_train + dataset.num_val, len(sample))
    return Preflight(extracted.format, dataset.layout, dataset.num_classes, dataset.num_train + dataset.num_val,
                     len(sample))
