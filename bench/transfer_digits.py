"""The paper's setting in miniature: pre-train a ViT, freeze it, adapt it to new classes.

A small ViT (6 blocks, d=96, 3 heads, 32x32 inputs in 8x8 patches) is fully trained (all weights,
AdamW) on scikit-learn's digits 0-4, saved, and loaded back as the frozen backbone. It is then
adapted to digits 5-9 from `--shots` images per class with every tuning method of the registry
(linear, vpt-shallow, vpt-deep, bias, vpt-deep+bias, adapter, partial-1, an mlp-3 head) and
`auto`, each with vpt.train (the recipe the server runs) and a base-lr search over `--lrs` scored
on validation, and with full fine-tuning (all weights, AdamW), all for the same number of epochs;
the winner of each search is scored on the held-out test images.

    .venv/bin/python bench/transfer_digits.py [--epochs 30] [--shots 40] [--methods linear bias ...]

Prints one JSON line for pre-training and one per method: validation accuracy, trainable
parameters, training and inference images/s, and ratios to full fine-tuning.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpt.auto import run_auto
from vpt.backbone import Backbone, load_backbone
from vpt.engine import forward_logits, stack_slots, task_slot_tensors, training_table
from vpt.pipeline import evaluate
from vpt.sweep import run_sweep
from vpt.task import TaskParams
from vpt.train import TrainOptions, lr_multiplier

NAME = "vit_tiny_patch16_224"
KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 96, "depth": 6, "num_heads": 3, "num_classes": 0}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def digits(classes: range) -> tuple[Tensor, Tensor]:
    """Digits of `classes` as (N, 3, 32, 32) tensors normalised to [-1, 1], labels from 0."""
    from sklearn.datasets import load_digits

    d = load_digits()
    keep = np.isin(d.target, list(classes))
    x = torch.tensor(d.images[keep] / 16.0, dtype=torch.float32)[:, None]                # (N, 1, 8, 8)
    x = F.interpolate(x, size=32, mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)  # (N, 3, 32, 32)
    return (x - 0.5) / 0.5, torch.tensor(d.target[keep] - classes.start)


def split(x: Tensor, y: Tensor, counts: tuple[int, ...], seed: int) -> list[list]:
    """Per class: the first counts[0] shuffled images, the next counts[1], ..., then the rest."""
    g = torch.Generator().manual_seed(seed)
    parts: list[list] = [[] for _ in range(len(counts) + 1)]
    for c in y.unique().tolist():
        idx = (y == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)].tolist()
        bounds = np.cumsum((0, *counts, len(idx)))
        for part, lo, hi in zip(parts, bounds[:-1], bounds[1:]):
            part += [(x[i], int(y[i])) for i in idx[lo:hi]]
    return parts


def batches(data: list, batch: int, g: torch.Generator | None) -> list[tuple[Tensor, Tensor]]:
    order = torch.randperm(len(data), generator=g) if g is not None else torch.arange(len(data))
    out = []
    for i in range(0, len(data), batch):
        items = [data[j] for j in order[i:i + batch]]
        out.append((torch.stack([a for a, _ in items]), torch.tensor([b for _, b in items])))
    return out


def accuracy(model: nn.Module, data: list) -> float:
    model.eval()
    with torch.inference_mode():
        hits = sum(int((model(x).argmax(1) == y).sum()) for x, y in batches(data, 256, None))
    return hits / len(data)


def fit_all_weights(model: nn.Module, train: list, val: list, epochs: int, lr: float, wd: float, seed: int,
                    batch: int = 32) -> tuple[nn.Module, float, int, float]:
    """AdamW on every weight, warmup + cosine per step; keeps the best epoch by val accuracy.
    Returns (model, best val acc, best epoch, training images/s)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    steps_per_epoch = math.ceil(len(train) / batch)
    total, warmup = steps_per_epoch * epochs, steps_per_epoch * round(epochs / 10)
    best, best_epoch, best_state, step, train_time = -1.0, 0, None, 0, 0.0
    for epoch in range(1, epochs + 1):
        model.train()
        t0 = time.perf_counter()
        for x, y in batches(train, batch, g):
            for group in opt.param_groups:
                group["lr"] = lr * lr_multiplier(step, warmup, total)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        train_time += time.perf_counter() - t0
        acc = accuracy(model, val)
        if acc > best:
            best, best_epoch, best_state = acc, epoch, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    return model, best, best_epoch, len(train) * epochs / train_time


