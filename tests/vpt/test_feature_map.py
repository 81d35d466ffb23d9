"""The feature map: CLS features of the frozen backbone and of a task, embedded with t-SNE."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.fixtures.digits import digit_images, make_digits_zip
from vpt.data import ImageDataset
from vpt.feature_map import MIN_POINTS, cls_features, feature_map
from vpt.pipeline import train_task_from_archive
from vpt.task import TaskParams, TaskSpec
from vpt.train import TrainOptions
from vpt.transforms import eval_transform

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = ("zero", "one", "two", "three")


@pytest.fixture(scope="module")
def digits_set(tmp_path_factory: pytest.TempPathFactory, tiny_backbone) -> ImageDataset:
    root = tmp_path_factory.mktemp("fm")
    samples = []
    for i, (label, image) in enumerate(digit_images(range(4), per_class=10)):
        image.save(root / f"{i}.png")
        samples.append((root / f"{i}.png", label))
    return ImageDataset(samples, eval_transform(tiny_backbone.data_config))


def deep_task(backbone) -> TaskParams:
    return TaskParams.new(TaskSpec("vpt-deep", 4, CLASSES), backbone, generator=torch.Generator().manual_seed(0))


def test_linear_features_are_the_frozen_backbone_and_prompts_change_them(tiny_backbone, digits_set) -> None:
    lin, task, labels = cls_features(tiny_backbone, deep_task(tiny_backbone), digits_set, batch_size=16)
    assert lin.shape == task.shape == (40, 64) and labels.tolist() == [y for _, y in digits_set.samples]
    images = torch.stack([digits_set[i][0] for i in range(len(digits_set))])          # (40, 3, 32, 32)
    with torch.inference_mode():
        m = tiny_backbone.model
        expected = m.forward_head(m.forward_features(images), pre_logits=True)         # (40, 64) timm's CLS
    torch.testing.assert_close(lin, expected.float(), atol=1e-4, rtol=1e-4)
    assert (lin - task).abs().max() > 1e-3  # deep prompts move the CLS features


def test_feature_map_shapes_bounds_and_scores(tiny_backbone, digits_set) -> None:
    fm = feature_map(tiny_backbone, deep_task(tiny_backbone), digits_set, CLASSES, max_points=30)
    assert fm is not None and fm["method"] == "tsne" and fm["classes"] == list(CLASSES)
    assert len(fm["labels"]) == 30 and set(fm["labels"]) == {0, 1, 2, 3}  # a bounded random subset
    for side in ("linear", "task"):
        xy = np.asarray(fm[side]["xy"])
        assert xy.shape == (30, 2) and np.abs(xy).max() == pytest.approx(1.0)
        assert -1.0 <= fm[side]["silhouette"] <= 1.0
    assert fm["linear"]["xy"] != fm["task"]["xy"]
    # the pretrained tiny ViT separates digits: better than the same features with shuffled labels
    lin, _, labels = cls_features(tiny_backbone, deep_task(tiny_backbone), digits_set)
    from sklearn.metrics import silhouette_score

    shuffled = np.random.RandomState(0).permutation(labels.numpy())
    full = feature_map(tiny_backbone, deep_task(tiny_backbone), digits_set, CLASSES)
    assert full["linear"]["silhouette"] > silhouette_score(lin.numpy(), shuffled)


def test_too_few_images_give_no_map(tiny_backbone, digits_set) -> None:
    assert feature_map(tiny_backbone, deep_task(tiny_backbone), digits_set, CLASSES, max_points=MIN_POINTS - 1) is None


def test_training_stores_the_map_in_the_metrics(tiny_backbone, tmp_path: Path) -> None:
    archive = make_digits_zip(tmp_path / "d.zip", classes=range(3), per_class=10, layout="split", val_per_class=3)
    result = train_task_from_archive(archive, tmp_path / "work", tiny_backbone,
                                     TrainOptions(method="vpt-shallow", num_prompts=2, epochs=1, batch_size=8,
                                                  num_workers=0))
    fm = result.metrics["feature_map"]
    assert len(fm["labels"]) == result.metrics["num_val"] == 9 and fm["classes"] == ["0", "1", "2"]
    assert len(fm["task"]["xy"]) == 9 and fm["task"]["silhouette"] is not None
