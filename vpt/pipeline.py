"""From an uploaded archive to a task file: ingest, split, train (or sweep), evaluate, serialise.

`train_task_from_archive` is the one call a training worker makes. It returns the task file as
bytes and writes nothing else that outlives it: the extracted images are removed on success,
failure and cancellation alike, and no partial task is ever produced.
"""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vpt.auto import run_auto
from vpt.backbone import Backbone
from vpt.data import ImageDataset, IngestedDataset, IngestLimits, Sample, ingest_archive, split_dataset
from vpt.feature_map import safe_feature_map
from vpt.metrics import ClassificationReport
from vpt.preprocess import to_uint8_hwc
from vpt.sweep import run_sweep
from vpt.task import TaskParams, TaskSpec, save_task_file
from vpt.train import (
    LR_REFERENCE_BATCH,
    MOMENTUM,
    CancelFn,
    ProgressFn,
    StepGate,
    TrainOptions,
    TrainOutcome,
    amp_enabled,
    check_cancel,
    make_loader,
    predict,
    train_task,
)

log = logging.getLogger(__name__)

DATA_DIR = "dataset"  # under work_dir; removed when the call returns


@dataclass(frozen=True)
class TrainResult:
    """A trained task: its file (bytes), its spec, and the facts stored in the file's metadata."""

    task_file: bytes
    spec: TaskSpec
    metrics: dict[str, Any]
    metadata: dict[str, Any]

    @property
    def val_accuracy(self) -> float | None:
        return self.metrics["val_accuracy"]


def train_task_from_archive(archive_path: str | Path, work_dir: str | Path, backbone: Backbone,
                            options: TrainOptions, limits: IngestLimits | None = None,
                            on_progress: ProgressFn | None = None,
                            should_cancel: CancelFn | None = None,
                            extra: dict[str, Any] | None = None, step_gate: StepGate | None = None) -> TrainResult:
    """Ingest `archive_path` under `work_dir`, train a task as `options` say, return its file.

    `extra` adds metadata entries to the file. Raises DatasetError (bad archive),
    TrainOptionsError, TrainingCancelled, TrainingDiverged, TrainingError.
    """
    data_dir = Path(work_dir) / DATA_DIR
    try:
        check_cancel(should_cancel)
        dataset = ingest_archive(Path(archive_path), data_dir, limits, workers=max(1, options.num_workers))
        check_cancel(should_cancel)
        return train_task_from_dataset(dataset, backbone, options, on_progress, should_cancel, extra, step_gate)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def split_summary(dataset: IngestedDataset, train: Sequence[Sample], val: Sequence[Sample]) -> dict[str, Any]:
    return {**dataset.summary(), "split": {
        "source": "dataset" if dataset.val else "stratified", "train": len(train), "val": len(val)}}


