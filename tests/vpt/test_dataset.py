"""The torch Dataset over ingested samples, and train/val splitting."""
from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.fixtures.digits import make_digits_zip
from vpt.data import (
    ImageDataset,
    ImageDecodeError,
    IngestedDataset,
    Sample,
    ingest_archive,
    open_rgb,
    split_dataset,
    stratified_split,
)
from vpt.transforms import eval_transform

CFG = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "interpolation": "bicubic",
       "crop_pct": 0.9, "crop_mode": "center"}


def _samples(sizes: dict[int, int]) -> list[Sample]:
    return [Sample(Path(f"/d/{label}/{i:03d}.png"), label) for label, n in sizes.items() for i in range(n)]


@pytest.fixture(scope="module")
def digits(digits_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> IngestedDataset:
    return ingest_archive(digits_zip, tmp_path_factory.mktemp("ingested"))


def test_dataset_yields_transformed_rgb_and_labels(digits: IngestedDataset) -> None:
    ds = ImageDataset(digits.train, eval_transform(CFG))
    assert len(ds) == 300 and ds.targets == [label for _, label in digits.train]
    x, y = ds[37]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == digits.train[37].label
    assert -1.0 <= x.min() and x.max() <= 1.0
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)))
    assert batch[0].shape == (8, 3, 32, 32) and batch[1].tolist() == ds.targets[:8]


def test_dataset_converts_every_mode_to_rgb(tmp_path: Path) -> None:
    paths = []
    for i, mode in enumerate(["L", "RGBA", "P", "CMYK", "I;16"]):
        path = tmp_path / f"{i}.{'jpg' if mode == 'CMYK' else 'png'}"
        Image.new(mode, (9, 7)).save(path)
        paths.append((path, i))
    ds = ImageDataset(paths)
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.mode == "RGB" and image.size == (9, 7) and label == i


def test_exif_orientation_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (20, 10))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees
    image.save(tmp_path / "r.jpg", exif=exif)
    assert ImageDataset([(tmp_path / "r.jpg", 0)])[0][0].size == (10, 20)


def test_open_rgb_refuses_bad_and_oversized_images(tmp_path: Path) -> None:
    buf = io.BytesIO()
    Image.new("L", (40, 30)).save(buf, format="PNG")
    assert open_rgb(io.BytesIO(buf.getvalue()), max_pixels=1200).mode == "RGB"
    with pytest.raises(ImageDecodeError, match="40x30"):
        open_rgb(io.BytesIO(buf.getvalue()), max_pixels=1199)
    png = buf.getvalue()
    for data in (b"not an image", png[: len(png) - 20], b"%!PS-Adobe-3.0 EPSF-3.0\n"):
        with pytest.raises(ImageDecodeError) as info:
            open_rgb(io.BytesIO(data))
        assert info.value.code == "image_invalid"


def test_split_is_deterministic_and_order_independent() -> None:
    samples = _samples({0: 40, 1: 25, 2: 7})
    a = stratified_split(samples, 0.1, seed=3)
    assert stratified_split(list(reversed(samples)), 0.1, seed=3) == a
    assert stratified_split(samples, 0.1, seed=4) != a
    train, val = a
    assert sorted(train + val) == sorted(samples) and not set(train) & set(val)


def test_split_is_stratified() -> None:
    sizes = {0: 100, 1: 30, 2: 5, 3: 2, 4: 1}
    train, val = stratified_split(_samples(sizes), 0.1, seed=0)
    val_counts, train_counts = Counter(s.label for s in val), Counter(s.label for s in train)
    assert dict(val_counts) == {0: 10, 1: 3, 2: 1, 3: 1}  # >= 1 for every class with 2+ images
    assert all(train_counts[c] >= 1 for c in sizes) and train_counts[4] == 1


@pytest.mark.parametrize("fraction,expected", [(0.0, 0), (0.5, 5), (0.9, 9)])
def test_split_fraction_bounds(fraction: float, expected: int) -> None:
    train, val = stratified_split(_samples({0: 10, 1: 10}), fraction, seed=0)
    assert len(val) == 2 * expected and len(train) == 20 - 2 * expected


@pytest.mark.parametrize("fraction", [-0.1, 1.0])
def test_split_rejects_bad_fraction(fraction: float) -> None:
    with pytest.raises(ValueError):
        stratified_split(_samples({0: 3}), fraction)


def test_split_dataset_prefers_the_given_val(tmp_path: Path) -> None:
    archive = make_digits_zip(tmp_path / "s.zip", classes=range(3), per_class=10, layout="split",
                              val_per_class=2)
    given = ingest_archive(archive, tmp_path / "given")
    train, val = split_dataset(given, val_fraction=0.5, seed=1)
    assert (train, val) == (list(given.train), list(given.val))
    archive = make_digits_zip(tmp_path / "f.zip", classes=range(3), per_class=10)
    folders = ingest_archive(archive, tmp_path / "f")
    train, val = split_dataset(folders, seed=1)
    assert len(val) == 3 and len(train) == 27 and Counter(s.label for s in val) == {0: 1, 1: 1, 2: 1}
