"""`vpt-serve train` and `vpt-serve eval` on real digit archives and folders, with the tiny ViT."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from server.cli_train import add_train_commands
from tests.fixtures.digits import make_digits_tree, make_digits_zip
from tests.fixtures.vit import TINY_NAME, save_tiny_vit
from vpt.backbone import load_backbone
from vpt.task import load_task_file

ROOT = Path(__file__).resolve().parents[2]
TRAIN = ["--method", "vpt-deep", "--prompts", "3", "--epochs", "2", "--batch-size", "8", "--lr", "2.0",
         "--augmentation", "none", "--seed", "1", "--no-progress"]


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vpt-serve")
    add_train_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


@pytest.fixture
def env(tiny_vit_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The backbone comes from VPT_BACKBONE* (the flags default to them)."""
    for k, v in tiny_vit_env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("VPT_DEVICE", "cpu")
    return tiny_vit_env


def test_train_then_eval(env: dict[str, str], digits_small_zip: Path, tmp_path: Path,
                         capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "digits.safetensors"
    assert cli(["train", str(digits_small_zip), "--task", "digits", "--out", str(out), *TRAIN]) == 0
    printed = capsys.readouterr().out
    assert "vpt-deep: val accuracy" in printed and f"wrote {out}" in printed
    bb = load_backbone(env["VPT_BACKBONE"], weights=env["VPT_BACKBONE_WEIGHTS"],
                       model_kwargs=json.loads(env["VPT_BACKBONE_KWARGS"]))
    task = load_task_file(out.read_bytes(), bb)
    assert task.spec.num_prompts == 3 and task.metadata["task"] == "digits"
    assert json.loads(task.metadata["training"])["options"]["seed"] == 1

    assert cli(["eval", str(out), str(digits_small_zip), "--per-class"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("accuracy ") and lines[0].endswith("/24 images)")
    assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]

    assert cli(["eval", str(out), str(digits_small_zip), "--json", "--per-class"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 24 and len(report["confusion_matrix"]) == 3
    assert f"({round(report['accuracy'] * 24)}/24 images)" in lines[0]


def test_a_directory_dataset_and_the_default_output_name(env: dict[str, str], tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    tree = make_digits_tree(tmp_path / "tree", classes=range(2), per_class=6)
    monkeypatch.chdir(tmp_path)
    assert cli(["train", str(tree), "--task", "pair", "--method", "linear", "--epochs", "1", "--no-progress"]) == 0
    assert (tmp_path / "pair.safetensors").is_file()
    assert "linear: val accuracy" in capsys.readouterr().out


@pytest.mark.parametrize("argv,code", [
    (["train", "{missing}", "--out", "{out}"], "dataset_not_found"),
    (["train", "{corrupt}", "--out", "{out}"], "dataset_archive_invalid"),
    (["train", "{zip}", "--out", "{out}", "--epochs", "0"], "invalid_parameter"),
    (["train", "{zip}", "--out", "{out}", "--backbone-kwargs", "{{nope"], "invalid_parameter"),
    (["train", "{zip}"], "invalid_parameter"),  # neither --out nor --task
    (["eval", "{other_task}", "{zip}"], "backbone_mismatch"),
    (["eval", "{missing}", "{zip}"], "task_file_not_found"),
])
def test_errors_print_a_code_and_write_nothing(argv: list[str], code: str, env: dict[str, str],
                                               digits_small_zip: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    corrupt = tmp_path / "corrupt.zip"
    corrupt.write_bytes(digits_small_zip.read_bytes()[:300])
    other = tmp_path / "other.safetensors"
    if "{other_task}" in argv:  # a task trained on a different backbone
        other_vit = save_tiny_vit(tmp_path / "other_vit.safetensors", seed=5)
        assert cli(["train", str(digits_small_zip), "--out", str(other), "--method", "linear", "--epochs", "1",
                    "--no-progress", "--backbone-weights", str(other_vit)]) == 0
        capsys.readouterr()
    paths = {"missing": tmp_path / "missing", "corrupt": corrupt, "zip": digits_small_zip,
             "out": tmp_path / "out.safetensors", "other_task": other}
    assert cli([a.format(**paths) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {code}: ")
    assert not (tmp_path / "out.safetensors").exists()


def test_the_module_runs_as_a_program(env: dict[str, str], digits_small_zip: Path, tmp_path: Path) -> None:
    out = tmp_path / "t.safetensors"
    run = subprocess.run([sys.executable, "-m", "server.cli_train", "train", str(digits_small_zip), "--out",
                          str(out), "--method", "linear", "--epochs", "1", "--backbone", TINY_NAME],
                         cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    assert out.is_file() and "wrote" in run.stdout
    bad = subprocess.run([sys.executable, "-m", "server.cli_train", "eval", str(out), str(tmp_path / "none")],
                         cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error: dataset_not_found:")


def test_training_validation_is_what_eval_and_the_engine_give(env: dict[str, str], tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """One preprocessing: the val accuracy training measures, `vpt-serve eval` on the val split and the
    engine's path (front-end decode, batched device preprocessing, grouped heads) agree image by image."""
    from server.frontend.images import ImageDecoder
    from vpt.data import ImageDataset, ingest_archive
    from vpt.engine import forward_grouped, pack_slots, task_slot_tensors
    from vpt.preprocess import Preprocessor, to_uint8_hwc
    from vpt.train import TrainOptions, make_loader, predict

    archive = make_digits_zip(tmp_path / "d.zip", classes=range(4), per_class=10, layout="split", val_per_class=4)
    out = tmp_path / "t.safetensors"
    argv = ["--method", "vpt-deep", "--prompts", "2", "--epochs", "2", "--batch-size", "8", "--lr", "2.0",
            "--augmentation", "fgvc", "--seed", "3", "--no-progress"]   # fgvc: the batched augmentation trains
    assert cli(["train", str(archive), "--out", str(out), *argv]) == 0
    bb = load_backbone(env["VPT_BACKBONE"], weights=env["VPT_BACKBONE_WEIGHTS"],
                       model_kwargs=json.loads(env["VPT_BACKBONE_KWARGS"]))
    task = load_task_file(out.read_bytes(), bb)
    metrics = json.loads(task.metadata["metrics"])
    trained = metrics["best_val_accuracy"]                      # measured by the training loop, kept epoch
    assert trained == metrics["epochs"][metrics["best_epoch"] - 1]["val_accuracy"] == metrics["val_accuracy"]
    capsys.readouterr()

    assert cli(["eval", str(out), str(archive), "--split", "val", "--json", "--per-class"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_samples"] == 16 and report["accuracy"] == trained
    assert report["confusion_matrix"] == metrics["confusion_matrix"]

    data = ingest_archive(archive, tmp_path / "data")
    classes = list(task.spec.classes)
    val = [(path, classes.index(data.classes[label])) for path, label in data.val]
    loader = make_loader(ImageDataset(val, to_uint8_hwc), 8, False, None, TrainOptions(num_workers=0), bb.device)
    _, train_preds, labels = predict(bb, task.params, loader, amp=False)     # the training loop's validation
    decoder = ImageDecoder(max_pixels=10**7)
    raw = [torch.from_numpy(decoder.decode_one(p.read_bytes(), p.name).copy()) for p, _ in val]  # as front ends do
    decoder.close()
    slots = [task_slot_tensors(bb, task.params)]
    with torch.inference_mode():
        images = Preprocessor(bb.data_config)(raw, bb.device, bb.dtype)     # the engine's batch preprocessing
        (rows, logits), = forward_grouped(bb, images, pack_slots(bb, slots), slots, [0] * len(raw))
    engine_preds = torch.empty(len(raw), dtype=torch.long)
    engine_preds[rows] = logits.argmax(dim=1).cpu()
    assert torch.equal(engine_preds, train_preds)                          # exact predictions, image by image
    assert (engine_preds == labels).float().mean().item() == pytest.approx(trained, abs=1e-12)
