"""Several training runs in one job (a sweep's grid, `method=auto`'s candidates).

The runs share one `Progress` (so `fraction` and the ETA cover the whole job) and the same data;
a run whose loss diverges is a result of the search, not a failure of it.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from vpt.backbone import Backbone
from vpt.train import (
    CancelFn,
    Progress,
    StepGate,
    TrainingDiverged,
    TrainOptions,
    TrainOptionsError,
    TrainOutcome,
    train_task,
)


@dataclass(frozen=True)
class RunResult:
    index: int                          # 1-based
    options: TrainOptions
    outcome: TrainOutcome | None        # None: the run diverged
    diverged: TrainingDiverged | None
    seconds: float


def need_validation(val_set: Dataset | None, what: str, field: str) -> None:
    """Scoring runs needs validation images: a TrainOptionsError naming `field` without them."""
    if not val_set:
        raise TrainOptionsError(f"{what} needs validation images; set val_fraction > 0 or give the dataset a "
                                "val split", field=field)


def train_runs(backbone: Backbone, classes: Sequence[str], train_set: Dataset, val_set: Dataset | None,
               runs: Sequence[TrainOptions], progress: Progress, should_cancel: CancelFn | None = None,
               step_gate: StepGate | None = None,
               before: Callable[[int, TrainOptions], None] | None = None) -> Iterator[RunResult]:
    """Train each of `runs` in turn (`before(i, options)` first), yielding each result as it ends."""
    for i, options in enumerate(runs, start=1):
        progress.run = i
        if before is not None:
            before(i, options)
        started = time.perf_counter()
        try:
            outcome = train_task(backbone, classes, train_set, val_set, options, should_cancel=should_cancel,
                                 progress=progress, step_gate=step_gate)
        except TrainingDiverged as e:
            yield RunResult(i, options, None, e, time.perf_counter() - started)
            continue
        yield RunResult(i, options, outcome, None, time.perf_counter() - started)
