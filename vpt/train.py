"""Training one task on the frozen backbone: the VPT recipe (vpt-spec §4) through the serving path.

Only the task's method tensors (prompts, biases, adapters, a partial block) and head learn. SGD with momentum 0.9, lr = base_lr * batch_size / 256,
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
from vpt.engine import forward_logits, training_table
from vpt.errors import TaskSpecError, VPTError
from vpt.methods import POOLINGS, head_component, parse_method
from vpt.metrics import accuracy
from vpt.task import MAX_PROMPTS, MAX_REDUCTION, TaskParams, TaskSpec, parse_layers
from vpt.transforms import AUGMENTATIONS

log = logging.getLogger(__name__)

SWEEPS = ("none", "small", "paper")
MIXED_PRECISION = ("auto", "bf16", "off")
KEEP = ("best", "last")
MOMENTUM = 0.9
LR_REFERENCE_BATCH = 256  # lr = base_lr * batch_size / 256 (vpt-spec §4.2)
AUTO_METHODS = ("linear", "vpt-shallow", "vpt-deep", "bias", "adapter")  # method=auto's default candidates


class TrainingError(VPTError):
    """Training could not produce a task. `code` names why."""

    code = "training_failed"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class TrainOptionsError(TrainingError, ValueError):
    """A training option is out of range or of the wrong type."""

    code = "invalid_parameter"

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class TrainingCancelled(TrainingError):
    """`should_cancel()` answered True; nothing was kept."""

    code = "cancelled"


class TrainingDiverged(TrainingError):
    """The loss became NaN or infinite (the official code aborts too, vpt-spec §4.4)."""

    code = "training_diverged"


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise TrainOptionsError(f"{name}: {message}", field=name)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class TrainOptions:
    """How to train a task. Defaults follow the paper's prompt recipe (vpt-spec §4).

    `prompt_dropout` None means 0.1 for vpt-deep and 0.0 for vpt-shallow (the demo's values);
    `warmup_epochs` None means 10% of the epochs (the paper's 10 of 100); `keep` picks the
    parameters returned: the best epoch by validation accuracy, or the last one.
    """

    method: str = "vpt-deep"
    num_prompts: int = 10
    head: str = "linear"
    pooling: str = "cls"
    prompt_layers: str | None = None
    adapter_reduction: int = 64
    auto_methods: tuple[str, ...] = AUTO_METHODS
    epochs: int = 100
    batch_size: int = 64
    base_lr: float = 1.0
    weight_decay: float = 1e-3
    warmup_epochs: int | None = None
    prompt_dropout: float | None = None
    augmentation: str = "fgvc"
    sweep: str = "none"
    seed: int = 0
    val_fraction: float = 0.1
    keep: str = "best"
    mixed_precision: str = "auto"
    num_workers: int = 0

    def __post_init__(self) -> None:
        self._check_method()
        for name, allowed in (("augmentation", AUGMENTATIONS), ("sweep", SWEEPS), ("pooling", POOLINGS),
                              ("keep", KEEP), ("mixed_precision", MIXED_PRECISION)):
            _check(getattr(self, name) in allowed, name, f"must be one of {list(allowed)}, "
                   f"got {getattr(self, name)!r}")
        _check(_is_int(self.num_prompts) and 1 <= self.num_prompts <= MAX_PROMPTS, "num_prompts",
               f"must be an integer in 1..{MAX_PROMPTS}, got {self.num_prompts!r}")
        _check(_is_int(self.epochs) and 1 <= self.epochs <= 10_000, "epochs",
               f"must be an integer in 1..10000, got {self.epochs!r}")
        _check(_is_int(self.batch_size) and 1 <= self.batch_size <= 65_536, "batch_size",
               f"must be an integer in 1..65536, got {self.batch_size!r}")
        _check(_is_num(self.base_lr) and 0 < self.base_lr <= 1e4, "base_lr",
               f"must be a number in (0, 10000], got {self.base_lr!r}")
        _check(_is_num(self.weight_decay) and 0 <= self.weight_decay <= 1.0, "weight_decay",
               f"must be a number in [0, 1], got {self.weight_decay!r}")
        w = self.warmup_epochs
        _check(w is None or (_is_int(w) and 0 <= w <= self.epochs), "warmup_epochs",
               f"must be an integer in 0..epochs ({self.epochs}) or null, got {w!r}")
        d = self.prompt_dropout
        _check(d is None or (_is_num(d) and 0 <= d < 1), "prompt_dropout", f"must be in [0, 1) or null, got {d!r}")
        _check(_is_int(self.seed) and 0 <= self.seed < 2**63, "seed", f"must be a non-negative integer, got {self.seed!r}")
        _check(_is_num(self.val_fraction) and 0 <= self.val_fraction < 1, "val_fraction",
               f"must be in [0, 1), got {self.val_fraction!r}")
        _check(_is_int(self.num_workers) and 0 <= self.num_workers <= 64, "num_workers",
               f"must be an integer in 0..64, got {self.num_workers!r}")

    def _check_method(self) -> None:
        """The method (or `auto` with its candidates), head and method options, as TaskSpec checks them."""
        if isinstance(self.auto_methods, list):
            object.__setattr__(self, "auto_methods", tuple(self.auto_methods))
        _check(isinstance(self.auto_methods, tuple) and 1 <= len(self.auto_methods) <= 16, "auto_methods",
               f"must be a list of 1..16 methods, got {self.auto_methods!r}")
        checks = [("method", self.method)] if self.method != "auto" else []
        for name, value in checks + [("auto_methods", m) for m in self.auto_methods]:
            try:
                parse_method(value)
            except TaskSpecError as e:
                raise TrainOptionsError(f"{name}: {e}", field=name) from None
        _check(self.method != "auto" or self.sweep == "none", "sweep",
               "method auto trains each candidate once; it cannot be combined with a sweep")
        r = self.adapter_reduction
        _check(_is_int(r) and 1 <= r <= MAX_REDUCTION, "adapter_reduction",
               f"must be an integer in 1..{MAX_REDUCTION}, got {r!r}")
        for name, check in (("head", lambda: head_component(self.head)),
                            ("prompt_layers", lambda: parse_layers(self.prompt_layers))):
            try:
                check()
            except (TaskSpecError, TypeError, AttributeError) as e:
                raise TrainOptionsError(f"{name}: {e}", field=name) from None

    @property
    def components(self) -> tuple[str, ...]:
        return () if self.method == "auto" else parse_method(self.method)

    @property
    def lr(self) -> float:
        """The learning rate SGD uses: base_lr scaled linearly by batch_size / 256."""
        return self.base_lr * self.batch_size / LR_REFERENCE_BATCH

    @property
    def resolved_warmup_epochs(self) -> int:
        return self.warmup_epochs if self.warmup_epochs is not None else round(self.epochs / 10)

    @property
    def resolved_prompt_dropout(self) -> float:
        if not {"vpt-deep", "vpt-shallow"} & set(self.components):
            return 0.0
        if self.prompt_dropout is not None:
            return float(self.prompt_dropout)
        return 0.1 if "vpt-deep" in self.components else 0.0

    def spec(self, classes: Sequence[str]) -> TaskSpec:
        """The task this training makes; TrainOptionsError when the options do not fit together."""
        try:
            return TaskSpec(self.method, self.num_prompts, tuple(classes), self.resolved_prompt_dropout,
                            head=self.head, pooling=self.pooling, prompt_layers=parse_layers(self.prompt_layers),
                            adapter_reduction=self.adapter_reduction)
        except TaskSpecError as e:
            raise TrainOptionsError(str(e), field="method") from None

    def replace(self, **changes: Any) -> TrainOptions:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["auto_methods"] = list(self.auto_methods)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainOptions:
        """Options from JSON; unknown keys are refused, missing keys take their defaults."""
        if not isinstance(data, dict):
            raise TrainOptionsError(f"options must be an object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise TrainOptionsError(f"unknown training options {unknown}; known: {sorted(known)}", field=unknown[0])
        return cls(**data)


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
    """A training progress report. `kind` is "step" (after each step) or "epoch" (after each
    epoch's validation). Counters are 1-based; `fraction` covers every run of a sweep."""

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
        self.started = time.perf_counter()

    def emit(self, **fields: Any) -> None:
        self.done = (self.run - 1) * self.steps_per_run + fields["step"]
        total = self.runs * self.steps_per_run
        elapsed = time.perf_counter() - self.started
        eta = elapsed / self.done * (total - self.done) if self.done else None
        if self.on_progress is not None:
            self.on_progress(ProgressEvent(run=self.run, runs=self.runs, steps=self.steps_per_run, eta_s=eta,
                                           fraction=self.done / total, method=self.method,
                                           leaderboard=self.leaderboard, **fields))


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
    """Batches in order, or shuffled by `generator`; the last batch may be smaller (as the official code)."""
    return DataLoader(data, batch_size=batch_size, shuffle=shuffle, generator=generator, drop_last=False,
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
            images = images.to(dev, backbone.dtype, non_blocking=True)            # (B, 3, H, W)
            slot = torch.zeros(images.shape[0], dtype=torch.long, device=dev)       # (B,)
            outs.append(forward_logits(backbone, images, table, slot).float().cpu())  # (B, C)
            labels.append(y.cpu())
    logits = torch.cat(outs) if outs else torch.zeros(0, params.spec.num_classes)
    y = torch.cat(labels).long() if labels else torch.zeros(0, dtype=torch.long)
    return logits, logits.argmax(dim=1), y


def _train_step(backbone: Backbone, params: TaskParams, optimizer: torch.optim.SGD, images: Tensor,
                labels: Tensor, dropout: float, amp: bool) -> Tensor:
    dev = backbone.device
    images = images.to(dev, backbone.dtype, non_blocking=True)                       # (B, 3, H, W)
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
        return _run(backbone, params, optimizer, loader, val_loader, options, progress, should_cancel,
                    amp, warmup, total, step_gate or nullcontext)


@dataclass
class _RunState:
    step: int = 0
    images: int = 0
    val_acc: float | None = None
    best: tuple[float, int, dict[str, Tensor]] | None = None
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
            loss = _train_step(backbone, params, optimizer, images, labels, params.spec.prompt_dropout, amp)
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
         should_cancel: CancelFn | None, amp: bool, warmup: int, total: int, step_gate: StepGate) -> TrainOutcome:
    history: list[EpochRecord] = []
    state = _RunState()
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
