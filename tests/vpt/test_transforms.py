"""Eval and training transforms built from timm data configs."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from vpt.transforms import IMAGENET_MEAN, IMAGENET_STD, data_config, eval_transform, train_transform

TINY = {"input_size": (3, 32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
        "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center"}


@dataclass(frozen=True)
class DataConfig:
    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 0.875
    crop_mode: str = "center"


def _flat(color: tuple[int, int, int], size: tuple[int, int] = (50, 40)) -> Image.Image:
    return Image.new("RGB", size, color)


def _noise(size: tuple[int, int] = (61, 47)) -> Image.Image:
    return Image.fromarray(np.random.RandomState(0).randint(0, 255, (size[1], size[0], 3), dtype=np.uint8))


@pytest.mark.parametrize("config", [TINY, DataConfig((3, 32, 32), (0.5,) * 3, (0.5,) * 3)],
                         ids=["dict", "dataclass"])
def test_eval_transform_shape_and_normalisation(config: object) -> None:
    x = eval_transform(config)(_flat((255, 0, 51)))
    assert x.shape == (3, 32, 32)
    expected = (torch.tensor([255, 0, 51]) / 255 - 0.5) / 0.5  # (3,)
    torch.testing.assert_close(x[:, 16, 16], expected, atol=1e-5, rtol=0)


def test_eval_transform_follows_a_real_timm_config() -> None:
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=48, patch_size=16,
                              embed_dim=32, depth=1, num_heads=1)
    cfg = dict(timm.data.resolve_model_data_config(model))
    cfg["input_size"] = (3, 48, 48)
    x = eval_transform(cfg)(_flat((10, 200, 30)))
    assert x.shape == (3, 48, 48)
    mean, std = torch.tensor(cfg["mean"]), torch.tensor(cfg["std"])
    expected = (torch.tensor([10, 200, 30]) / 255 - mean) / std  # (3,)
    torch.testing.assert_close(x[:, 0, 0], expected, atol=1e-5, rtol=0)


def test_mean_std_override() -> None:
    x = eval_transform(TINY, mean=IMAGENET_MEAN, std=IMAGENET_STD)(_flat((128, 128, 128)))
    expected = (torch.full((3,), 128 / 255) - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x[:, 5, 5], expected, atol=1e-5, rtol=0)
    y = train_transform(TINY, mean=IMAGENET_MEAN, std=IMAGENET_STD)(_flat((128, 128, 128)))
    torch.testing.assert_close(y[:, 5, 5], expected, atol=1e-5, rtol=0)


def test_fgvc_recipe_scaled_to_input_size() -> None:
    ops = train_transform({"input_size": (3, 224, 224)}).transforms
    assert [type(t).__name__ for t in ops] == ["Resize", "RandomCrop", "RandomHorizontalFlip", "ToTensor",
                                               "Normalize"]
    assert ops[0].size == 256 and ops[1].size == (224, 224)
    assert train_transform({"input_size": 384}).transforms[0].size == 438
    assert train_transform(TINY).transforms[0].size == 36


def test_fgvc_output_is_random_but_seeded() -> None:
    tf = train_transform(TINY)
    image = _noise()
    torch.manual_seed(0)
    a = [tf(image) for _ in range(6)]
    torch.manual_seed(0)
    b = [tf(image) for _ in range(6)]
    assert all(x.shape == (3, 32, 32) for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert any(not torch.equal(a[0], x) for x in a[1:])


def test_none_is_the_eval_transform() -> None:
    image = _noise()
    torch.testing.assert_close(train_transform(TINY, "none")(image), eval_transform(TINY)(image))


def test_config_errors() -> None:
    with pytest.raises(ValueError):
        train_transform(TINY, "autoaugment")
    with pytest.raises(ValueError):
        data_config({"mean": (0.5, 0.5, 0.5)})
    with pytest.raises(ValueError):
        data_config(TINY, std=(0.0, 1.0, 1.0))


def test_data_config_normalises_sizes() -> None:
    assert data_config({"input_size": 64})["input_size"] == (3, 64, 64)
    assert data_config({"input_size": (40, 48)})["input_size"] == (3, 40, 48)
    cfg = data_config({"input_size": (3, 32, 32), "crop_pct": None})
    assert cfg["crop_pct"] == 0.875 and cfg["mean"] == IMAGENET_MEAN
