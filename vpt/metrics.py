"""Classification metrics: accuracy, per-class accuracy and the confusion matrix."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

# A confusion matrix has C^2 entries; past this many classes it stays out of task-file metadata.
MAX_CONFUSION_CLASSES = 100


def confusion_matrix(preds: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, C) int64 counts: row = true class, column = predicted class."""
    if preds.shape != labels.shape or preds.dim() != 1:
        raise ValueError(f"preds {tuple(preds.shape)} and labels {tuple(labels.shape)} must be equal 1-d shapes")
    idx = labels.long().cpu() * num_classes + preds.long().cpu()                  # (N,)
    return torch.bincount(idx, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def accuracy(preds: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy in [0, 1]; 0.0 for an empty set."""
    n = labels.numel()
    return float((preds.cpu() == labels.cpu()).sum()) / n if n else 0.0


def per_class_accuracy(confusion: Tensor) -> list[float | None]:
    """Recall of each class (its diagonal over its row); None for a class with no samples."""
    support = confusion.sum(dim=1)
    correct = confusion.diagonal()
    return [float(c) / float(s) if s else None for c, s in zip(correct.tolist(), support.tolist())]


@dataclass(frozen=True)
class ClassificationReport:
    """What an evaluation over a labelled set found."""

    accuracy: float
    num_samples: int
    classes: tuple[str, ...]
    per_class: tuple[float | None, ...]
    support: tuple[int, ...]
    confusion: tuple[tuple[int, ...], ...]

    @classmethod
    def from_predictions(cls, preds: Tensor, labels: Tensor, classes: Sequence[str]) -> ClassificationReport:
        cm = confusion_matrix(preds, labels, len(classes))                        # (C, C)
        return cls(
            accuracy=accuracy(preds, labels), num_samples=int(labels.numel()), classes=tuple(classes),
            per_class=tuple(per_class_accuracy(cm)), support=tuple(int(s) for s in cm.sum(dim=1).tolist()),
            confusion=tuple(tuple(int(v) for v in row) for row in cm.tolist()),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable; the confusion matrix only up to MAX_CONFUSION_CLASSES classes."""
        out: dict[str, Any] = {
            "accuracy": self.accuracy, "num_samples": self.num_samples,
            "per_class_accuracy": {c: a for c, a in zip(self.classes, self.per_class)},
            "support": {c: s for c, s in zip(self.classes, self.support)},
        }
        if len(self.classes) <= MAX_CONFUSION_CLASSES:
            out["confusion_matrix"] = [list(row) for row in self.confusion]
        return out
