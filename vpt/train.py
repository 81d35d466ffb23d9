"""Training one task on the frozen backbone: the VPT recipe (Jia et al., ECCV 2022; official code KMnsit/VPT) through the serving path.

Only the task's prompts and head learn. SGD with momentum 0.9, lr = base_lr * batch_size / 256,
weight decay on prompts and head weight (not the head bias), linear warmup then cosine decay
stepped every iteration, per-sample prompt dropout, cross-entropy. After each epoch the model is
scored on the validation set; the best epoch's parameters are restored at the end.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vpt.backbone import Backbone
from vpt.batches import BatchTransform, collate_images, device_batch, train_batch_transform
from vpt.engine import forward_logits, training_table
from vpt.errors import TaskSpecError, TrainingCancelled, TrainingError, TrainOptionsError
from vpt.metrics import accuracy
from vpt.options import KEEP, LR_REFERENCE_BATCH, MIXED_PRECISION, SWEEPS, TrainOptions  # noqa: F401
from vpt.task import TaskParams

log = logging.getLogger(__name__)

MOMENTUM = 0.9


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite (the official code aborts too)."""

    code = "training_diverged"


def lr_multiplier(step: int, warmup_steps: int, total_steps: int) -> float:
    """Multiplier of the peak lr for 0-based iteration `step`: linear warmup, then cosine.

    Warmup: (step + 1) / warmup_steps, so the first step already moves and the last warmup
    step is at the peak. Then 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup))).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(n_train: int, options: TrainOptions) -> int:
    """Optimizer steps of one run: ceil(n_train / batch_size) per epoch, times the epochs."""
    return math.ceil(n_train / options.batch_size) * options.epochs


@dataclass(frozen=True)
class ProgressEvent:
    """A training progress report. `kind` is "step" (after each step), "epoch" (after each
    epoch's validation) or "candidate" (method=auto: a candidate finished, its row is on the
    leaderboard). Counters are 1-based; `fraction` covers every run of a sweep."""

    kind: str
    run: int
    runs: int
    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    lr: float
    images_per_s: float
    eta_s: float | None
    val_acc: float | None
    fraction: float
    base_lr: float
    weight_decay: float
    method: str | None = None          # the candidate being trained, under method=auto
    leaderboard: list[dict[str, Any]] | None = None   # method=auto: candidates finished so far

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


ProgressFn = Callable[[ProgressEvent], None]
CancelFn = Callable[[], bool]
StepGate = Callable[[], AbstractContextManager[Any]]  # entered once per training step


class Progress:
    """Counts steps over all runs of a job, for `fraction`, throughput and ETA."""

    def __init__(self, runs: int, steps_per_run: int, on_progress: ProgressFn | None) -> None:
        self.runs, self.steps_per_run, self.on_progress = runs, steps_per_run, on_progress
        self.run = 1
        self.done = 0
        self.method: str | None = None
        self.leaderboard: list[dict[str, Any]] | None = None
        self.last: dict[str, Any] | None = None   # the fields of the latest event
        self.started = time.perf_counter()

    def emit(self, **fields: Any) -> None:
        self.last = fields
        self.done = (self.run - 1) * self.steps_per_run + fields["step"]
        total = self.runs * self.steps_per_run
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (total - self.done) if self.done else None
        board = list(self.leaderboard) if self.leaderboard is not None else None  # a snapshot, not the live list
        if self.on_progress is not None:
            self.on_progress(ProgressEvent(run=self.run, runs=self.runs, steps=self.steps_per_run, eta_s=eta,
                                           fraction=self.done / total, method=self.method,
                                           leaderboard=board, **fields))


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_acc: float | None
    val_loss: float | None
    lr: float
    seconds: float


@dataclass
class TrainOutcome:
    """A finished run: the kept parameters and what happened on the way."""

    params: TaskParams
    options: TrainOptions
    history: list[EpochRecord]
    best_epoch: int
    best_val_acc: float | None
    steps: int
    seconds: float
    images_per_s: float


def amp_enabled(options: TrainOptions, device: torch.device) -> bool:
    """bf16 autocast: on CUDA with `auto`, wherever asked with `bf16`, never with `off`."""
    return options.mixed_precision == "bf16" or (options.mixed_precision == "auto" and device.type == "cuda")


def make_optimizer(params: TaskParams, options: TrainOptions) -> torch.optim.SGD:
    """SGD, momentum 0.9; weight decay on every trainable tensor but the head's last bias (as the official code)."""
    exempt = [p for _, comp, module in params.components() if module is not None for p in comp.no_decay(module)]
    decayed = [p for p in params.parameters() if all(p is not q for q in exempt)]
    groups = [{"params": decayed, "weight_decay": options.weight_decay},
              {"params": exempt, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=options.lr, momentum=MOMENTUM)


def make_loader(data: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator | None,
                options: TrainOptions, device: torch.device) -> DataLoader:
    """Batches in order, or shuffled by `generator`; the last batch may be smaller (as the official code).
    uint8 images stay lists, preprocessed on the device (`vpt.batches`)."""
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=False,
                      collate_fn=collate_images,
                      num_workers=options.num_workers, pin_memory=device.type == "cuda",
                      persistent_workers=options.num_workers > 0)


