"""The training recipe and loop on the tiny ViT: options, schedule, optimizer, seeds, events, cancel."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset

from tests.fixtures.digits import digit_images
from vpt.backbone import Backbone
from vpt.errors import VPTError
from vpt.task import TaskParams, load_task_file, save_task_file
from vpt.train import (
    ProgressEvent,
    TrainingCancelled,
    TrainingDiverged,
    TrainOptions,
    TrainOptionsError,
    lr_multiplier,
    make_loader,
    make_optimizer,
    predict,
    train_task,
)
from vpt.transforms import eval_transform, train_transform

CLASSES = ("0", "1", "2")


pytestmark = pytest.mark.usefixtures("one_thread")


class PilSet(Dataset):
    def __init__(self, items: list[tuple[int, Image.Image]], transform) -> None:
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label, image = self.items[i]
        return self.transform(image), label


def sets(bb: Backbone, augment: str = "none") -> tuple[PilSet, PilSet]:
    train = digit_images(range(3), per_class=8)
    val = digit_images(range(3), per_class=3, skip=8)
    return PilSet(train, train_transform(bb.data_config, augment)), PilSet(val, eval_transform(bb.data_config))


def opts(**kw) -> TrainOptions:
    base = {"method": "vpt-deep", "num_prompts": 4, "epochs": 3, "batch_size": 8, "base_lr": 2.0,
            "weight_decay": 1e-3, "augmentation": "none"}
    return TrainOptions(**{**base, **kw})


# ---- options -------------------------------------------------------------------------------------

def test_options_defaults_resolve_like_the_paper() -> None:
    o = TrainOptions()
    assert (o.method, o.num_prompts, o.val_fraction, o.sweep, o.mixed_precision) == ("vpt-deep", 10, 0.1, "none", "auto")
    assert o.resolved_prompt_dropout == 0.1 and o.resolved_warmup_epochs == 10  # 10 of 100 epochs
    assert TrainOptions(method="vpt-shallow").resolved_prompt_dropout == 0.0
    assert TrainOptions(method="linear", prompt_dropout=0.5).resolved_prompt_dropout == 0.0
    assert TrainOptions(prompt_dropout=0.3).resolved_prompt_dropout == 0.3
    assert TrainOptions(base_lr=25.0, batch_size=128).lr == 12.5  # the demo's sun397 setting
    assert TrainOptions(method="linear", num_prompts=50).spec(CLASSES).num_prompts == 0
    o = opts(seed=7, prompt_dropout=None)
    assert TrainOptions.from_dict(json.loads(json.dumps(o.to_dict()))) == o


@pytest.mark.parametrize("field,value", [
    ("method", "vpt-wide"), ("num_prompts", 0), ("num_prompts", 2.5), ("epochs", 0), ("epochs", True),
    ("batch_size", -1), ("base_lr", 0.0), ("base_lr", float("nan")), ("weight_decay", -0.1),
    ("warmup_epochs", 4), ("prompt_dropout", 1.0), ("augmentation", "mixup"), ("sweep", "huge"),
    ("seed", -1), ("val_fraction", 1.0), ("keep", "worst"), ("mixed_precision", "fp8"), ("num_workers", -2),
])
def test_invalid_options_raise_a_typed_error(field: str, value: object) -> None:
    with pytest.raises(TrainOptionsError) as info:
        opts(**{field: value})  # warmup 4 > epochs 3
    assert isinstance(info.value, VPTError) and info.value.code == "invalid_parameter"
    assert info.value.field == field and field in str(info.value)


def test_from_dict_refuses_unknown_keys() -> None:
    with pytest.raises(TrainOptionsError, match="learning_rate"):
        TrainOptions.from_dict({"learning_rate": 1.0})
    with pytest.raises(TrainOptionsError):
        TrainOptions.from_dict(["not", "a", "dict"])  # type: ignore[arg-type]


# ---- schedule and optimizer ----------------------------------------------------------------------

def test_lr_multiplier_exact_formula() -> None:
    w, total = 4, 20
    assert [lr_multiplier(s, w, total) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]  # step 0 moves already
    for s in range(w, total):
        assert lr_multiplier(s, w, total) == pytest.approx(0.5 * (1 + math.cos(math.pi * (s - w) / (total - w))))
    assert lr_multiplier(total - 1, w, total) > 0
    assert lr_multiplier(0, 0, 10) == 1.0  # no warmup: cosine from the peak


def test_schedule_is_stepped_per_iteration(tiny_backbone: Backbone) -> None:
    train, _ = sets(tiny_backbone)  # 24 images, batch 8: 3 steps an epoch
    o = opts(epochs=4, warmup_epochs=1)
    events: list[ProgressEvent] = []
    train_task(tiny_backbone, CLASSES, train, None, o, on_progress=events.append)
    lrs = [e.lr for e in events if e.kind == "step"]
    expected = [o.lr * lr_multiplier(s, 3, 12) for s in range(12)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert lrs[0] == pytest.approx(o.lr / 3) and len(set(lrs)) == 11  # steps 2 and 3 are both at the peak


def test_optimizer_groups_follow_the_official_recipe(tiny_backbone: Backbone) -> None:
    p = TaskParams.new(opts(weight_decay=0.01).spec(CLASSES), tiny_backbone)
    sgd = make_optimizer(p, opts(weight_decay=0.01))
    by_id = {id(t): g for g in sgd.param_groups for t in g["params"]}
    assert by_id[id(p.prompts)]["weight_decay"] == 0.01  # prompts are decayed too
    assert by_id[id(p.head.weight)]["weight_decay"] == 0.01
    assert by_id[id(p.head.bias)]["weight_decay"] == 0.0
    assert all(g["momentum"] == 0.9 and not g["nesterov"] for g in sgd.param_groups)
    assert sum(len(g["params"]) for g in sgd.param_groups) == 3


# ---- the loop --------------------------------------------------------------------------------------

def test_same_seed_same_task_bit_for_bit(tiny_backbone: Backbone) -> None:
    """Prompt dropout and the fgvc augmentation draw random numbers; the seed fixes them all."""
    def run(seed: int) -> TaskParams:
        train, val = sets(tiny_backbone, augment="fgvc")
        out = train_task(tiny_backbone, CLASSES, train, val, opts(seed=seed, augmentation="fgvc", prompt_dropout=0.2))
        return out.params

    a, b, c = run(3), run(3), run(4)
    for name, t in a.state_dict().items():
        assert torch.equal(t, b.state_dict()[name]), name
    assert not torch.equal(a.prompts, c.prompts)
    fa, fb = (load_task_file(save_task_file(p, tiny_backbone), tiny_backbone) for p in (a, b))
    assert all(torch.equal(x, y) for x, y in zip(fa.params.state_dict().values(), fb.params.state_dict().values()))


def test_backbone_stays_frozen_and_in_eval_mode(tiny_backbone: Backbone) -> None:
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    train, val = sets(tiny_backbone)
    out = train_task(tiny_backbone, CLASSES, train, val, opts(epochs=1))
    after = tiny_backbone.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not tiny_backbone.model.training and not any(p.requires_grad for p in tiny_backbone.model.parameters())
    assert out.params.num_trainable() == {"prompts": 4 * 4 * 64, "head": 3 * 64 + 3, "total": 4 * 4 * 64 + 195}


def test_progress_events_are_monotone_and_complete(tiny_backbone: Backbone) -> None:
    train, val = sets(tiny_backbone)
    events: list[ProgressEvent] = []
    train_task(tiny_backbone, CLASSES, train, val, opts(epochs=3), on_progress=events.append)
    steps = [e for e in events if e.kind == "step"]
    epochs = [e for e in events if e.kind == "epoch"]
    assert [e.step for e in steps] == list(range(1, 10)) and all(e.steps == 9 for e in events)
    assert [e.epoch for e in epochs] == [1, 2, 3] and all(e.val_acc is not None for e in epochs)
    assert [e.epoch for e in steps] == [1, 1, 1, 2, 2, 2, 3, 3, 3]
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and events[-1].eta_s == 0.0
    assert all(e.run == e.runs == 1 and e.images_per_s > 0 and math.isfinite(e.loss) for e in events)
    assert set(events[0].to_dict()) >= {"epoch", "epochs", "step", "steps", "loss", "lr", "images_per_s", "eta_s",
                                        "val_acc", "fraction", "run", "runs"}


def test_cancel_mid_epoch_stops_before_the_next_step(tiny_backbone: Backbone) -> None:
    train, val = sets(tiny_backbone)
    flag = {"raised": False}
    after_flag: list[ProgressEvent] = []

    def on_progress(e: ProgressEvent) -> None:
        if flag["raised"]:
            after_flag.append(e)
        elif e.kind == "step" and e.epoch == 2 and e.step == 5:  # the middle of epoch 2
            flag["raised"] = True

    with pytest.raises(TrainingCancelled) as info:
        train_task(tiny_backbone, CLASSES, train, val, opts(epochs=3), on_progress=on_progress,
                   should_cancel=lambda: flag["raised"])
    assert info.value.code == "cancelled" and after_flag == []


def test_best_epoch_is_restored(tiny_backbone: Backbone) -> None:
    train, val = sets(tiny_backbone)
    for keep in ("best", "last"):
        out = train_task(tiny_backbone, CLASSES, train, val, opts(epochs=5, base_lr=8.0, keep=keep))
        accs = [h.val_acc for h in out.history]
        _, preds, y = predict(tiny_backbone, out.params, make_loader(val, 8, False, None, out.options,
                                                                     tiny_backbone.device), amp=False)
        kept = float((preds == y).float().mean())
        if keep == "best":
            assert out.best_epoch == accs.index(max(accs)) + 1 and out.best_val_acc == max(accs)
        else:
            assert out.best_epoch == 5 and out.best_val_acc == accs[-1]
        assert kept == pytest.approx(accs[out.best_epoch - 1])


def test_without_validation_the_last_epoch_is_kept(tiny_backbone: Backbone) -> None:
    train, _ = sets(tiny_backbone)
    out = train_task(tiny_backbone, CLASSES, train, None, opts(method="linear", epochs=2))
    assert out.best_epoch == 2 and out.best_val_acc is None and out.params.prompts is None
    assert all(h.val_acc is None for h in out.history)


def test_non_finite_loss_aborts_with_a_typed_error(tiny_backbone: Backbone) -> None:
    train, _ = sets(tiny_backbone)
    bad = [(torch.full_like(x, float("nan")), y) for x, y in (train[i] for i in range(len(train)))]
    with pytest.raises(TrainingDiverged) as info:
        train_task(tiny_backbone, CLASSES, bad, None, opts(epochs=1))
    assert info.value.code == "training_diverged" and "nan" in info.value.message


def test_empty_training_set_is_refused(tiny_backbone: Backbone) -> None:
    with pytest.raises(TrainOptionsError):
        train_task(tiny_backbone, CLASSES, [], None, opts())

