"""`method=auto`: train every candidate method with the same budget, keep the best on validation.

Each candidate runs the same options (epochs, batch size, lr, seed, so the same batch order)
with only its method changed; the score is the candidate's kept epoch's validation accuracy.
Ties go to the cheaper candidate (fewer trainable parameters), then to the earlier one in the list.
The leaderboard (method, val accuracy, trainable parameters, train time) goes into the version's
metrics and every progress event; a "candidate" event follows each candidate, so the job's last
progress record holds the whole leaderboard. A candidate the backbone cannot take (an adapter
reduction that does not divide its width, say) is not trained: its row says why (`skipped`), so one
unfit default never fails the whole job; with no candidate left the job fails on `auto_methods`.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch.utils.data import Dataset

from vpt.backbone import Backbone
from vpt.errors import TaskSpecError, TrainOptionsError
from vpt.runs import need_validation, train_runs
from vpt.train import (
    CancelFn,
    Progress,
    ProgressFn,
    StepGate,
    TrainingDiverged,
    TrainOptions,
    TrainOutcome,
    total_steps,
)

log = logging.getLogger(__name__)


@dataclass
class AutoResult:
    winner: TrainOutcome
    leaderboard: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        return {"candidates": [row["method"] for row in self.leaderboard], "leaderboard": self.leaderboard,
                "winner": self.winner.params.spec.method}


def run_auto(backbone: Backbone, classes: Sequence[str], train_set: Dataset, val_set: Dataset | None,
             options: TrainOptions, on_progress: ProgressFn | None = None,
             should_cancel: CancelFn | None = None, step_gate: StepGate | None = None) -> AutoResult:
    """Train each of `options.auto_methods`; the best validation accuracy wins."""
    need_validation(val_set, "method auto: picking a method", "method")
    candidates, skipped = fitting_candidates(backbone, classes, options)
    if not candidates:
        reasons = "; ".join(f"{row['method']}: {row['skipped']}" for row in skipped)
        raise TrainOptionsError(f"no candidate of method auto fits this backbone ({reasons})", field="auto_methods")
    progress = Progress(len(candidates), total_steps(len(train_set), options), on_progress)
    progress.leaderboard = list(skipped)

    def before(_: int, run_options: TrainOptions) -> None:
        progress.method = run_options.method

    best: tuple[tuple[float, int, int], TrainOutcome] | None = None
    runs = [options.replace(method=method) for method in candidates]
    for run in train_runs(backbone, classes, train_set, val_set, runs, progress, should_cancel, step_gate, before):
        method, outcome = run.options.method, run.outcome
        if outcome is None:
            log.info("auto: %s diverged: %s", method, run.diverged.message if run.diverged else "")
            progress.leaderboard.append({"method": method, "val_accuracy": None, "trainable_parameters": None,
                                         "train_time_s": None, "diverged": True})
            _candidate_done(progress, None)
            continue
        params = outcome.params.num_trainable()["total"]
        acc = float(outcome.best_val_acc or 0.0)
        progress.leaderboard.append({"method": method, "val_accuracy": acc, "trainable_parameters": params,
                                     "train_time_s": round(outcome.seconds, 3), "diverged": False})
        _candidate_done(progress, acc)
        log.info("auto %d/%d: %s -> val acc %.4f (%d trainable)", run.index, len(candidates), method, acc, params)
        key = (-acc, params, run.index)
        if best is None or key < best[0]:
            best = (key, outcome)
    if best is None:
        raise TrainingDiverged(f"every candidate of method auto diverged ({candidates}); try a smaller learning rate")
    return AutoResult(winner=best[1], leaderboard=progress.leaderboard)


def fitting_candidates(backbone: Backbone, classes: Sequence[str], options: TrainOptions
                       ) -> tuple[list[str], list[dict[str, Any]]]:
    """The candidates (in order, once each) the backbone can take, and a leaderboard row for each other."""
    fit, skipped = [], []
    for method in dict.fromkeys(options.auto_methods):
        try:
            options.replace(method=method).spec(classes).check(backbone)
        except TaskSpecError as e:
            log.info("auto: %s skipped: %s", method, e)
            skipped.append({"method": method, "val_accuracy": None, "trainable_parameters": None,
                            "train_time_s": None, "diverged": False, "skipped": str(e)})
        else:
            fit.append(method)
    return fit, skipped


def _candidate_done(progress: Progress, val_acc: float | None) -> None:
    """A "candidate" event: the run counted as complete, the leaderboard holding its row."""
    if progress.last is not None:  # a candidate that diverged on its very first step has nothing to report
        progress.emit(**{**progress.last, "kind": "candidate", "step": progress.steps_per_run, "val_acc": val_acc})