def check_cancel(should_cancel: CancelFn | None) -> None:
    if should_cancel is not None and should_cancel():
        raise TrainingCancelled("training was cancelled")


def predict(backbone: Backbone, params: TaskParams, loader: DataLoader, amp: bool,
            should_cancel: CancelFn | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Logits (N, C) float32, predictions (N,) and labels (N,) over `loader`, on the CPU."""
    dev = backbone.device
    outs, labels = [], []
    with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        table, _ = training_table(backbone, params, 1, dropout=0.0, training=False)
        for images, y in loader:
            check_cancel(should_cancel)
            images = device_batch(images, dev, backbone.dtype, None, backbone.data_config)  # (B, 3, H, W)
            slot = torch.zeros(images.shape[0], dtype=torch.long, device=dev)       # (B,)
            outs.append(forward_logits(backbone, images, table, slot).float().cpu())  # (B, C)
            labels.append(y.cpu())
    logits = torch.cat(outs) if outs else torch.zeros(0, params.spec.num_classes)
    y = torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.long)
    return logits, logits.argmax(dim=1), y


def _train_step(backbone: Backbone, params: TaskParams, optimizer: torch.optim.SGD, images: Tensor | list[Tensor],
                labels: Tensor, dropout: float, amp: bool, augment: BatchTransform | None = None) -> Tensor:
    dev = backbone.device
    images = device_batch(images, dev, backbone.dtype, augment, backbone.data_config)  # (B, 3, H, W)
    labels = labels.to(dev, non_blocking=True)                                       # (B,)
    with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
        table, slot = training_table(backbone, params, images.shape[0], dropout, training=True)
        logits = forward_logits(backbone, images, table, slot)                       # (B, C)
    loss = F.cross_entropy(logits.float(), labels)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach()


def _check_gradients(params: TaskParams) -> None:
    """The frozen path must carry gradients to every trainable tensor. A forward-only attention
    kernel cuts them silently: deep prompts get no gradient, shallow prompts an all-zero one."""
    may_be_zero = [p for _, comp, module in params.components() if module is not None
                   for p in comp.zero_grad_ok(module)]
    missing = [name for name, p in params.named_parameters()
               if p.grad is None or (not bool(p.grad.any()) and all(p is not q for q in may_be_zero))]
    if missing:
        raise TrainingError(f"no gradient reached {missing}; the attention backend in use has no backward "
                            "pass (use the torch backend for training)", code="no_gradient")


def train_task(backbone: Backbone, classes: Sequence[str], train_set: Dataset, val_set: Dataset | None,
               options: TrainOptions, on_progress: ProgressFn | None = None,
               should_cancel: CancelFn | None = None, progress: Progress | None = None,
               step_gate: StepGate | None = None) -> TrainOutcome:
    """Train one task on `train_set` ((image tensor, label) items); score `val_set` each epoch.

    `step_gate()` is entered around every step's forward and backward (e.g. a serving-first
    `vpt.priority.PriorityGate.training`, so a waiting serving batch goes first).
    """
    if len(train_set) == 0:
        raise TrainOptionsError("the training set is empty", field="dataset")
    dev = backbone.device
    spec = options.spec(classes)
    total = total_steps(len(train_set), options)
    warmup = total // options.epochs * options.resolved_warmup_epochs  # steps per epoch x warmup epochs
    progress = progress or Progress(1, total, on_progress)
    amp = amp_enabled(options, dev)
    rng_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(options.seed)  # prompt dropout and augmentation draw from the global generator
        try:
            params = TaskParams.new(spec, backbone, generator=torch.Generator().manual_seed(options.seed)).to(dev)
        except TaskSpecError as e:
            raise TrainOptionsError(str(e), field="method") from None
        optimizer = make_optimizer(params, options)
        shuffle = torch.Generator().manual_seed(options.seed + 1)
        loader = make_loader(train_set, options.batch_size, True, shuffle, options, dev)
        val_loader = make_loader(val_set, options.batch_size, False, None, options, dev) if val_set else None
        state = _RunState(augment=train_batch_transform(backbone.data_config, options.augmentation))
        return _run(backbone, params, optimizer, loader, val_loader, options, progress, should_cancel,
                    amp, warmup, total, step_gate or nullcontext, state)


@dataclass
class _RunState:
    step: int = 0
    images: int = 0
    val_acc: float | None = None
    best: tuple[float, int, dict[str, Tensor]] | None = None
    augment: BatchTransform | None = None   # the training batches' transform for uint8 images
    started: float = field(default_factory=time.perf_counter)

    def speed(self) -> float:
        return self.images / max(time.perf_counter() - self.started, 1e-9)


def _train_epoch(backbone: Backbone, params: TaskParams, optimizer: torch.optim.SGD, loader: DataLoader,
                 options: TrainOptions, epoch: int, state: _RunState, progress: Progress,
                 should_cancel: CancelFn | None, amp: bool, warmup: int, total: int,
                 step_gate: StepGate) -> tuple[float, float]:
    """One pass over `loader`; returns (mean train loss, last lr)."""
    loss_sum, seen, lr = 0.0, 0, 0.0
    info = {"base_lr": options.base_lr, "weight_decay": options.weight_decay, "epochs": options.epochs}
    for images, labels in loader:
        check_cancel(should_cancel)
        lr = options.lr * lr_multiplier(state.step, warmup, total)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with step_gate():
            loss = _train_step(backbone, params, optimizer, images, labels, params.spec.prompt_dropout, amp,
                               state.augment)
        if state.step == 0:
            _check_gradients(params)
        value = float(loss)
        if not math.isfinite(value):
            raise TrainingDiverged(f"the loss became {value} at epoch {epoch}, step {state.step + 1} "
                                   f"(base_lr {options.base_lr}); try a smaller learning rate")
        optimizer.step()
        b = labels.shape[0]
        state.step, state.images, loss_sum, seen = state.step + 1, state.images + b, loss_sum + value * b, seen + b
        progress.emit(kind="step", epoch=epoch, step=state.step, loss=loss_sum / seen, lr=lr,
                      images_per_s=state.speed(), val_acc=state.val_acc, **info)
    return loss_sum / seen, lr


def _run(backbone: Backbone, params: TaskParams, optimizer: torch.optim.SGD, loader: DataLoader,
         val_loader: DataLoader | None, options: TrainOptions, progress: Progress,
         should_cancel: CancelFn | None, amp: bool, warmup: int, total: int, step_gate: StepGate,
         state: _RunState) -> TrainOutcome:
    history: list[EpochRecord] = []
    info = {"base_lr": options.base_lr, "weight_decay": options.weight_decay, "epochs": options.epochs}
    for epoch in range(1, options.epochs + 1):
        epoch_start = time.perf_counter()
        train_loss, lr = _train_epoch(backbone, params, optimizer, loader, options, epoch, state, progress,
                                      should_cancel, amp, warmup, total, step_gate)
        val_loss = None
        if val_loader is not None:
            logits, preds, y = predict(backbone, params, val_loader, amp, should_cancel)
            state.val_acc = accuracy(preds, y)
            val_loss = float(F.cross_entropy(logits, y)) if y.numel() else None
            if state.best is None or state.val_acc > state.best[0]:  # ties keep the earlier epoch
                state.best = (state.val_acc, epoch, copy.deepcopy(params.state_dict()))
        history.append(EpochRecord(epoch, train_loss, state.val_acc, val_loss, lr, time.perf_counter() - epoch_start))
        log.debug("epoch %d/%d: loss %.4f, val acc %s", epoch, options.epochs, train_loss, state.val_acc)
        progress.emit(kind="epoch", epoch=epoch, step=state.step, loss=train_loss, lr=lr,
                      images_per_s=state.speed(), val_acc=state.val_acc, **info)
    seconds = time.perf_counter() - state.started
    best_epoch, best_acc = options.epochs, state.val_acc
    if state.best is not None and options.keep == "best":
        best_acc, best_epoch, best_state = state.best
        params.load_state_dict(best_state)
    params.requires_grad_(False)
    return TrainOutcome(params=params, options=options, history=history, best_epoch=best_epoch,
                        best_val_acc=best_acc, steps=state.step, seconds=seconds, images_per_s=state.speed())
