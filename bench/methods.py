"""Every tuning method in one mixed batch vs the prompt-free backbone, each method alone, and grouped
execution (one forward per task).

    .venv/bin/python bench/methods.py [--model vit_base_patch16_224] [--batch 32] [--device cuda --dtype bf16]

One JSON line per case: images/s and the ratio to the prompt-free backbone measured in the same
run (cases are timed round-robin). Random weights: speed does not depend on their values.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import add_device_args, device_name, interleaved, setup
from vpt.backbone import Backbone
from vpt.engine import forward_logits, stack_slots, task_slot_tensors
from vpt.task import TaskParams, TaskSpec

# name -> (method, prompts, options)
METHODS = {
    "linear": ("linear", 0, {}),
    "vpt-shallow p=10": ("vpt-shallow", 10, {}),
    "vpt-deep p=10": ("vpt-deep", 10, {}),
    "bias": ("bias", 0, {}),
    "vpt-deep+bias p=10": ("vpt-deep+bias", 10, {}),
    "adapter r=64": ("adapter", 0, {"adapter_reduction": 64}),
    "partial-1": ("partial-1", 0, {}),
    "linear mlp-3": ("linear", 0, {"head": "mlp-3"}),
}
TARGET_MIX = ("linear", "vpt-deep p=10", "bias", "adapter r=64")   # the mix whose target is >= 0.85x


def make_task(bb: Backbone, name: str, seed: int) -> TaskParams:
    method, p, options = METHODS[name]
    spec = TaskSpec(method, p, tuple(f"c{i}" for i in range(10)), **options)
    return TaskParams.new(spec, bb, generator=torch.Generator().manual_seed(seed))


def run(args: argparse.Namespace) -> None:
    device, bb, images = setup(args)
    B = args.batch
    tasks = {name: make_task(bb, name, i) for i, name in enumerate(METHODS)}
    slots = {name: task_slot_tensors(bb, t) for name, t in tasks.items()}

    def mixed(names: tuple[str, ...]):
        table = stack_slots(bb, [slots[n] for n in names])
        slot = torch.arange(B, device=device) % len(names)
        return lambda: forward_logits(bb, images, table, slot)

    def grouped(names: tuple[str, ...]):
        owner = torch.arange(B) % len(names)
        groups = [(stack_slots(bb, [slots[n]]), (owner == i).nonzero()[:, 0].to(device))
                  for i, n in enumerate(names) if (owner == i).any()]

        def run_groups() -> None:
            for table, idx in groups:   # one forward per task over its own images
                forward_logits(bb, images[idx], table, torch.zeros(len(idx), dtype=torch.long, device=device))
        return run_groups

    cases = {"backbone": lambda: bb.model.forward_features(images),
             "mixed all": mixed(tuple(METHODS)), "mixed target": mixed(TARGET_MIX),
             "grouped all": grouped(tuple(METHODS))}
    cases.update({f"alone {name}": mixed((name,)) for name in (args.alone or METHODS)})
    with torch.inference_mode():
        t = interleaved(cases, args.reps, device)
    for case, seconds in t.items():
        line = {"case": case, "model": args.model, "batch": B, "dtype": args.dtype, "img_s": round(B / seconds, 2),
                "vs_backbone": round(t["backbone"] / seconds, 3), "device": device_name(device)}
        if case == "mixed target":
            line.update({"methods": list(TARGET_MIX), "target": 0.85, "meets_target": t["backbone"] / seconds >= 0.85})
        elif case.endswith("all"):
            line["methods"] = list(METHODS)
        print(json.dumps(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(ap)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--alone", nargs="*", choices=list(METHODS), help="methods timed alone (default: all)")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
