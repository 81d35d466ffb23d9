"""The `vpt` command line: output, --json, exit codes and error lines, against the scripted server."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from vpt_client.cli import main

from tests.client import samples
from tests.client.fake_server import FakeServer, error, raw, reply, sse


def run(server: FakeServer, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["--base-url", server.url, "--api-key", "k-cli", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tasks_table_detail_and_json(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.on("GET", "/tasks", reply(200, {"tasks": [samples.TASK]}))
    server.on("GET", "/tasks/digits", reply(200, samples.TASK))
    code, out, _ = run(server, capsys, "tasks")
    assert code == 0
    header, row = out.splitlines()
    assert header.split() == ["TASK", "VERSION", "VERSIONS", "METHOD", "PROMPTS", "CLASSES", "SIZE", "UPDATED"]
    assert row.split()[:6] == ["digits", "2", "2", "vpt-deep", "10", "3"]
    code, out, _ = run(server, capsys, "tasks", "digits")
    assert code == 0 and "fingerprint  sha256:ab12" in out and "classes      0, 1, 2" in out
    code, out, _ = run(server, capsys, "tasks", "--json")
    assert code == 0 and json.loads(out)[0]["task_id"] == "digits"
    assert server.requests[0].headers["authorization"] == "Bearer k-cli"


def test_predict_table_and_json(server: FakeServer, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"\x89PNG\r\n\x1a\n1")
    b.write_bytes(b"\x89PNG\r\n\x1a\n2")
    server.on("POST", "/predict", reply(200, samples.PREDICTION))
    code, out, _ = run(server, capsys, "predict", "digits", str(a), str(b), "--top-k", "2")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["IMAGE", "RANK", "LABEL", "SCORE"]
    assert lines[1].split() == [str(a), "1", "7", "0.9000"]
    assert lines[2].split() == ["2", "1", "0.0500"]
    assert lines[3].split() == [str(b), "1", "3", "0.8000"]
    assert server.requests[0].query == {"task": ["digits"], "top_k": ["2"]}
    assert len(server.requests[0].files) == 2
    code, out, _ = run(server, capsys, "--json", "predict", "digits", str(a))
    assert code == 0 and json.loads(out)["results"][0]["top_k"][0]["label"] == "7"


def test_train_follows_events_and_prints_summary(server: FakeServer, capsys: pytest.CaptureFixture[str],
                                                 tmp_path: Path) -> None:
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.png").write_bytes(b"\x89PNG")
    server.on("POST", "/tasks/digits/train", reply(202, samples.job("queued", epoch=None)))
    server.on("GET", "/jobs/j-1/events", sse([("progress", samples.job("running", epoch=e)) for e in (1, 2, 3)]
                                             + [("progress", samples.job("succeeded", 4, version=3)),
                                                ("end", "{}")]))
    code, out, err = run(server, capsys, "train", "digits", str(tmp_path), "--method", "vpt-deep", "--prompts",
                         "10", "--epochs", "4", "--batch-size", "8", "--lr", "0.5", "--weight-decay", "0.001",
                         "--sweep", "small", "--seed", "3")
    assert code == 0
    assert out.strip() == "task digits: version 3 trained  val_acc=0.93"
    assert server.requests[0].form == {"method": "vpt-deep", "num_prompts": "10", "epochs": "4", "batch_size": "8",
                                       "base_lr": "0.5", "weight_decay": "0.001", "sweep": "small", "seed": "3"}
    assert "uploaded" in err and "job j-1 queued" in err
    bars = [line for line in err.splitlines() if line.startswith("[")]
    assert [b.split("]")[1].split()[1] for b in bars] == ["queued", "running", "running", "running", "succeeded"]
    assert bars[-1].startswith("[" + "#" * 24 + "] 100%")


def test_train_failed_job_exits_1(server: FakeServer, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    failed = samples.job("failed", error={"code": "dataset_too_few_classes", "message": "need 2 classes"})
    server.on("POST", "/tasks/digits/train", reply(202, samples.job("queued", epoch=None)))
    server.on("GET", "/jobs/j-1/events", sse([("progress", failed), ("end", "{}")]))
    code, out, err = run(server, capsys, "--json", "train", "digits", str(tmp_path))
    assert code == 1
    assert json.loads(out)["state"] == "failed"
    assert err.strip().splitlines()[-1] == "error: dataset_too_few_classes: need 2 classes"


def test_train_prints_the_files_a_refused_dataset_names(server: FakeServer, capsys: pytest.CaptureFixture[str],
                                                         tmp_path: Path) -> None:
    (tmp_path / "x.png").write_bytes(b"\x89PNG")
    server.on("POST", "/tasks/digits/train", error(400, "dataset_corrupt_image", "images could not be decoded (2 files)",
                                                   details=["b/0.png", "b/7.png"]))
    code, out, err = run(server, capsys, "train", "digits", str(tmp_path))
    assert (code, out) == (1, "")
    assert err.splitlines()[-3:] == ["error: dataset_corrupt_image: images could not be decoded (2 files)",
                                     "  b/0.png", "  b/7.png"]
    failed = samples.job("failed", error={"code": "dataset_corrupt_image", "message": "images could not be decoded "
                                          "(1 files)", "details": ["c/9.png"]})  # found by the job, past the sample
    server.on("POST", "/tasks/digits/train", reply(202, samples.job("queued", epoch=None)))
    server.on("GET", "/jobs/j-1/events", sse([("progress", failed), ("end", "{}")]))
    code, _, err = run(server, capsys, "train", "digits", str(tmp_path))
    assert code == 1 and err.splitlines()[-2:] == ["error: dataset_corrupt_image: images could not be decoded "
                                                   "(1 files)", "  c/9.png"]


def test_train_no_wait_and_fallback_to_polling(server: FakeServer, capsys: pytest.CaptureFixture[str],
                                               tmp_path: Path) -> None:
    archive = tmp_path / "d.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a/x.png", b"\x89PNG")
    server.on("POST", "/tasks/d/train", reply(202, samples.job("queued", epoch=None)))
    code, out, _ = run(server, capsys, "train", "d", str(archive), "--no-wait")
    assert (code, out.strip()) == (0, "job j-1 queued (task d)")
    assert server.calls("GET") == []
    # an event stream that keeps closing without events: the CLI polls GET /jobs/{id} instead
    server.reset()
    server.on("POST", "/tasks/d/train", reply(202, samples.job("queued", epoch=None)))
    server.on("GET", "/jobs/j-1/events", raw(200, b"", "text/event-stream"))
    server.on("GET", "/jobs/j-1", reply(200, samples.job("succeeded", 4, version=1)))
    code, out, _ = run(server, capsys, "train", "d", str(archive))
    assert code == 0 and out.strip().startswith("task digits: version 1 trained")
    assert len(server.calls("GET", "/jobs/j-1")) >= 1


def test_error_lines_and_exit_codes(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.on("POST", "/jobs/j-1/cancel", error(409, "job_finished", "job j-1 already succeeded"))
    server.on("GET", "/tasks/nope/versions", error(404, "task_not_found", "no task nope"))
    code, out, err = run(server, capsys, "cancel", "j-1")
    assert (code, out, err) == (1, "", "error: job_finished: job j-1 already succeeded\n")
    code, _, err = run(server, capsys, "versions", "nope")
    assert (code, err) == (1, "error: task_not_found: no task nope\n")
    with pytest.raises(SystemExit) as usage:
        main(["activate", "digits", "not-a-number"])
    assert usage.value.code == 2
    assert main([]) == 2
    capsys.readouterr()


def test_remaining_commands(server: FakeServer, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    server.on("GET", "/tasks/digits/versions", reply(200, {"versions": [samples.VERSION | {"version": 2,
                                                                                     "current": True}]}))
    server.on("POST", "/tasks/digits/versions/2/activate", reply(200, samples.TASK))
    server.on("DELETE", "/tasks/digits", reply(204))
    server.on("GET", "/jobs", reply(200, {"jobs": [samples.job("running", epoch=2)]}))
    server.on("GET", "/jobs/j-1", reply(200, samples.job("running", epoch=2)))
    server.on("POST", "/jobs/j-1/cancel", reply(200, samples.job("cancelled")))
    server.on("GET", "/tasks/digits/export", raw(200, b"blob" * 100, "application/octet-stream"))
    server.on("PUT", "/tasks/digits/import", reply(201, samples.TASK))
    server.on("GET", "/backbone", reply(200, samples.BACKBONE))
    server.on("GET", "/healthz", reply(200, {"status": "ok"}))
    server.on("GET", "/readyz", error(503, "not_ready", "loading", {"backbone": "loading"}))
    expect = [
        (["versions", "digits"], lambda o: o.splitlines()[1].split()[:3] == ["2", "*", "vpt-shallow"]),
        (["activate", "digits", "2"], lambda o: o == "task digits: version 2 is current\n"),
        (["delete", "digits"], lambda o: o == "deleted task digits\n"),
        (["jobs", "--task", "digits"], lambda o: o.splitlines()[1].split()[:4] == ["j-1", "digits", "running", "50%"]),
        (["job", "j-1"], lambda o: "epoch 2/4" in o and "state     running" in o),
        (["cancel", "j-1"], lambda o: o == "job j-1 cancelled\n"),
        (["export", "digits", "-o", str(tmp_path / "t.vpt"), "--version", "2"], lambda o: o.startswith("wrote ")),
        (["import", "digits", str(tmp_path / "t.vpt")], lambda o: o == "task digits: imported as version 2\n"),
        (["backbone"], lambda o: "embed_dim      64" in o and "input_size     3, 32, 32" in o),
    ]
    for argv, check in expect:
        code, out, err = run(server, capsys, *argv)
        assert code == 0, (argv, err)
        assert check(out), (argv, out)
    assert server.calls("GET", "/jobs")[0].query == {"task": ["digits"]}
    assert server.calls("GET", "/tasks/digits/export")[0].query == {"version": ["2"]}
    assert server.calls("PUT")[0].body == b"blob" * 100
    code, out, _ = run(server, capsys, "health", "--json")
    assert code == 1 and json.loads(out)["ready"]["checks"] == {"backbone": "loading"}


def test_console_script_runs(server: FakeServer) -> None:
    exe = shutil.which("vpt", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("the `vpt` console script is not installed (pip install -e ./client)")
    server.on("GET", "/jobs/j-1", error(404, "job_not_found", "no job j-1"))
    server.on("GET", "/backbone", reply(200, samples.BACKBONE))
    env = os.environ | {"VPT_BASE_URL": server.url, "VPT_API_KEY": "k-env"}
    done = subprocess.run([exe, "job", "j-1"], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert (done.returncode, done.stdout, done.stderr) == (1, "", "error: job_not_found: no job j-1\n")
    done = subprocess.run([exe, "--json", "backbone"], capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert done.returncode == 0 and json.loads(done.stdout)["name"] == samples.BACKBONE["name"]
    assert server.calls("GET", "/backbone")[0].headers["authorization"] == "Bearer k-env"


def test_train_has_a_flag_for_every_server_option(server: FakeServer, capsys: pytest.CaptureFixture[str],
                                                   tmp_path: Path) -> None:
    from vpt_client._train_options import FIELDS

    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "x.png").write_bytes(b"\x89PNG")
    server.on("POST", "/tasks/digits/train", reply(202, samples.job("queued", epoch=None)))
    values = {name: prop["enum"][-1] if "enum" in prop else {"integer": "3", "number": "0.5"}.get(prop["type"], "x")
              for name, prop in FIELDS.items()}
    argv = ["train", "digits", str(tmp_path), "--no-wait"]
    for name, value in values.items():
        argv += [f"--{FIELDS[name]['x-flag'].replace('_', '-')}", value]
    code, _, err = run(server, capsys, *argv)
    assert code == 0, err
    # array options are comma-separated on the command line and sent as a JSON list
    expected = {name: json.dumps([v]) if FIELDS[name].get("type") == "array" else v for name, v in values.items()}
    assert server.requests[0].form == expected
    for flag in ("--augmentation", "--keep", "--mixed-precision", "--workers", "--warmup-epochs"):
        assert flag in argv


def test_small_outputs_say_what_happened(server: FakeServer, capsys: pytest.CaptureFixture[str]) -> None:
    server.on("GET", "/tasks", reply(200, {"tasks": []}))
    server.on("POST", "/jobs/j-1/cancel", reply(200, samples.job("running", epoch=2) | {"cancel_requested": True}))
    code, out, _ = run(server, capsys, "tasks")
    assert code == 0 and out.startswith("no tasks yet") and "vpt train" in out
    code, out, _ = run(server, capsys, "cancel", "j-1")
    assert code == 0 and out == "job j-1: cancel requested (it stops at its next training step)\n"


def test_sweep_progress_names_the_run() -> None:
    from vpt_client import _cli_format as fmt
    from vpt_client.models import Job

    job = samples.job("running", epoch=2)
    job["progress"] |= {"run": 2, "runs": 6, "base_lr": 5.0, "weight_decay": 0.001}
    assert "run 2/6 (lr 5, wd 0.001)" in fmt.job_line(Job.model_validate(job))
    assert "run " not in fmt.job_line(Job.model_validate(samples.job("running", epoch=2)))
