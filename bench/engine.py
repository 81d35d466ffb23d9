"""Engine throughput: mixed-task VPT-Deep batch vs the prompt-free backbone, the official
formulation (prompts as tokens through every block) and grouped execution (one forward per task).

    .venv/bin/python bench/engine.py [--model vit_base_patch16_224] [--batch 16] [--prompts 10 50 200]

Prints one JSON line per prompt length. Random weights: speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vpt.backbone import Backbone, load_backbone
from vpt.engine import forward_features, stack_slots, task_slot_tensors
from vpt.task import TaskParams, TaskSpec


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def add_device_args(ap: argparse.ArgumentParser) -> None:
    """--model, --device and --dtype, as every engine-level bench takes them."""
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp32", choices=list(DTYPES))


def setup(args: argparse.Namespace) -> tuple[torch.device, Backbone, torch.Tensor]:
    """The device, `args.model` with random weights (seed 0) and a random (args.batch, 3, H, W) batch on it."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    bb = load_backbone(args.model, pretrained=False, device=device, dtype=dtype)
    images = torch.randn(args.batch, *bb.data_config["input_size"], device=device, dtype=dtype)  # (B, 3, H, W)
    return device, bb, images


def interleaved(fns: dict[str, Callable[[], object]], reps: int, device: torch.device) -> dict[str, float]:
    """Median seconds per call of each function, measured round-robin so that drifting background
    load hits every contender alike; one warm-up call each first."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def official_forward(bb: Backbone, images: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
    """Prompts as tokens: [CLS, P_b, patches], the prompt slice replaced in every block. prompts (B, L, p, d)."""
    m = bb.model
    x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(images))))  # (B, N0, d)
    n, p = m.num_prefix_tokens, prompts.shape[2]
    x = torch.cat([x[:, :n], prompts[:, 0], x[:, n:]], dim=1)           # (B, N0 + p, d)
    for layer, blk in enumerate(m.blocks):
        if layer > 0:
            x = torch.cat([x[:, :n], prompts[:, layer], x[:, n + p:]], dim=1)
        x = blk(x)
    return m.norm(x)[:, 0]                                               # (B, d)


def run(args: argparse.Namespace) -> None:
    device, bb, images = setup(args)
    dtype, B = images.dtype, args.batch
    slot = torch.arange(B, device=device) % args.tasks
    for p in args.prompts:
        tasks = [TaskParams.new(TaskSpec("vpt-deep", p, tuple(f"c{i}" for i in range(10))), bb)
                 for _ in range(args.tasks)]
        table = stack_slots(bb, [task_slot_tensors(bb, t) for t in tasks])
        prompts = torch.stack([t.prompts for t in tasks]).to(device, dtype)[slot]  # (B, L, p, d)
        singles = [stack_slots(bb, [task_slot_tensors(bb, t)]) for t in tasks]
        zero = torch.zeros(1, dtype=torch.long, device=device)

        def grouped(singles=singles, zero=zero) -> None:
            for b in range(B):
                forward_features(bb, images[b:b + 1], singles[int(slot[b])], zero)

        with torch.inference_mode():
            t = interleaved({
                "backbone": lambda: bb.model.forward_features(images),
                "engine": lambda table=table: forward_features(bb, images, table, slot),
                "official": lambda prompts=prompts: official_forward(bb, images, prompts),
                "grouped": grouped,
            }, args.reps, device)
            t_backbone, t_engine, t_official, t_grouped = t["backbone"], t["engine"], t["official"], t["grouped"]
            same = torch.allclose(forward_features(bb, images, table, slot).float(),
                                  official_forward(bb, images, prompts).float(), atol=1e-3, rtol=1e-3)
        print(json.dumps({
            "p": p, "model": args.model, "batch": B, "tasks": args.tasks, "dtype": args.dtype,
            "backbone_img_s": round(B / t_backbone, 2), "engine_img_s": round(B / t_engine, 2),
            "official_img_s": round(B / t_official, 2), "grouped_img_s": round(B / t_grouped, 2),
            "engine_vs_backbone": round(t_backbone / t_engine, 3),
            "engine_vs_official": round(t_official / t_engine, 3),
            "engine_matches_official": same, "device": device_name(device),
        }), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(ap)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--prompts", type=int, nargs="+", default=[10, 50, 200])
    ap.add_argument("--reps", type=int, default=5)
    run(ap.parse_args())


if __name__ == "__main__":
    main()