def pretrain(train: list, val: list, epochs: int, seed: int, path: Path) -> dict:
    torch.manual_seed(seed)
    model = timm.create_model(NAME, pretrained=False, **{**KWARGS, "num_classes": 5})
    started = time.perf_counter()
    model, acc, _, speed = fit_all_weights(model, train, val, epochs, lr=1e-3, wd=0.05, seed=seed, batch=64)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    save_file(state, str(path))
    return {"phase": "pretrain", "classes": "0-4", "val_acc": round(acc, 4), "epochs": epochs,
            "train_images": len(train), "val_images": len(val), "seconds": round(time.perf_counter() - started, 1),
            "train_images_per_s": round(speed, 1)}


def step_speed(bb: Backbone, params: TaskParams, batch: Tensor, labels: Tensor, dropout: float) -> float:
    """Images/s of one training step of a task (forward + backward, no optimizer), median of 5."""
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        table, slot = training_table(bb, params, batch.shape[0], dropout, training=True)
        F.cross_entropy(forward_logits(bb, batch, table, slot), labels).backward()
        times.append(time.perf_counter() - t0)
    return batch.shape[0] / float(np.median(times[1:]))


def infer_speed(fn, batch: Tensor) -> float:
    """Images/s of inference on `batch`, median of 10 after a warm-up."""
    times = []
    with torch.inference_mode():
        for _ in range(11):
            t0 = time.perf_counter()
            fn(batch)
            times.append(time.perf_counter() - t0)
    return batch.shape[0] / float(np.median(times[1:]))


# bench name -> training options (every method of the registry, the MLP-3 head, and auto)
METHODS = {"linear": {"method": "linear"}, "vpt-shallow": {"method": "vpt-shallow"},
           "vpt-deep": {"method": "vpt-deep"}, "bias": {"method": "bias"},
           "vpt-deep+bias": {"method": "vpt-deep+bias"}, "adapter": {"method": "adapter", "adapter_reduction": 8},
           "partial-1": {"method": "partial-1"}, "mlp-3": {"method": "linear", "head": "mlp-3"},
           "auto": {"method": "auto", "adapter_reduction": 8}}


def adapt_prompted(bb: Backbone, method: str, data: dict[str, list], args: argparse.Namespace) -> dict:
    """The server's recipe with a base-lr search scored on val (auto: its candidates at --auto-lr);
    the winner is scored on test."""
    options = TrainOptions(num_prompts=args.prompts, epochs=args.epochs, batch_size=32, weight_decay=1e-4,
                           augmentation="none", seed=args.seed, base_lr=args.auto_lr, **METHODS[method])
    classes = [str(c) for c in range(5, 10)]
    if method == "auto":
        auto = run_auto(bb, classes, data["train"], data["val"], options)
        out = auto.winner
    else:
        out = run_sweep(bb, classes, data["train"], data["val"], options, grid=[(lr, 1e-4) for lr in args.lrs]).winner
    test = evaluate(bb, out.params, data["test"], classes, out.options).accuracy
    x, y = batches(data["train"], 32, None)[0]
    params = copy.deepcopy(out.params).requires_grad_(True)
    table = stack_slots(bb, [task_slot_tensors(bb, out.params)])
    slot = torch.zeros(x.shape[0], dtype=torch.long)
    return {"val_acc": out.best_val_acc, "test_acc": test, "best_epoch": out.best_epoch,
            "chosen": out.params.spec.method if method == "auto" else None,
            "trainable_params": out.params.num_trainable()["total"], "lr": out.options.base_lr,
            "train_images_per_s": step_speed(bb, params, x, y, out.options.resolved_prompt_dropout),
            "infer_images_per_s": infer_speed(lambda b: forward_logits(bb, b, table, slot), x)}


