"""`vpt-serve train` and `vpt-serve eval`: train a task file from a dataset, score one on a dataset.

DATASET is an archive (zip, tar, tar.gz, ...) or a directory in one of the accepted layouts
(class folders, train/ and val/ folders, or a manifest); a directory is packed into a temporary
tar and ingested with the same checks as an upload. The backbone is loaded as the server loads
it, from its settings (VPT_BACKBONE, VPT_BACKBONE_WEIGHTS, VPT_BACKBONE_KWARGS, VPT_DEVICE,
VPT_DTYPE) overridden by the --backbone, --backbone-weights, --backbone-kwargs, --device and
--dtype flags given; the dtype defaults to float32 rather than the server's auto. Errors print
`error: <code>: <message>` and exit with status 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from server.settings import DEFAULT_BACKBONE

EXIT_ERROR, EXIT_INTERRUPTED = 1, 130

_BACKBONE_FLAGS = ("backbone", "backbone_weights", "backbone_kwargs", "device", "dtype")  # Settings fields


class CliError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


def _backbone_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("backbone (flags left out come from the VPT_* settings)")
    g.add_argument("--backbone", help=f"timm model name (env VPT_BACKBONE; default {DEFAULT_BACKBONE})")
    g.add_argument("--backbone-weights",
                   help="local checkpoint instead of a download (env VPT_BACKBONE_WEIGHTS)")
    g.add_argument("--backbone-kwargs",
                   help="JSON object of timm.create_model arguments (env VPT_BACKBONE_KWARGS)")
    g.add_argument("--device", help="cpu, cuda, cuda:N or auto (env VPT_DEVICE; default auto)")
    g.add_argument("--dtype", help="backbone dtype (env VPT_DTYPE; default float32)")


_FLAG_TYPES: dict[str, Callable[[str], Any]] = {
    "integer": int, "number": float, "string": str,
    "array": lambda v: [s.strip() for s in v.split(",") if s.strip()],   # comma-separated
}


def add_option_flags(p: argparse.ArgumentParser) -> None:
    """One flag per training option, from the options schema (vpt/options.py); left out = its default."""
    from vpt.options import form_schema

    g = p.add_argument_group("training options (flags left out take their defaults)")
    for name, prop in form_schema().items():
        default = f" (default {prop['default']})" if "default" in prop else ""
        text = f"{prop.get('description', name)}{default}".replace("%", "%%")
        kind = prop.get("type", "string")
        g.add_argument(f"--{prop['x-flag'].replace('_', '-')}", dest=name, choices=prop.get("enum"),
                       type=_FLAG_TYPES.get(kind, str), metavar=None if "enum" in prop else kind.upper(), help=text)


def add_train_commands(subparsers: argparse._SubParsersAction) -> None:
    """Add `train` and `eval`; each sets `func(args) -> exit status`."""
    t = subparsers.add_parser("train", help="train a task file from a dataset",
                              description="Train a task (prompts + head) on the frozen backbone.")
    t.add_argument("dataset", type=Path, help="dataset archive or directory")
    t.add_argument("--task", help="task name, recorded in the file; the default output is TASK.safetensors")
    t.add_argument("--out", type=Path, help="output task file")
    add_option_flags(t)
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    _backbone_flags(t)
    t.set_defaults(func=train_command)

    e = subparsers.add_parser("eval", help="score a task file on a labelled dataset",
                              description="Accuracy of a task file on every image of a dataset.")
    e.add_argument("task_file", type=Path)
    e.add_argument("dataset", type=Path, help="dataset archive or directory")
    e.add_argument("--per-class", action="store_true", help="also print each class's accuracy")
    e.add_argument("--split", choices=("all", "train", "val"), default="all",
                   help="which images of the dataset to score (default: %(default)s)")
    e.add_argument("--batch-size", type=int, default=64)
    e.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    _backbone_flags(e)
    e.set_defaults(func=eval_command)


def _run_reporting_errors(body: Callable[[], int]) -> int:
    from vpt.errors import VPTError

    try:
        return body()
    except KeyboardInterrupt:
        print("error: cancelled: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (CliError, VPTError) as e:
        code = getattr(e, "code", None) or _code_for(e)
        print(f"error: {code}: {getattr(e, 'message', None) or e}", file=sys.stderr)
        return EXIT_ERROR


def _code_for(e: Exception) -> str:
    from vpt.errors import BackboneError

    return "backbone_unavailable" if isinstance(e, BackboneError) else "error"


def _load_backbone(args: argparse.Namespace) -> Any:
    """The backbone the server would load, from the VPT_* settings overridden by the given flags."""
    import torch
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from server.settings import Settings, settings_problems
    from server.state import build_backbone

    given = {name: getattr(args, name) for name in _BACKBONE_FLAGS if getattr(args, name) is not None}
    try:
        settings = Settings(**given)
    except (ValidationError, SettingsError) as e:
        raise CliError("invalid_parameter", settings_problems(e, _BACKBONE_FLAGS)) from e
    if "dtype" not in settings.model_fields_set:  # neither --dtype nor VPT_DTYPE: float32, not the server's auto
        settings = settings.model_copy(update={"dtype": "float32"})
    if settings.device != "auto":
        try:
            torch.device(settings.device)
        except RuntimeError as e:
            raise CliError("invalid_parameter", f"--device {settings.device!r}: {e}") from e
    return build_backbone(settings)


def _as_archive(dataset: Path, tmp: Path) -> Path:
    """An archive path for `dataset`: itself, or a tar of the directory's files."""
    if dataset.is_file():
        return dataset
    if not dataset.is_dir():
        raise CliError("dataset_not_found", f"{dataset} is neither a file nor a directory")
    archive = tmp / "dataset.tar"
    with tarfile.open(archive, "w") as tf:
        for path in sorted(dataset.rglob("*")):
            if path.is_file() and not path.is_symlink():
                tf.add(path, path.relative_to(dataset).as_posix(), recursive=False)
    return archive


