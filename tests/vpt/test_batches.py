"""Training batches on the device: the serving preprocessing for validation, the fgvc augmentation batched."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tests.fixtures.digits import digit_images
from vpt.batches import TrainAugment, collate_images, device_batch, train_batch_transform
from vpt.preprocess import Preprocessor, normalise, resize, to_uint8_hwc

CFG = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5),
       "crop_pct": 0.9}


def images() -> list[torch.Tensor]:
    """Digits at two sizes and a non-square photo-like image: three size groups."""
    small = [to_uint8_hwc(im) for _, im in digit_images(range(3), per_class=2)]                   # 32 x 32
    big = [to_uint8_hwc(im.resize((48, 48), Image.BILINEAR)) for _, im in digit_images(range(2), per_class=1)]
    wide = torch.from_numpy(np.random.RandomState(0).randint(0, 256, (40, 70, 3), dtype=np.uint8))
    return [small[0], big[0], *small[1:3], wide, big[1], *small[3:]]


def test_each_augmented_image_is_a_crop_of_the_resized_image_flipped_or_not() -> None:
    aug = TrainAugment(CFG)
    assert aug.side == int(32 * 256 / 224) == 36
    imgs = images()
    torch.manual_seed(0)
    out = aug(imgs)                                                                   # (n, 3, 32, 32)
    assert out.shape == (len(imgs), 3, 32, 32) and out.dtype == torch.float32
    flips = 0
    for img, got in zip(imgs, out):
        h, w = img.shape[:2]
        rh, rw = aug.resized_size(h, w)
        assert min(rh, rw) == 36 and (rh, rw) == ((36, int(36 * 70 / 40)) if w > h else (36, 36))
        full = normalise(resize(img.permute(2, 0, 1)[None].float(), (rh, rw), "bicubic"), CFG["mean"], CFG["std"])[0]
        crops = [(t, le, full[:, t:t + 32, le:le + 32]) for t in range(rh - 31) for le in range(rw - 31)]
        found = [(t, le, f) for t, le, c in crops for f in (False, True) if torch.equal(got, c.flip(-1) if f else c)]
        assert found, "not a crop of the resized image"
        flips += all(f for _, _, f in found)
    assert 0 < flips < len(imgs)   # some flipped, some not (seeded)
    torch.manual_seed(0)
    assert torch.equal(aug(imgs), out)     # the global generator decides: a seeded run repeats itself
    assert not torch.equal(aug(imgs), out)


def test_validation_batches_are_the_serving_preprocessing() -> None:
    imgs = images()
    batch, labels = collate_images([(img, i) for i, img in enumerate(imgs)])
    assert isinstance(batch, list) and labels.tolist() == list(range(len(imgs)))
    got = device_batch(batch, torch.device("cpu"), torch.float64, None, CFG)
    assert got.dtype == torch.float64 and torch.equal(got, Preprocessor(CFG)(imgs).double())
    assert isinstance(train_batch_transform(CFG, "none"), Preprocessor)
    assert isinstance(train_batch_transform(CFG, "fgvc"), TrainAugment)
    with pytest.raises(ValueError, match="augmentation"):
        train_batch_transform(CFG, "mixup")
    ready = torch.randn(2, 3, 32, 32)                       # tensors from a PIL transform pass through as they are
    stacked, _ = collate_images([(ready[0], 0), (ready[1], 1)])
    assert torch.equal(device_batch(stacked, torch.device("cpu"), torch.float32, None, CFG), ready)
