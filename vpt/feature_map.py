"""The feature map of a trained task: 2-D t-SNE of final CLS features, frozen backbone vs the task.

As in the VPT paper's Fig. 9: the validation images' CLS features after the final norm, once for
the frozen backbone alone (what a linear probe sees) and once through the trained task's prompts
(and tuned weights), each embedded in 2-D with t-SNE. The silhouette score of each feature set
(euclidean, on the features, not on the embedding) tells how well the classes separate.

The result is bounded: at most `max_points` images (a seeded random subset), coordinates scaled
to [-1, 1] and rounded, so it fits in a task file's metadata.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

from vpt.backbone import Backbone
from vpt.batches import collate_images, device_batch
from vpt.engine import forward_features, training_table
from vpt.task import TaskParams, TaskSpec
from vpt.train import CancelFn, TrainingCancelled, check_cancel

log = logging.getLogger(__name__)

MAX_POINTS = 2000   # t-SNE is O(n log n) per iteration; a few thousand points take seconds on a CPU
MIN_POINTS = 5      # t-SNE needs perplexity < n; below this the picture says nothing
ROUND = 3           # decimals kept of each scaled coordinate


def _subset(data: Dataset, max_points: int, seed: int) -> Dataset:
    n = len(data)  # type: ignore[arg-type]
    if n <= max_points:
        return data
    keep = np.sort(np.random.RandomState(seed).choice(n, size=max_points, replace=False))
    return Subset(data, keep.tolist())


def cls_features(backbone: Backbone, params: TaskParams, data: Dataset, batch_size: int = 64,
                 should_cancel: CancelFn | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Linear (frozen backbone) features (N, d), task features (N, d) and labels (N,), on the CPU."""
    dev = backbone.device
    linear = TaskParams.new(TaskSpec("linear", 0, params.spec.classes), backbone)  # no prompts: the frozen backbone
    lin_feats, task_feats, labels = [], [], []
    loader = DataLoader(data, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate_images)
    with torch.inference_mode():
        lin_table, _ = training_table(backbone, linear, 1, dropout=0.0, training=False)
        task_table, _ = training_table(backbone, params, 1, dropout=0.0, training=False)
        for images, y in loader:
            check_cancel(should_cancel)
            images = device_batch(images, dev, backbone.dtype, None, backbone.data_config)  # (B, 3, H, W)
            slot = torch.zeros(images.shape[0], dtype=torch.long, device=dev)          # (B,)
            lin_feats.append(forward_features(backbone, images, lin_table, slot).float().cpu())   # (B, d)
            task_feats.append(forward_features(backbone, images, task_table, slot).float().cpu())  # (B, d)
            labels.append(torch.as_tensor(y).long().cpu())                             # (B,)
    return torch.cat(lin_feats), torch.cat(task_feats), torch.cat(labels)


def embed(features: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, Any]:
    """t-SNE of (N, d) features to (N, 2), scaled to [-1, 1], and the features' silhouette score."""
    from sklearn.manifold import TSNE
    from sklearn.metrics import silhouette_score

    n = features.shape[0]
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3)))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", learning_rate="auto",
              random_state=seed).fit_transform(features.astype(np.float64))          # (N, 2)
    xy = xy - xy.mean(axis=0)
    scale = float(np.abs(xy).max()) or 1.0
    xy = np.round(xy / scale, ROUND)
    k = len(np.unique(labels))
    silhouette = float(silhouette_score(features, labels)) if 2 <= k <= n - 1 else None
    return {"xy": xy.tolist(), "silhouette": None if silhouette is None else round(silhouette, 4)}


def feature_map(backbone: Backbone, params: TaskParams, data: Dataset, classes: Sequence[str],
                max_points: int = MAX_POINTS, seed: int = 0, batch_size: int = 64,
                should_cancel: CancelFn | None = None) -> dict[str, Any] | None:
    """The `feature_map` metrics entry for `params` over labelled `data`, or None with too few images.

    `{"method": "tsne", "classes": [...], "labels": [i, ...], "linear": {"xy", "silhouette"},
    "task": {"xy", "silhouette"}}`; `xy[i]` is image i's point, `labels[i]` its class index.
    """
    data = _subset(data, max_points, seed)
    if len(data) < MIN_POINTS:  # type: ignore[arg-type]
        return None
    lin, task, labels = cls_features(backbone, params, data, batch_size, should_cancel)
    y = labels.numpy()
    return {"method": "tsne", "classes": list(classes), "labels": y.tolist(),
            "linear": embed(lin.numpy(), y, seed), "task": embed(task.numpy(), y, seed)}


def safe_feature_map(*args: Any, **kwargs: Any) -> dict[str, Any] | None:
    """`feature_map`, or None (logged) when it cannot be made: a picture never fails a training job.
    Cancellation still propagates."""
    try:
        return feature_map(*args, **kwargs)
    except TrainingCancelled:
        raise
    except (ImportError, ValueError, RuntimeError) as e:
        log.warning("feature map skipped: %s", e)
        return None
