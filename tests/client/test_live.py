"""The SDK (sync and async) and the CLI against a real vpt-serve process (tiny ViT, embedded mode)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import vpt_client as v
from vpt_client import AsyncClient, Client
from vpt_client.cli import main

from tests.fixtures.digits import digit_png, make_digits_tree
from tests.fixtures.live_server import ServerProcess

FAST = {"method": "vpt-deep", "num_prompts": 2, "epochs": 2, "batch_size": 8, "seed": 0}


def test_sdk_train_wait_predict_export_import_delete(live_server: ServerProcess, tmp_path: Path) -> None:
    data = make_digits_tree(tmp_path / "digits", classes=range(3), per_class=8)  # zipped by the client
    with Client(live_server.base_url) as client:
        assert client.ready().ready
        backbone = client.backbone()
        progress: list[v.Job] = []
        handle = client.train("live-sdk", data, **FAST)
        assert handle.state in ("queued", "running")
        job = handle.wait(timeout=300, poll_interval=0.2, on_progress=progress.append)
        assert job.succeeded and job.version == 1 and progress[-1].state == "succeeded"
        task = client.tasks.get("live-sdk")
        assert task.classes == ["0", "1", "2"] and task.backbone_fingerprint == backbone.fingerprint
        pred = client.predict("live-sdk", [digit_png(0, index=20), digit_png(2, index=20)], top_k=2)
        assert pred.task_id == "live-sdk" and pred.version == 1 and len(pred.results) == 2
        assert all(len(r.top_k) == 2 and r.label in task.classes for r in pred.results)
        exported = client.tasks.export("live-sdk", tmp_path / "live.vpt")
        assert exported.read_bytes() == client.tasks.export("live-sdk", version=1)
        copy = client.tasks.import_("live-copy", exported)
        assert copy.classes == task.classes and copy.current_version == 1
        assert client.predict("live-copy", digit_png(1, index=20)).results[0].label in task.classes
        assert [j.job_id for j in client.jobs.list(task="live-sdk")] == [job.job_id]
        with pytest.raises(v.ConflictError) as finished:
            client.jobs.cancel(job.job_id)
        assert finished.value.code == "job_finished"
        for name in ("live-sdk", "live-copy"):
            client.tasks.delete(name)
        with pytest.raises(v.NotFoundError) as gone:
            client.tasks.get("live-sdk")
        assert gone.value.code == "task_not_found" and gone.value.request_id


async def test_async_sdk_events_and_errors(live_server: ServerProcess, digits_small_zip: Path) -> None:
    async with AsyncClient(live_server.base_url) as client:
        handle = await client.train("live-async", digits_small_zip, **FAST)
        states = [job.state async for job in handle.events()]
        assert states[-1] == "succeeded" and handle.job.version == 1
        pred = await client.predict("live-async", digit_png(1, index=20))
        assert pred.results[0].label in ("0", "1", "2")
        versions = await client.tasks.versions("live-async")
        assert [(ver.version, ver.current) for ver in versions] == [(1, True)]
        with pytest.raises(v.BadRequestError) as bad:
            await client.predict("live-async", b"not an image")
        assert bad.value.status == 400 and bad.value.code == "image_invalid"
        await client.tasks.delete("live-async")


def test_live_invalid_dataset_maps_to_invalid_dataset_error(live_server: ServerProcess, tmp_path: Path) -> None:
    make_digits_tree(tmp_path / "one", classes=[4], per_class=4)  # a single class cannot be trained
    with Client(live_server.base_url) as client, pytest.raises(v.VPTError) as info:
        client.train("live-bad", tmp_path / "one", **FAST).wait(timeout=120, poll_interval=0.2)
    # refused at upload (400 dataset_*) or by the job (failed with a dataset_* code)
    assert isinstance(info.value, (v.InvalidDatasetError, v.JobFailedError))
    assert info.value.code.startswith("dataset_")


def test_cli_against_live_server(live_server: ServerProcess, digits_small_zip: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    def vpt(*argv: str) -> tuple[int, str, str]:
        code = main(["--base-url", live_server.base_url, *argv])
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = vpt("train", "live-cli", str(digits_small_zip), "--method", "vpt-shallow", "--prompts", "2",
                         "--epochs", "2", "--batch-size", "8")
    assert code == 0, err
    assert out.startswith("task live-cli: version 1 trained")
    image = tmp_path / "two.png"
    image.write_bytes(digit_png(2, index=20))
    code, out, _ = vpt("--json", "predict", "live-cli", str(image), "--top-k", "3")
    top = json.loads(out)["results"][0]["top_k"]
    assert code == 0 and sorted(t["label"] for t in top) == ["0", "1", "2"]
    code, out, _ = vpt("export", "live-cli", "-o", str(tmp_path / "t.vpt"))
    assert code == 0 and (tmp_path / "t.vpt").stat().st_size > 0
    code, out, _ = vpt("import", "live-cli", str(tmp_path / "t.vpt"))
    assert (code, out) == (0, "task live-cli: imported as version 2\n")
    code, out, _ = vpt("versions", "live-cli")
    assert code == 0 and len(out.splitlines()) == 3
    code, out, _ = vpt("activate", "live-cli", "1")
    assert (code, out) == (0, "task live-cli: version 1 is current\n")
    assert vpt("delete", "live-cli")[0] == 0
    code, out, err = vpt("tasks", "live-cli")
    assert code == 1 and err.startswith("error: task_not_found: ")
