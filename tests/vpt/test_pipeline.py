"""Archive -> task file: real digit images, the three methods, metadata, and nothing kept on failure."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from tests.fixtures.digits import make_digits_zip
from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from vpt.backbone import Backbone, load_backbone
from vpt.data import DatasetError, ImageDataset, ingest_archive, split_dataset
from vpt.engine import forward_logits, stack_slots, task_slot_tensors
from vpt.pipeline import train_task_from_archive
from vpt.preprocess import ImageTransform
from vpt.task import load_task_file
from vpt.train import ProgressEvent, TrainingCancelled, TrainOptions

log = logging.getLogger(__name__)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def feature_backbone(tmp_path_factory: pytest.TempPathFactory) -> Backbone:
    """The tiny ViT (4 blocks, d=64, 32x32) with its matrices drawn from N(0, 0.1^2), still untrained.

    With timm's N(0, 0.02^2) init the blocks are near-identity, the CLS token is close to the mean
    patch embedding, and 270 digits barely separate; a wider random init gives usable features.
    """
    torch.manual_seed(0)
    model = timm.create_model(TINY_NAME, pretrained=False, **TINY_KWARGS)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.1)
    path = tmp_path_factory.mktemp("vit") / "tiny_wide.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return load_backbone(TINY_NAME, weights=path, model_kwargs=TINY_KWARGS)


def server_path_accuracy(bb: Backbone, blob: bytes, zip_path: Path, dest: Path) -> tuple[float, int]:
    """Reload the task file and score every val image through the bank tensors and the server's
    preprocessing, as serving does: (accuracy, val images)."""
    task = load_task_file(blob, bb)
    ds = ingest_archive(zip_path, dest)
    meta = json.loads(task.metadata["dataset"])
    assert meta["split"]["source"] == "stratified"
    table = stack_slots(bb, [task_slot_tensors(bb, task.params)])
    _, val = split_dataset(ds, 0.1, seed=0)
    data = ImageDataset(val, ImageTransform(bb.data_config))
    images = torch.stack([data[i][0] for i in range(len(data))])                    # (N, 3, 32, 32)
    labels = torch.tensor([label for _, label in val])
    with torch.inference_mode():
        preds = forward_logits(bb, images, table, torch.zeros(len(val), dtype=torch.long)).argmax(1)
    return float((preds == labels).float().mean()), len(val)


@pytest.mark.parametrize("method", ["linear", "vpt-shallow", "vpt-deep"])
def test_digits_learn_well_above_chance(method: str, feature_backbone: Backbone, digits_zip: Path,
                                        tmp_path: Path) -> None:
    """10 classes x 30 real images (27 train, 3 val each); chance is 0.1."""
    options = TrainOptions(method=method, num_prompts=10, epochs=30, batch_size=16, base_lr=4.0, weight_decay=0.0,
                           augmentation="none", seed=0)
    result = train_task_from_archive(digits_zip, tmp_path / "work", feature_backbone, options)
    m = result.metrics
    losses = [e["train_loss"] for e in m["epochs"]]
    accs = [e["val_accuracy"] for e in m["epochs"]]
    log.info("digits %s: val acc %.3f (best epoch %d), train loss %.3f -> %.3f", method, m["val_accuracy"],
                m["best_epoch"], losses[0], losses[-1])
    assert losses[-1] < losses[0] / 2
    assert m["val_accuracy"] >= 0.3
    assert m["val_accuracy"] == max(accs) == accs[m["best_epoch"] - 1]
    # the served forward (packed bank tensors) and training's differ by float rounding only, so an image
    # on the decision boundary may go either way: the two agree within one image
    served, n_val = server_path_accuracy(feature_backbone, result.task_file, digits_zip, tmp_path / "again")
    assert abs(served - m["val_accuracy"]) <= 1 / n_val + 1e-9
    assert not (tmp_path / "work" / "dataset").exists()


def test_task_file_metadata_records_the_run(tiny_backbone: Backbone, digits_small_zip: Path, tmp_path: Path) -> None:
    options = TrainOptions(method="vpt-deep", num_prompts=3, epochs=2, batch_size=4, augmentation="none",
                           val_fraction=0.25)
    events: list[ProgressEvent] = []
    result = train_task_from_archive(digits_small_zip, tmp_path, tiny_backbone, options, on_progress=events.append,
                                     extra={"task": "digits"})
    task = load_task_file(result.task_file, tiny_backbone)
    meta = {k: json.loads(v) for k, v in task.metadata.items() if k in ("metrics", "training", "dataset")}
    assert task.metadata["task"] == "digits" and task.spec.classes == ("0", "1", "2")
    assert task.spec.method == "vpt-deep" and task.spec.num_prompts == 3 and task.spec.prompt_dropout == 0.1
    m = meta["metrics"]
    assert [e["epoch"] for e in m["epochs"]] == [1, 2] and m["best_epoch"] in (1, 2)
    assert m["num_val"] == 6 and sum(m["support"].values()) == 6  # 8 per class: 2 val, 6 train
    cm = m["confusion_matrix"]
    assert len(cm) == 3 and all(len(r) == 3 for r in cm) and sum(map(sum, cm)) == 6
    assert m["val_accuracy"] == pytest.approx(sum(cm[i][i] for i in range(3)) / 6)
    assert set(m["per_class_accuracy"]) == {"0", "1", "2"}
    assert m["trainable_parameters"] == {"prompts": 4 * 3 * 64, "head": 3 * 64 + 3, "total": 4 * 3 * 64 + 195}
    assert m["steps"] == 2 * 5 and m["train_time_s"] > 0 and m["sweep"] is None
    assert TrainOptions.from_dict(meta["training"]["options"]) == options
    assert meta["training"]["lr"] == options.lr and meta["training"]["warmup_epochs"] == 0
    assert meta["dataset"]["num_classes"] == 3 and meta["dataset"]["split"] == {
        "source": "stratified", "train": 18, "val": 6}
    assert events[-1].kind == "epoch" and events[-1].fraction == 1.0
    assert list(tmp_path.iterdir()) == []  # the extracted images are gone


def test_the_archives_own_val_split_is_used(tiny_backbone: Backbone, tmp_path: Path) -> None:
    archive = make_digits_zip(tmp_path / "split.zip", classes=range(3), per_class=6, layout="split")
    options = TrainOptions(method="linear", epochs=1, batch_size=8, augmentation="none", val_fraction=0.5)
    result = train_task_from_archive(archive, tmp_path / "work", tiny_backbone, options)
    assert result.metadata["dataset"]["split"] == {"source": "dataset", "train": 15, "val": 3}


def test_sweep_through_the_pipeline_records_the_grid(tiny_backbone: Backbone, digits_small_zip: Path,
                                                     tmp_path: Path) -> None:
    options = TrainOptions(method="vpt-shallow", num_prompts=2, epochs=1, batch_size=8, augmentation="none",
                           sweep="small", val_fraction=0.25)
    events: list[ProgressEvent] = []
    result = train_task_from_archive(digits_small_zip, tmp_path, tiny_backbone, options, on_progress=events.append)
    sweep = result.metrics["sweep"]
    assert sweep["preset"] == "small" and len(sweep["runs"]) == len(sweep["grid"]) == 6
    best = max(r["val_accuracy"] for r in sweep["runs"])
    assert sweep["winner"]["val_accuracy"] == best == result.metrics["val_accuracy"]
    winner_opts = result.metadata["training"]["options"]
    assert (winner_opts["base_lr"], winner_opts["weight_decay"]) == (sweep["winner"]["base_lr"],
                                                                     sweep["winner"]["weight_decay"])
    assert {e.run for e in events} == set(range(1, 7)) and events[-1].fraction == 1.0


@pytest.mark.parametrize("failure", ["corrupt_archive", "cancel_during_training"])
def test_failure_keeps_nothing(failure: str, tiny_backbone: Backbone, digits_small_zip: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    options = TrainOptions(method="vpt-deep", num_prompts=2, epochs=3, batch_size=4, augmentation="none")
    if failure == "corrupt_archive":
        bad = tmp_path / "bad.zip"
        bad.write_bytes(digits_small_zip.read_bytes()[:200])
        with pytest.raises(DatasetError) as info:
            train_task_from_archive(bad, work, tiny_backbone, options)
        assert info.value.code == "dataset_archive_invalid"
    else:
        seen: list[ProgressEvent] = []
        with pytest.raises(TrainingCancelled):
            train_task_from_archive(digits_small_zip, work, tiny_backbone, options, on_progress=seen.append,
                                    should_cancel=lambda: len(seen) >= 3)
        assert len(seen) == 3
    assert list(work.iterdir()) == []
