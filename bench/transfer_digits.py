"""The paper's setting in miniature: pre-train a ViT, freeze it, adapt it to new classes.

A small ViT (6 blocks, d=96, 3 heads, 32x32 inputs in 8x8 patches) is fully trained (all weights,
AdamW) on scikit-learn's digits 0-4, saved, and loaded back as the frozen backbone. It is then
adapted to digits 5-9 from `--shots` images per class with linear probing, VPT-Shallow and
VPT-Deep (vpt.train, the recipe the server runs) and with full fine-tuning (all weights, AdamW),
all for the same number of epochs; the rest of digits 5-9 is the validation set.

    .venv/bin/python bench/transfer_digits.py [--epochs 30] [--shots 40] [--pretrain-epochs 20]

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

from vpt.backbone import Backbone, load_backbone  # noqa: E402
from vpt.engine import forward_logits, stack_slots, task_slot_tensors, training_table  # noqa: E402
from vpt.task import TaskParams  # noqa: E402
from vpt.train import TrainOptions, lr_multiplier, train_task  # noqa: E402

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


def split(x: Tensor, y: Tensor, per_class: int | None, fraction: float, seed: int) -> tuple[list, list]:
    """(train, val) lists of (image, label): `per_class` (or `fraction`) of each class trains."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in y.unique().tolist():
        idx = (y == c).nonzero()[:, 0]
        idx = idx[torch.randperm(len(idx), generator=g)]
        n = per_class if per_class is not None else int(len(idx) * fraction)
        train += [(x[i], int(y[i])) for i in idx[:n]]
        val += [(x[i], int(y[i])) for i in idx[n:]]
    return train, val


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
    times = []
    with torch.inference_mode():
        for _ in range(6):
            t0 = time.perf_counter()
            fn(batch)
            times.append(time.perf_counter() - t0)
    return batch.shape[0] / float(np.median(times[1:]))


def adapt_prompted(bb: Backbone, method: str, train: list, val: list, args: argparse.Namespace) -> dict:
    options = TrainOptions(method=method, num_prompts=args.prompts, epochs=args.epochs, batch_size=32,
                           base_lr=args.lr[method], weight_decay=1e-4, augmentation="none", seed=args.seed)
    out = train_task(bb, [str(c) for c in range(5, 10)], train, val, options)
    x, y = batches(train, 32, None)[0]
    params = copy.deepcopy(out.params).requires_grad_(True)
    table = stack_slots(bb, [task_slot_tensors(bb, out.params)])
    slot = torch.zeros(x.shape[0], dtype=torch.long)
    return {"val_acc": out.best_val_acc, "best_epoch": out.best_epoch,
            "trainable_params": out.params.num_trainable()["total"], "base_lr": options.base_lr,
            "train_images_per_s": step_speed(bb, params, x, y, options.resolved_prompt_dropout),
            "infer_images_per_s": infer_speed(lambda b: forward_logits(bb, b, table, slot), x)}


def adapt_full(weights: Path, train: list, val: list, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = timm.create_model(NAME, pretrained=False, **{**KWARGS, "num_classes": 5})
    missing, _ = model.load_state_dict(load_file(str(weights)), strict=False)  # the frozen backbone's start
    assert set(missing) == {"head.weight", "head.bias"}, missing
    model, acc, best_epoch, _ = fit_all_weights(model, train, val, args.epochs, lr=args.lr["full"], wd=0.01,
                                                seed=args.seed)
    x, y = batches(train, 32, None)[0]
    model.train()
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        times.append(time.perf_counter() - t0)
    model.eval()
    return {"val_acc": acc, "best_epoch": best_epoch, "trainable_params": sum(p.numel() for p in model.parameters()),
            "base_lr": args.lr["full"], "train_images_per_s": x.shape[0] / float(np.median(times[1:])),
            "infer_images_per_s": infer_speed(model, x)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=30, help="adaptation epochs, equal for every method")
    ap.add_argument("--pretrain-epochs", type=int, default=20)
    ap.add_argument("--shots", type=int, default=40, help="training images per new class")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.lr = {"linear": 10.0, "vpt-shallow": 10.0, "vpt-deep": 10.0, "full": 3e-4}
    device = device_name(torch.device("cpu"))
    up_train, up_val = split(*digits(range(0, 5)), None, 0.8, args.seed)
    down_train, down_val = split(*digits(range(5, 10)), args.shots, 0.0, args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "vit_digits04.safetensors"
        print(json.dumps({"bench": "transfer_digits", **pretrain(up_train, up_val, args.pretrain_epochs, args.seed,
                                                                  weights), "device": device}), flush=True)
        bb = load_backbone(NAME, weights=weights, model_kwargs=KWARGS)
        results = {m: adapt_prompted(bb, m, down_train, down_val, args) for m in ("linear", "vpt-shallow", "vpt-deep")}
        results["full"] = adapt_full(weights, down_train, down_val, args)
    full = results["full"]
    for method, r in results.items():
        print(json.dumps({
            "bench": "transfer_digits", "method": method, "classes": "5-9", "val_acc": round(r["val_acc"], 4),
            "best_epoch": r["best_epoch"], "epochs": args.epochs, "trainable_params": r["trainable_params"],
            "train_images": len(down_train), "val_images": len(down_val), "base_lr": r["base_lr"],
            "train_images_per_s": round(r["train_images_per_s"], 1),
            "infer_images_per_s": round(r["infer_images_per_s"], 1),
            "params_vs_full": round(r["trainable_params"] / full["trainable_params"], 5),
            "acc_minus_full": round(r["val_acc"] - full["val_acc"], 4), "device": device}), flush=True)


if __name__ == "__main__":
    main()