def _options(args: argparse.Namespace) -> Any:
    from vpt.options import TrainOptions

    return TrainOptions(**{name: getattr(args, name) for name in TrainOptions.model_fields
                           if getattr(args, name, None) is not None})


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Bar:
    """A tqdm bar fed by progress events."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.bar, self.run = enabled, None, 0

    def __call__(self, event: Any) -> None:
        if not self.enabled:
            return
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=event.steps * event.runs, unit="step", file=sys.stderr, dynamic_ncols=True)
        if event.runs > 1 and event.run != self.run:
            self.run = event.run
            self.bar.set_description(f"run {event.run}/{event.runs} lr {event.base_lr:g} wd {event.weight_decay:g}")
        post = {"epoch": f"{event.epoch}/{event.epochs}", "loss": f"{event.loss:.4f}", "lr": f"{event.lr:.4g}"}
        if event.val_acc is not None:
            post["val_acc"] = f"{event.val_acc:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update((event.run - 1) * event.steps + event.step - self.bar.n)  # redraws at tqdm's own pace

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_command(args: argparse.Namespace) -> int:
    return _run_reporting_errors(lambda: _train(args))


def _train(args: argparse.Namespace) -> int:
    from vpt.pipeline import train_task_from_archive

    if args.out is None and not args.task:
        raise CliError("invalid_parameter", "give --out FILE or --task NAME (written to NAME.safetensors)")
    out = args.out or Path(f"{args.task}.safetensors")
    options = _options(args)
    backbone = _load_backbone(args)
    bar = _Bar(not args.no_progress)
    with tempfile.TemporaryDirectory(prefix="vpt-train-") as tmp:
        archive = _as_archive(args.dataset, Path(tmp))
        try:
            result = train_task_from_archive(archive, Path(tmp) / "work", backbone, options, on_progress=bar,
                                             extra={"task": args.task} if args.task else None)
        finally:
            bar.close()
    _write_atomic(out, result.task_file)
    m = result.metrics
    acc = "n/a (no validation images)" if m["val_accuracy"] is None else f"{m['val_accuracy']:.4f}"
    print(f"{result.spec.method}: val accuracy {acc}, best epoch {m['best_epoch']}/{options.epochs}, "
          f"{m['trainable_parameters']['total']} trainable parameters, {m['train_time_s']:.1f} s")
    print(f"wrote {out} ({len(result.task_file)} bytes)")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    return _run_reporting_errors(lambda: _eval(args))


def _eval(args: argparse.Namespace) -> int:
    from vpt.data import ImageDataset, ingest_archive
    from vpt.pipeline import evaluate
    from vpt.preprocess import to_uint8_hwc
    from vpt.task import load_task_file
    from vpt.train import TrainOptions

    if not args.task_file.is_file():
        raise CliError("task_file_not_found", f"{args.task_file} does not exist")
    if args.batch_size < 1:
        raise CliError("invalid_parameter", "--batch-size must be at least 1")
    backbone = _load_backbone(args)
    task = load_task_file(args.task_file.read_bytes(), backbone)
    with tempfile.TemporaryDirectory(prefix="vpt-eval-") as tmp:
        data = ingest_archive(_as_archive(args.dataset, Path(tmp)), Path(tmp) / "data")
        classes = task.spec.classes
        unknown = [c for c in data.classes if c not in classes]
        if unknown:
            raise CliError("class_mismatch", f"dataset classes unknown to the task: {unknown[:20]}; "
                           f"the task has {list(classes)[:20]}")
        index = [classes.index(c) for c in data.classes]
        picked = {"all": list(data.train) + list(data.val or ()), "train": list(data.train),
                  "val": list(data.val or ())}[args.split]
        if not picked:
            raise CliError("invalid_parameter", f"the dataset has no {args.split} images")
        samples = [(path, index[label]) for path, label in picked]
        options = TrainOptions(batch_size=args.batch_size)
        report = evaluate(backbone, task.params.to(backbone.device), ImageDataset(samples, to_uint8_hwc), classes,
                          options, batch_size=args.batch_size)   # uint8 images, preprocessed as the engine does
    _print_report(report, args)
    return 0


def _print_report(report: Any, args: argparse.Namespace) -> None:
    if args.json:
        out = report.to_dict()
        if not args.per_class:
            out = {"accuracy": out["accuracy"], "num_samples": out["num_samples"]}
        print(json.dumps(out))
        return
    correct = round(report.accuracy * report.num_samples)
    print(f"accuracy {report.accuracy:.4f} ({correct}/{report.num_samples} images)")
    if args.per_class:
        width = max(len(c) for c in report.classes)
        for name, acc, n in zip(report.classes, report.per_class, report.support):
            if n:
                print(f"  {name:<{width}}  {acc:.4f}  ({n} images)")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m server.cli_train train|eval ...` (the same commands as `vpt-serve`)."""
    parser = argparse.ArgumentParser(prog="vpt-serve")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
