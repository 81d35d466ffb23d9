"""The batched tensor eval transform against timm's own PIL transform, on real photos and digits; its
banded weight matrices against F.interpolate (antialiased) then the crop; the bounds of their cache."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_sample_images

import vpt.preprocess as pp
from server.frontend.images import ImageDecoder
from tests.fixtures.digits import digit_images
from vpt.preprocess import ImageTransform, PlanCache, Preprocessor, resize_matrix, to_uint8_hwc
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
                                                     (0.95, "center", 32), (0.875, "center", (160, 224)),
                                                     (1.15, "center", 64), (1.3, "center", 99)])  # crops that pad
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


def random_photo_crops(n: int, seed: int) -> list[torch.Tensor]:
    """Random crops of the sample photos at random sizes (7..427 px a side); every fourth one then
    resized (PIL) to 5..30 px, which every config here upscales."""
    rng, sources = np.random.default_rng(seed), photos()[:2]
    out = []
    for i in range(n):
        photo = sources[i % 2]
        h, w = (int(v) for v in rng.integers(7, 428, 2))
        top, left = int(rng.integers(0, 428 - h)), int(rng.integers(0, 641 - w))
        im = photo.crop((left, top, left + w, top + h))
        if i % 4 == 0:
            im = im.resize(tuple(int(v) for v in rng.integers(5, 31, 2)), Image.BILINEAR)
        out.append(to_uint8_hwc(im))
    return out


def interpolate_then_crop(pre: Preprocessor, img: torch.Tensor) -> torch.Tensor:
    """The reference: F.interpolate (antialiased for bilinear/bicubic) to the resized size, then the
    crop at the geometry's (top, left), zeros where it falls outside; unrounded 0..255 floats."""
    g = pre.geometry(*img.shape[:2])
    aa = {"antialias": True, "align_corners": False} if pre.mode in ("bilinear", "bicubic") else {}
    x = F.interpolate(img.permute(2, 0, 1)[None].float(), size=(g.rh, g.rw), mode=pre.mode, **aa)[0]
    out = torch.zeros(3, pre.height, pre.width)
    y0, y1, x0, x1 = max(g.top, 0), min(g.top + pre.height, g.rh), max(g.left, 0), min(g.left + pre.width, g.rw)
    out[:, y0 - g.top:y1 - g.top, x0 - g.left:x1 - g.left] = x[:, y0:y1, x0:x1]
    return out                                                                    # (3, H, W)


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("crop_pct,crop_mode,size", [(0.875, "center", 32), (0.9, "center", 224),
                                                     (1.15, "center", 64), (0.9, "squash", 48),
                                                     (0.875, "center", (160, 224)), (1.3, "center", (99, 70))])
def test_weight_matrices_equal_interpolate_then_crop(interpolation: str, crop_pct: float, crop_mode: str,
                                                     size: int | tuple[int, int]) -> None:
    hw = size if isinstance(size, tuple) else (size, size)
    cfg = {"input_size": (3, *hw), "interpolation": interpolation, "crop_pct": crop_pct, "crop_mode": crop_mode}
    pre = Preprocessor(cfg)
    images = random_photo_crops(12, seed=hw[0] + int(100 * crop_pct))
    assert {pre.geometry(*im.shape[:2]).rw > im.shape[1] for im in images} == {True, False}  # up and down
    ref = torch.stack([interpolate_then_crop(pre, im) for im in images])          # (n, 3, H, W)
    got = pre.resize_crop(images)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= 1e-3                                 # float32, before rounding
    d = (got.clamp(0, 255).round() - ref.clamp(0, 255).round()).abs()
    off = d > 0  # only near-ties may round the other way: a handful of pixels, by exactly 1
    assert d.max().item() <= 1 and off.sum().item() <= 1e-3 * d.numel(), off.sum().item()
    assert ((ref[off] - ref[off].floor() - 0.5).abs() <= 1e-3).all()
    out = pre(images)
    assert out.is_contiguous() and out.dtype == torch.float32
    assert torch.equal(out, pp.normalise(got.clamp(0, 255).round(), pre.mean, pre.std))


@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_weights_are_torchs_antialiased_weights(mode: str) -> None:
    for n_in, n_out in [(19, 15), (100, 37), (37, 100), (255, 224), (801, 248), (7, 7), (1, 5)]:
        eye = torch.eye(n_in)[None, None]                                           # resize the rows only
        ref = F.interpolate(eye, size=(n_out, n_in), mode=mode, antialias=True, align_corners=False)[0, 0]
        assert torch.allclose(resize_matrix(n_in, n_out, mode), ref, rtol=0, atol=1e-6), (n_in, n_out)


def test_plan_cache_is_a_bounded_lru(monkeypatch: pytest.MonkeyPatch) -> None:
    def build() -> pp.AxisPlan:
        return pp._build_plan(16, 8, 0, 8, "bilinear", torch.device("cpu"))

    cache = PlanCache(max_entries=4, max_bytes=10**9)
    for n in range(10, 20):
        cache.get((n,), build)
        cache.get((10,), lambda: pytest.fail("the most recently used entry was evicted"))
    assert len(cache) == 4
    small = PlanCache(max_entries=100, max_bytes=3 * build().nbytes)
    for n in range(10, 20):
        small.get((n,), build)
    assert len(small) == 3 and small.nbytes == 3 * build().nbytes
    # the serving path under a small cache: bounded, and still right after evictions
    monkeypatch.setattr(pp, "PLAN_CACHE", PlanCache(max_entries=16, max_bytes=1 << 20))
    pre = Preprocessor({"input_size": (3, 32, 32), "interpolation": "bicubic", "crop_pct": 0.9})
    images = random_photo_crops(30, seed=1)
    for _ in range(2):
        got = pre.resize_crop(images)
        assert len(pp.PLAN_CACHE) <= 16 and pp.PLAN_CACHE.nbytes <= 1 << 20
    ref = torch.stack([interpolate_then_crop(pre, im) for im in images])
    assert (got - ref).abs().max().item() <= 1e-3


def test_chunked_float_conversion_gives_the_same_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    pre = Preprocessor({"input_size": (3, 32, 32), "interpolation": "bilinear", "crop_pct": 0.9})
    images = random_photo_crops(10, seed=3)
    whole = pre(images)
    monkeypatch.setattr(pp, "CHUNK", 20_000)  # several images a chunk, and images larger than one
    slabs = [py.span * px.span * 3 for py, px in (pre.plans(*im.shape[:2]) for im in images)]
    assert max(slabs) > pp.CHUNK > 2 * min(slabs)
    assert torch.equal(pre(images), whole)


def test_nearest_keeps_the_interpolate_path_and_empty_batches_work() -> None:
    pre = Preprocessor({"input_size": (3, 32, 32), "interpolation": "nearest", "crop_pct": 0.9})
    images = random_photo_crops(4, seed=2)
    for im, got in zip(images, pre.resize_crop(images)):
        assert torch.equal(got, interpolate_then_crop(pre, im))
    for mode in ("nearest", "bicubic"):
        assert Preprocessor({"input_size": (3, 32, 32), "interpolation": mode})([]).shape == (0, 3, 32, 32)