def adapt_full(weights: Path, data: dict[str, list], args: argparse.Namespace) -> dict:
    """Every weight, AdamW (the paper's fine-tuning optimizer), lr searched on val like the others."""
    best = None
    for lr in args.full_lrs:
        torch.manual_seed(args.seed)
        model = timm.create_model(NAME, pretrained=False, **{**KWARGS, "num_classes": 5})
        missing, _ = model.load_state_dict(load_file(str(weights)), strict=False)  # the frozen backbone's start
        assert set(missing) == {"head.weight", "head.bias"}, missing
        model, acc, epoch, _ = fit_all_weights(model, data["train"], data["val"], args.epochs, lr=lr, wd=0.01,
                                               seed=args.seed)
        if best is None or acc > best[1]:
            best = (model, acc, epoch, lr)
    model, acc, best_epoch, lr = best
    x, y = batches(data["train"], 32, None)[0]
    model.train()
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t0)
    return {"val_acc": acc, "test_acc": accuracy(model, data["test"]), "best_epoch": best_epoch,
            "trainable_params": sum(p.numel() for p in model.parameters()), "lr": lr,
            "train_images_per_s": x.shape[0] / float(np.median(times[1:])),
            "infer_images_per_s": infer_speed(model.eval(), x)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30, help="adaptation epochs, equal for every method")
    ap.add_argument("--pretrain-epochs", type=int, default=40)
    ap.add_argument("--shots", type=int, default=40, help="training images per new class")
    ap.add_argument("--val", type=int, default=20, help="validation images per new class (lr selection)")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.05, 0.25, 1.0, 5.0, 25.0],
                    help="base lrs searched for the prompt methods")
    ap.add_argument("--full-lrs", type=float, nargs="+", default=[1e-4, 3e-4, 1e-3], help="AdamW lrs, full FT")
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--auto-lr", type=float, default=1.0, help="base lr of every auto candidate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = device_name(torch.device("cpu"))
    started = time.perf_counter()
    up_train, up_val = split(*digits(range(5)), (140,), args.seed)  # ~180 images per digit
    train, val, test = split(*digits(range(5, 10)), (args.shots, args.val), args.seed)
    data = {"train": train, "val": val, "test": test}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "vit_digits04.safetensors"
        print(json.dumps({"bench": "transfer_digits", **pretrain(up_train, up_val, args.pretrain_epochs, args.seed,
                                                                  weights), "device": device}), flush=True)
        bb = load_backbone(NAME, weights=weights, model_kwargs=KWARGS)
        results = {m: adapt_prompted(bb, m, data, args) for m in args.methods}
        results["full"] = adapt_full(weights, data, args)
    full = results["full"]
    for method, r in results.items():
        print(json.dumps({
            "bench": "transfer_digits", "method": method, "chosen": r.get("chosen"), "classes": "5-9", "test_acc": round(r["test_acc"], 4),
            "val_acc": round(r["val_acc"], 4), "best_epoch": r["best_epoch"], "epochs": args.epochs, "lr": r["lr"],
            "trainable_params": r["trainable_params"],
            "train_images": len(train), "val_images": len(val), "test_images": len(test),
            "train_images_per_s": round(r["train_images_per_s"], 1),
            "infer_images_per_s": round(r["infer_images_per_s"], 1),
            "params_vs_full": round(r["trainable_params"] / full["trainable_params"], 5),
            "test_acc_minus_full": round(r["test_acc"] - full["test_acc"], 4),
            "infer_speed_vs_full": round(r["infer_images_per_s"] / full["infer_images_per_s"], 3),
            "device": device}), flush=True)
    print(json.dumps({"bench": "transfer_digits", "total_seconds": round(time.perf_counter() - started, 1),
                      "device": device}), flush=True)


if __name__ == "__main__":
    main()
