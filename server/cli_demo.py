"""`vpt-serve demo DIR`: an offline demo that learns (no download): a demo backbone, a digits dataset,
a trained task, and the settings that serve them. See vpt/demo.py for what the data and backbone are.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path
from typing import Any

# The recipe the demo trains with (and the README's `vpt train` line repeats).
DEMO_OPTIONS: dict[str, Any] = {"method": "vpt-deep", "num_prompts": 4, "epochs": 20, "batch_size": 32,
                                "base_lr": 10.0, "weight_decay": 0.0, "augmentation": "none"}
HELD_OUT_PER_CLASS = 10


def add_demo_command(subparsers: argparse._SubParsersAction) -> None:
    d = subparsers.add_parser("demo", help="build an offline demo: backbone, digits dataset, a trained task",
                              description="Write a demo backbone (a small ViT trained on synthetic digits), a "
                                          "digits dataset and held-out images to DIR, train a task on them, "
                                          "and print the settings that serve it. Nothing is downloaded.")
    d.add_argument("dir", type=Path, nargs="?", default=Path("demo"), help="output folder (default: %(default)s)")
    d.add_argument("--no-train", action="store_true", help="only write the backbone and the data")
    d.add_argument("--per-class", type=int, default=30, help="training images per digit (default: %(default)s)")
    d.set_defaults(func=demo_command)


def demo_command(args: argparse.Namespace) -> int:
    from server.cli_train import _run_reporting_errors

    return _run_reporting_errors(lambda: _demo(args))


def _demo(args: argparse.Namespace) -> int:
    from vpt import demo

    out: Path = args.dir
    out.mkdir(parents=True, exist_ok=True)
    weights = out / "backbone.safetensors"
    if not weights.is_file():
        print(f"training the demo backbone (a 4-block ViT on synthetic digits) -> {weights}", file=sys.stderr)
        demo.pretrain_backbone(weights)
    archive = demo.write_digits_zip(out / "digits.zip", per_class=args.per_class, seed=1)
    held_out = demo.digit_images(HELD_OUT_PER_CLASS, seed=2)
    demo.write_images(out / "held_out", held_out)
    env = demo.settings_env(weights)
    (out / "demo.env").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
    print(f"wrote {weights}, {archive}, {out / 'held_out'}/ ({len(held_out)} images), {out / 'demo.env'}")
    if not args.no_train:
        accuracy = _train_and_score(out, archive, held_out, weights)
        print(f"task digits: held-out accuracy {accuracy:.3f} on {len(held_out)} images (chance 0.100); "
              f"wrote {out / 'digits.safetensors'}")
    exports = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items())
    flags = " ".join(f"--{_flag(k)} {v}" for k, v in DEMO_OPTIONS.items())
    print("serve it:\n"
          f"  {exports} vpt-serve serve\n"
          "then, from another shell:\n"
          f"  vpt import digits {out / 'digits.safetensors'}      # the task trained here, or train it again:\n"
          f"  vpt train digits {archive} {flags}\n"
          f"  vpt predict digits {out / 'held_out' / '3_3.png'}")
    return 0


def _flag(name: str) -> str:
    from vpt.options import form_schema

    return form_schema()[name]["x-flag"].replace("_", "-")


def _train_and_score(out: Path, archive: Path, held_out: list, weights: Path) -> float:
    from vpt import demo
    from vpt.backbone import load_backbone
    from vpt.data import ImageDataset
    from vpt.options import TrainOptions
    from vpt.pipeline import evaluate, train_task_from_archive
    from vpt.preprocess import to_uint8_hwc

    backbone = load_backbone(demo.DEMO_NAME, weights=weights, model_kwargs=demo.DEMO_KWARGS)
    options = TrainOptions(**DEMO_OPTIONS)
    with tempfile.TemporaryDirectory(prefix="vpt-demo-") as tmp:
        result = train_task_from_archive(archive, Path(tmp) / "work", backbone, options, extra={"task": "digits"})
        paths = demo.write_images(Path(tmp) / "held_out", held_out)
        data = ImageDataset([(p, digit) for p, (digit, _) in zip(paths, held_out)], to_uint8_hwc)
        report = evaluate(backbone, result_params(result, backbone), data, list(demo.CLASSES), options)
    (out / "digits.safetensors").write_bytes(result.task_file)
    (out / "digits.json").write_text(json.dumps({"held_out_accuracy": report.accuracy,
                                                 "val_accuracy": result.metrics["val_accuracy"]}))
    return report.accuracy


def result_params(result: Any, backbone: Any) -> Any:
    from vpt.task import load_task_file

    return load_task_file(result.task_file, backbone).params.to(backbone.device)
