"""The lr x weight-decay sweep: presets, choice of the winner, bookkeeping, failures."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.digits import digit_images
from vpt.backbone import Backbone
from vpt.pipeline import evaluate
from vpt.sweep import GRIDS, SweepRun, _better, run_sweep, sweep_grid
from vpt.train import ProgressEvent, TrainingCancelled, TrainingDiverged, TrainOptions, TrainOptionsError
from vpt.transforms import eval_transform

CLASSES = ("0", "1", "2")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tiny_backbone: Backbone) -> tuple[list, list]:
    tf = eval_transform(tiny_backbone.data_config)
    train = [(tf(im), y) for y, im in digit_images(range(3), per_class=8)]
    val = [(tf(im), y) for y, im in digit_images(range(3), per_class=4, skip=8)]
    return train, val


def options(**kw) -> TrainOptions:
    base = {"method": "vpt-deep", "num_prompts": 2, "epochs": 2, "batch_size": 8, "augmentation": "none"}
    return TrainOptions(**{**base, **kw})


def test_presets() -> None:
    paper = sweep_grid("paper")
    assert len(paper) == 36 == len(set(paper))
    assert {lr for lr, _ in paper} == {50, 25, 10, 5.0, 2.5, 1.0, 0.5, 0.25, 0.1}  # the paper's grid
    assert {wd for _, wd in paper} == {0.01, 0.001, 0.0001, 0.0}
    assert sorted(sweep_grid("small")) == sorted((lr, wd) for lr in (1.0, 5.0, 25.0) for wd in (1e-3, 1e-4))
    assert set(GRIDS) == {"paper", "small"}
    with pytest.raises(TrainOptionsError):
        sweep_grid("none")


def test_ties_go_to_the_smaller_lr_then_the_smaller_wd() -> None:
    def run(lr: float, wd: float, score: float) -> SweepRun:
        return SweepRun(lr, wd, score, 1, 0.5, 1.0)

    assert _better(run(5.0, 0.0, 0.8), None)
    assert _better(run(5.0, 0.0, 0.9), run(1.0, 0.0, 0.8))
    assert _better(run(1.0, 0.0, 0.8), run(5.0, 0.0, 0.8))
    assert not _better(run(5.0, 0.0, 0.8), run(1.0, 0.0, 0.8))
    assert _better(run(1.0, 1e-4, 0.8), run(1.0, 1e-3, 0.8))


def test_sweep_keeps_the_best_run_and_records_every_run(tiny_backbone: Backbone, data: tuple[list, list]) -> None:
    train, val = data
    grid = [(0.5, 1e-3), (8.0, 0.0), (2.0, 1e-4)]
    events: list[ProgressEvent] = []
    result = run_sweep(tiny_backbone, CLASSES, train, val, options(), on_progress=events.append, grid=grid)
    assert [(r.base_lr, r.weight_decay) for r in result.runs] == grid
    best = max(r.score for r in result.runs)
    tied = [r for r in result.runs if r.score == best]
    chosen = min(tied, key=lambda r: (r.base_lr, r.weight_decay))
    assert (result.winner.options.base_lr, result.winner.options.weight_decay) == (chosen.base_lr,
                                                                                   chosen.weight_decay)
    assert result.winner.best_val_acc == best
    # the winner's parameters are the ones that scored `best`, not the last run's
    report = evaluate(tiny_backbone, result.winner.params, val, CLASSES, result.winner.options)
    assert report.accuracy == pytest.approx(best)
    record = result.to_dict()
    assert record["grid"] == [list(p) for p in grid] and len(record["runs"]) == 3
    assert record["winner"]["base_lr"] == chosen.base_lr
    assert [e.run for e in events if e.kind == "epoch"] == [1, 1, 2, 2, 3, 3]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert {(e.base_lr, e.weight_decay) for e in events} == set(grid)


def test_sweep_needs_validation_images(tiny_backbone: Backbone, data: tuple[list, list]) -> None:
    with pytest.raises(TrainOptionsError, match="validation"):
        run_sweep(tiny_backbone, CLASSES, data[0], None, options(sweep="small"))


def test_a_sweep_where_every_run_diverges_fails(tiny_backbone: Backbone, data: tuple[list, list]) -> None:
    train, val = data
    bad = [(torch.full_like(x, float("inf")), y) for x, y in train]
    with pytest.raises(TrainingDiverged, match="every run"):
        run_sweep(tiny_backbone, CLASSES, bad, val, options(epochs=1), grid=[(1.0, 0.0), (5.0, 0.0)])


def test_cancel_stops_the_whole_sweep(tiny_backbone: Backbone, data: tuple[list, list]) -> None:
    train, val = data
    seen: list[ProgressEvent] = []
    with pytest.raises(TrainingCancelled):
        run_sweep(tiny_backbone, CLASSES, train, val, options(), on_progress=seen.append,
                  should_cancel=lambda: any(e.run == 2 for e in seen), grid=[(1.0, 0.0), (5.0, 0.0), (9.0, 0.0)])
    assert max(e.run for e in seen) == 2 and sum(e.run == 2 for e in seen) == 1
