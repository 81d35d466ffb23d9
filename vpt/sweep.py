"""A grid search over base learning rate x weight decay, scored on validation accuracy.

`paper` is the official prompt grid (9 base lrs x 4 weight decays, 36 runs).
`small` keeps 3 x 2 = 6 runs around the values the official demo settled on for VPT-deep on a
ViT-B/16 (base lr 1.0 with wd 1e-3 for dmlab and eurosat, 25 with 1e-4 for sun397): base lr
{1, 5, 25} spaces the middle of the paper's range by factors of 5, and prompts (unlike a linear
probe) need these large rates; wd {1e-3, 1e-4} are the two decays those runs used.

Every run starts from the same seed (same initialisation, same batch order), so runs differ only
in lr and wd. A run scores its kept epoch's validation accuracy; the highest score wins, ties go
to the smaller lr (as the official `find_best_lrwd`) and then to the smaller wd. The winner's
parameters are kept as they are; nothing is retrained.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from torch.utils.data import Dataset

from vpt.backbone import Backbone
from vpt.runs import need_validation, train_runs
from vpt.train import (
    CancelFn,
    Progress,
    ProgressFn,
    StepGate,
    TrainingDiverged,
    TrainOptions,
    TrainOptionsError,
    TrainOutcome,
    total_steps,
)

log = logging.getLogger(__name__)

PAPER_LRS = (50.0, 25.0, 10.0, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1)
PAPER_WDS = (0.01, 0.001, 0.0001, 0.0)
GRIDS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "paper": (PAPER_LRS, PAPER_WDS),
    "small": ((25.0, 5.0, 1.0), (0.001, 0.0001)),
}


def sweep_grid(name: str) -> list[tuple[float, float]]:
    """(base_lr, weight_decay) pairs of a preset, in run order (lr descending, then wd)."""
    if name not in GRIDS:
        raise TrainOptionsError(f"sweep: unknown preset {name!r}; choose from {sorted(GRIDS)}", field="sweep")
    lrs, wds = GRIDS[name]
    return [(lr, wd) for lr in lrs for wd in wds]


@dataclass(frozen=True)
class SweepRun:
    base_lr: float
    weight_decay: float
    score: float                    # validation accuracy at the run's kept epoch; 0 if it diverged
    best_epoch: int | None
    final_train_loss: float | None
    seconds: float
    diverged: bool = False

    def to_dict(self) -> dict[str, float | int | bool | None]:
        return {"base_lr": self.base_lr, "weight_decay": self.weight_decay, "val_accuracy": self.score,
                "best_epoch": self.best_epoch, "final_train_loss": self.final_train_loss,
                "seconds": round(self.seconds, 3), "diverged": self.diverged}


@dataclass
class SweepResult:
    winner: TrainOutcome
    runs: list[SweepRun]
    preset: str
    grid: list[tuple[float, float]]

    def to_dict(self) -> dict[str, object]:
        return {"preset": self.preset, "grid": [list(p) for p in self.grid],
                "runs": [r.to_dict() for r in self.runs],
                "winner": {"base_lr": self.winner.options.base_lr,
                           "weight_decay": self.winner.options.weight_decay,
                           "val_accuracy": self.winner.best_val_acc}}


def _better(a: SweepRun, b: SweepRun | None) -> bool:
    """Is run `a` better than the best so far `b`? Higher score, then smaller lr, then smaller wd."""
    if b is None:
        return True
    return (-a.score, a.base_lr, a.weight_decay) < (-b.score, b.base_lr, b.weight_decay)


def run_sweep(backbone: Backbone, classes: Sequence[str], train_set: Dataset, val_set: Dataset | None,
              options: TrainOptions, on_progress: ProgressFn | None = None,
              should_cancel: CancelFn | None = None, grid: Sequence[tuple[float, float]] | None = None,
              step_gate: StepGate | None = None) -> SweepResult:
    """Train one run per (base_lr, weight_decay) of `options.sweep` (or `grid`); keep the best."""
    need_validation(val_set, "sweep: scoring runs", "sweep")
    pairs = list(grid) if grid is not None else sweep_grid(options.sweep)
    progress = Progress(len(pairs), total_steps(len(train_set), options), on_progress)
    runs: list[SweepRun] = []
    best_run: SweepRun | None = None
    winner: TrainOutcome | None = None
    trials = [options.replace(base_lr=lr, weight_decay=wd) for lr, wd in pairs]
    for trial in train_runs(backbone, classes, train_set, val_set, trials, progress, should_cancel, step_gate):
        lr, wd, i, outcome = trial.options.base_lr, trial.options.weight_decay, trial.index, trial.outcome
        if outcome is None:  # a too-large lr is a result of the search, not a failure of it
            log.info("sweep run %d/%d: base_lr %g, wd %g diverged: %s", i, len(pairs), lr, wd,
                     trial.diverged.message if trial.diverged else "")
            runs.append(SweepRun(lr, wd, 0.0, None, None, trial.seconds, diverged=True))
            continue
        run = SweepRun(lr, wd, float(outcome.best_val_acc or 0.0), outcome.best_epoch,
                       outcome.history[-1].train_loss, outcome.seconds)
        runs.append(run)
        log.info("sweep run %d/%d: base_lr %g, wd %g -> val acc %.4f", i, len(pairs), lr, wd, run.score)
        if _better(run, best_run):
            best_run, winner = run, outcome
    if winner is None:
        raise TrainingDiverged(f"every run of the {len(pairs)}-run sweep diverged; try smaller learning rates")
    return SweepResult(winner=winner, runs=runs, preset=options.sweep if grid is None else "custom", grid=pairs)
