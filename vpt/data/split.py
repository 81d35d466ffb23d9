"""Train/validation splits: the dataset's own, else a seeded stratified one."""
from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

from vpt.data.ingest import IngestedDataset, Sample

S = TypeVar("S", bound=tuple)  # (path, label) pairs, e.g. vpt.data.ingest.Sample

DEFAULT_VAL_FRACTION = 0.1  # the paper's FGVC splits: a random 90/10 split of the official train set


def stratified_split(samples: Sequence[S], val_fraction: float = DEFAULT_VAL_FRACTION,
                     seed: int = 0) -> tuple[list[S], list[S]]:
    """Split (path, label) samples per class into train and val; deterministic in `seed`.

    Each class sends round(n * val_fraction) images to val, but at least 1 when it has 2 or
    more images (so every class is scored) and never all of them (every class keeps >= 1 train
    image). The result does not depend on the input order. `val_fraction` 0 gives no val.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    by_class: dict[int, list[S]] = defaultdict(list)
    for s in samples:
        by_class[int(s[1])].append(s)
    rng = random.Random(seed)
    train: list[S] = []
    val: list[S] = []
    for label in sorted(by_class):
        group = sorted(by_class[label], key=lambda s: str(s[0]))
        rng.shuffle(group)
        n_val = _val_count(len(group), val_fraction)
        val.extend(group[:n_val])
        train.extend(group[n_val:])
    return sorted(train, key=_order), sorted(val, key=_order)


def _order(sample: tuple) -> tuple[int, str]:
    return int(sample[1]), str(sample[0])


def _val_count(n: int, val_fraction: float) -> int:
    if val_fraction == 0.0 or n < 2:
        return 0
    return min(n - 1, max(1, int(n * val_fraction + 0.5)))


def split_dataset(dataset: IngestedDataset, val_fraction: float = DEFAULT_VAL_FRACTION,
                  seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """The dataset's own val split when it has one (`val_fraction` is then ignored), else a
    stratified split of its training samples."""
    if dataset.val:
        return list(dataset.train), list(dataset.val)
    return stratified_split(dataset.train, val_fraction, seed)