def train_task_from_dataset(dataset: IngestedDataset, backbone: Backbone, options: TrainOptions,
                            on_progress: ProgressFn | None = None,
                            should_cancel: CancelFn | None = None,
                            extra: dict[str, Any] | None = None, step_gate: StepGate | None = None) -> TrainResult:
    """Train on an ingested dataset: its own val split, else a stratified `val_fraction` split."""
    train, val = split_dataset(dataset, options.val_fraction, options.seed)
    # uint8 images: training preprocesses (and augments) them on the device as the engine does (vpt.batches)
    train_set = ImageDataset(train, to_uint8_hwc)
    val_set = ImageDataset(val, to_uint8_hwc) if val else None
    started = time.perf_counter()
    sweep = auto = None
    if options.method == "auto":
        auto = run_auto(backbone, dataset.classes, train_set, val_set, options, on_progress, should_cancel,
                        step_gate=step_gate)
        outcome = auto.winner
    elif options.sweep != "none":
        sweep = run_sweep(backbone, dataset.classes, train_set, val_set, options, on_progress, should_cancel,
                          step_gate=step_gate)
        outcome = sweep.winner
    else:
        outcome = train_task(backbone, dataset.classes, train_set, val_set, options, on_progress, should_cancel,
                             step_gate=step_gate)
    report = None
    if val_set is not None:
        report = evaluate(backbone, outcome.params, val_set, dataset.classes, outcome.options, should_cancel)
    metrics = training_metrics(outcome, report, time.perf_counter() - started)
    metrics["sweep"] = sweep.to_dict() if sweep is not None else None
    metrics["auto"] = auto.to_dict() if auto is not None else None
    if val_set is not None:
        metrics["feature_map"] = safe_feature_map(backbone, outcome.params, val_set, dataset.classes,
                                                  seed=options.seed, should_cancel=should_cancel)
    metadata = {"metrics": metrics, "training": recipe(outcome.options, backbone),
                "dataset": split_summary(dataset, train, val), **(extra or {})}
    check_cancel(should_cancel)
    blob = save_task_file(outcome.params, backbone, extra=metadata)
    log.info("trained %s task on %d images: val acc %s, best epoch %d", outcome.params.spec.method, len(train),
             metrics["val_accuracy"], outcome.best_epoch)
    return TrainResult(task_file=blob, spec=outcome.params.spec, metrics=metrics, metadata=metadata)


def evaluate(backbone: Backbone, params: TaskParams, data: ImageDataset, classes: Sequence[str],
             options: TrainOptions | None = None, should_cancel: CancelFn | None = None,
             batch_size: int | None = None) -> ClassificationReport:
    """Accuracy, per-class accuracy and confusion of `params` over `data` (uint8 images: the serving
    preprocessing; tensors: taken as they are).

    Batches hold `batch_size` images; None means max(options.batch_size, 64).
    """
    options = options or TrainOptions(num_workers=0)
    if batch_size is None:
        batch_size = max(options.batch_size, 64)
    loader = make_loader(data, batch_size, False, None, options, backbone.device)
    _, preds, labels = predict(backbone, params, loader, amp_enabled(options, backbone.device), should_cancel)
    return ClassificationReport.from_predictions(preds, labels, classes)


def training_metrics(outcome: TrainOutcome, report: ClassificationReport | None, seconds: float) -> dict[str, Any]:
    """The `metrics` metadata entry of a task file."""
    out: dict[str, Any] = {
        "val_accuracy": report.accuracy if report is not None else None,
        "best_epoch": outcome.best_epoch,
        "best_val_accuracy": outcome.best_val_acc,
        "epochs": [{"epoch": h.epoch, "train_loss": h.train_loss, "val_accuracy": h.val_acc,
                    "val_loss": h.val_loss, "lr": h.lr, "seconds": round(h.seconds, 3)} for h in outcome.history],
        "trainable_parameters": outcome.params.num_trainable(),
        "steps": outcome.steps,
        "train_time_s": round(seconds, 3),
        "images_per_s": round(outcome.images_per_s, 2),
    }
    if report is not None:
        out.update({k: v for k, v in report.to_dict().items() if k != "accuracy"})
        out["num_val"] = out.pop("num_samples")
    return out


def recipe(options: TrainOptions, backbone: Backbone) -> dict[str, Any]:
    """The `training` metadata entry: the options as given plus what they resolved to."""
    device = backbone.device
    return {
        "options": options.to_dict(),
        "lr": options.lr, "lr_scaling": f"base_lr * batch_size / {LR_REFERENCE_BATCH}",
        "warmup_epochs": options.resolved_warmup_epochs, "prompt_dropout": options.resolved_prompt_dropout,
        "optimizer": {"name": "sgd", "momentum": MOMENTUM, "head_bias_weight_decay": 0.0},
        "schedule": "linear warmup then cosine, per iteration",
        "loss": "cross_entropy", "kept": options.keep,
        "mixed_precision": "bf16" if amp_enabled(options, device) else "off",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
    }
