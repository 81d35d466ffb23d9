"""The batched tensor eval transform against timm's own PIL transform, on real photos and digits."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images

from server.frontend.images import ImageDecoder
from tests.fixtures.digits import digit_images
from vpt.preprocess import ImageTransform, Preprocessor, to_uint8_hwc
from vpt.transforms import eval_transform

MEAN_TOL = 0.5   # mean |difference| in 0-255 pixel units (documented in vpt/preprocess.py)
MAX_TOL = 16.0   # worst pixel, bicubic at sharp edges (bilinear stays within 1)


def photos() -> list[Image.Image]:
    """The two scikit-learn sample photos (427x640), crops of odd sizes and one smaller than the crop."""
    china, flower = (Image.fromarray(a) for a in load_sample_images().images)
    return [china, flower, china.crop((13, 7, 330, 250)), flower.crop((0, 0, 201, 597)),
            china.crop((100, 100, 401, 402)), flower.resize((150, 97))]


def pixel_diff(ref: torch.Tensor, got: torch.Tensor, std: tuple[float, ...]) -> tuple[float, float]:
    d = (ref - got).abs() * torch.tensor(std).view(1, 3, 1, 1) * 255  # back to pixel units
    return d.mean().item(), d.max().item()


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("crop_pct,crop_mode,size", [(0.875, "center", 224), (0.9, "center", 224),
                                                     (1.0, "center", 224), (0.9, "squash", 224),
                                                     (0.95, "center", 32), (0.875, "center", (160, 224))])
def test_matches_timms_eval_transform_on_photos(interpolation: str, crop_pct: float, crop_mode: str,
                                                size: int | tuple[int, int]) -> None:
    hw = size if isinstance(size, tuple) else (size, size)
    cfg = {"input_size": (3, *hw), "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": crop_mode,
           "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
    images = photos()
    ref = torch.stack([eval_transform(cfg)(im) for im in images])                 # (n, 3, H, W)
    got = Preprocessor(cfg)([to_uint8_hwc(im) for im in images])                   # one batch, mixed sizes
    assert got.shape == ref.shape == (len(images), 3, *hw)
    mean, worst = pixel_diff(ref, got, cfg["std"])
    assert mean <= MEAN_TOL and worst <= (MAX_TOL if interpolation == "bicubic" else 1.01), (mean, worst)


def test_matches_on_digits_and_keeps_order_within_size_groups() -> None:
    cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.9, "mean": (0.5,) * 3,
           "std": (0.5,) * 3}
    images = [im for _, im in digit_images(classes=range(3), per_class=4, size=40)]
    images += [im.resize((57, 45)) for im in images[:3]]
    ref = torch.stack([eval_transform(cfg)(im) for im in images])
    got = Preprocessor(cfg)([to_uint8_hwc(im) for im in images])
    mean, worst = pixel_diff(ref, got, cfg["std"])
    assert mean <= MEAN_TOL and worst <= MAX_TOL
    # each output row is its own image's (a size-group shuffle would match another row better)
    for i in range(len(images)):
        assert (got - ref[i]).abs().flatten(1).mean(1).argmin().item() == i


def test_jpeg_draft_decoding_stays_close_and_shrinks_the_image() -> None:
    cfg = {"input_size": (3, 64, 64), "interpolation": "bicubic", "crop_pct": 0.875, "mean": (0.5,) * 3,
           "std": (0.5,) * 3}
    pre = Preprocessor(cfg)
    photo = photos()[0]  # 640x427: more than twice the 73 px the resize needs
    buf = io.BytesIO()
    photo.save(buf, "JPEG", quality=90)
    full = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    drafted = ImageDecoder(10**8, min_side=pre.min_side).decode_one(buf.getvalue(), "photo")
    assert min(drafted.shape[:2]) >= pre.min_side and drafted.shape[0] < full.shape[0]
    a = pre([torch.from_numpy(full.copy())])
    b = pre([torch.from_numpy(drafted.copy())])
    mean, _ = pixel_diff(a, b, cfg["std"])
    assert mean <= 3.0, mean  # DCT scaling vs full decode + resize: a little blur, no shift


def test_rejects_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="crop_mode"):
        Preprocessor({"input_size": (3, 32, 32), "crop_mode": "border"})
    with pytest.raises(ValueError, match="uint8"):
        Preprocessor({"input_size": (3, 32, 32)})([torch.zeros(8, 8, 3)])


def test_per_image_transform_is_the_batch_arithmetic() -> None:
    cfg = {"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.9}
    image = photos()[2]
    assert torch.equal(ImageTransform(cfg)(image), Preprocessor(cfg)([to_uint8_hwc(image)])[0])
