"""Request bodies: the dataset zip and archive uploads of train, predict's image parts, export/import."""
from __future__ import annotations

import io
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import vpt_client as v
from PIL import Image
from vpt_client import AsyncClient, Client

from tests.client import samples
from tests.client.fake_server import FakeServer, raw, reply


def _png(color: tuple[int, int, int], size: tuple[int, int] = (8, 6)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def dataset_dir(tmp_path: Path) -> Path:
    root = tmp_path / "digits"
    for label, color in (("zero", (0, 0, 0)), ("one", (255, 255, 255))):
        (root / label / "sub").mkdir(parents=True)
        (root / label / "a.png").write_bytes(_png(color))
        (root / label / "sub" / "b.png").write_bytes(_png(color, (5, 5)))
    (root / "manifest.csv").write_text("path,label\nzero/a.png,zero\n" * 200)  # compressible
    (root / "big.bin").write_bytes(np.random.default_rng(0).bytes(300_000))
    (root / ".DS_Store").write_bytes(b"junk")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "x").write_bytes(b"junk")
    return root


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.startswith(".") and "__MACOSX" not in p.parts}


def test_train_zips_a_directory_that_round_trips(server: FakeServer, client: Client, dataset_dir: Path) -> None:
    server.on("POST", "/tasks/digits/train", reply(202, samples.job("queued", epoch=None),
                                                     headers={"Location": "/jobs/j-1"}))
    progress: list[tuple[int, int]] = []
    handle = client.train("digits", dataset_dir, method="vpt-deep", num_prompts=10, base_lr=0.25,
                          sweep="none", seed=0, on_upload=lambda s, t: progress.append((s, t)))
    assert handle.job_id == "j-1" and handle.state == "queued"
    (rec,) = server.calls("POST", "/tasks/digits/train")
    assert rec.headers["content-type"].startswith("multipart/form-data")
    assert rec.form == {"method": "vpt-deep", "num_prompts": "10", "base_lr": "0.25", "sweep": "none", "seed": "0"}
    ((field, filename, content_type, data),) = rec.files
    assert (field, filename, content_type) == ("dataset", "digits.zip", "application/zip")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert zf.testzip() is None
        uploaded = {name: zf.read(name) for name in zf.namelist()}
        assert zf.getinfo("manifest.csv").compress_type == zipfile.ZIP_DEFLATED
        assert zf.getinfo("zero/a.png").compress_type == zipfile.ZIP_STORED
    assert uploaded == _tree(dataset_dir)
    assert ".DS_Store" not in uploaded and not any(n.startswith("__MACOSX") for n in uploaded)
    assert progress[-1] == (len(data), len(data))
    assert [s for s, _ in progress] == sorted(s for s, _ in progress)


@pytest.mark.parametrize(("suffix", "mode", "ctype"), [(".tar.gz", "w:gz", "application/gzip"),
                                                      (".tar", "w", "application/x-tar")])
def test_train_sends_an_archive_unchanged(server: FakeServer, client: Client, dataset_dir: Path,
                                          tmp_path: Path, suffix: str, mode: str, ctype: str) -> None:
    archive = tmp_path / f"data{suffix}"
    with tarfile.open(archive, mode) as tf:
        tf.add(dataset_dir / "zero", arcname="zero")
    server.on("POST", "/tasks/t1/train", reply(202, samples.job("queued", epoch=None)))
    client.train("t1", archive)
    ((_, filename, content_type, data),) = server.requests[0].files
    assert (filename, content_type) == (archive.name, ctype)
    assert data == archive.read_bytes()
    assert server.requests[0].form == {}


def test_train_input_errors_send_nothing(server: FakeServer, client: Client, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("x")
    for bad in (tmp_path / "missing", tmp_path / "empty", tmp_path / "notes.txt"):
        with pytest.raises(v.InvalidInputError):
            client.train("t", bad)
    with pytest.raises(v.InvalidInputError, match="unknown training option"):
        client.train("t", tmp_path, learning_rate=0.1)  # type: ignore[call-arg]
    assert server.requests == []


def test_predict_sends_one_image_part_per_image(server: FakeServer, client: Client, tmp_path: Path) -> None:
    path = tmp_path / "red.png"
    path.write_bytes(_png((255, 0, 0)))
    pil = Image.new("RGB", (4, 3), (0, 255, 0))
    array = np.zeros((3, 4, 3), dtype=np.uint8)
    array[..., 2] = 255
    floats = np.full((2, 2), 0.5, dtype=np.float32)
    server.on("POST", "/predict", reply(200, samples.PREDICTION))
    with path.open("rb") as fh:
        client.predict("digits", [path, _png((1, 2, 3)), pil, array, floats, fh], top_k=3)
    rec = server.requests[0]
    assert rec.query == {"task": ["digits"], "top_k": ["3"]}
    assert [f[0] for f in rec.files] == ["image"] * 6
    assert [f[1] for f in rec.files] == ["red.png", "image-1", "image-2.png", "image-3.png", "image-4.png", "red.png"]
    assert all(f[2] == "image/png" for f in rec.files)
    decoded = [np.asarray(Image.open(io.BytesIO(f[3]))) for f in rec.files]
    assert tuple(decoded[0][0, 0]) == (255, 0, 0) and tuple(decoded[1][0, 0]) == (1, 2, 3)
    assert np.array_equal(decoded[2], np.asarray(pil)) and np.array_equal(decoded[3], array)
    assert decoded[4].shape == (2, 2) and int(decoded[4][0, 0]) == 128
    assert rec.files[5][3] == path.read_bytes()


def test_predict_single_image_and_bad_arrays(server: FakeServer, client: Client) -> None:
    server.on("POST", "/predict", reply(200, samples.PREDICTION))
    client.predict("digits", _png((9, 9, 9)))
    assert len(server.requests[0].files) == 1
    with pytest.raises(v.InvalidInputError, match="shape"):
        client.predict("digits", np.zeros((2, 3, 4, 5), dtype=np.uint8))
    with pytest.raises(v.InvalidInputError, match="0..255"):
        client.predict("digits", np.full((2, 2), 300, dtype=np.int32))
    assert len(server.requests) == 1


def test_import_does_not_load_pil_or_numpy() -> None:
    code = "import sys, vpt_client, vpt_client.cli; print('PIL' in sys.modules, 'numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_export_and_import(server: FakeServer, client: Client, tmp_path: Path) -> None:
    blob = bytes(range(256)) * 300
    server.on("GET", "/tasks/digits/export", raw(200, blob, "application/octet-stream"))
    server.on("PUT", "/tasks/copy/import", reply(201, samples.TASK | {"task_id": "copy"}))
    assert client.tasks.export("digits") == blob
    out = client.tasks.export("digits", tmp_path / "digits.vpt", version=1)
    assert out == tmp_path / "digits.vpt" and out.read_bytes() == blob
    assert not (tmp_path / "digits.vpt.part").exists()
    assert server.requests[0].query == {} and server.requests[1].query == {"version": ["1"]}
    assert client.tasks.import_("copy", out).task_id == "copy"
    client.tasks.import_("copy", blob)
    puts = server.calls("PUT", "/tasks/copy/import")
    assert [p.body for p in puts] == [blob, blob]
    assert puts[0].headers["content-type"] == "application/octet-stream"


async def test_async_train_export_import(server: FakeServer, aclient: AsyncClient, dataset_dir: Path,
                                         tmp_path: Path) -> None:
    blob = b"task-file" * 1000
    server.on("POST", "/tasks/digits/train", reply(202, samples.job("queued", epoch=None)))
    server.on("GET", "/tasks/digits/export", raw(200, blob, "application/octet-stream"))
    server.on("PUT", "/tasks/digits/import", reply(201, samples.TASK))
    handle = await aclient.train("digits", dataset_dir, epochs=2)
    assert handle.state == "queued"
    ((_, _, _, data),) = server.requests[0].files
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert {n: zf.read(n) for n in zf.namelist()} == _tree(dataset_dir)
    assert server.requests[0].form == {"epochs": "2"}
    path = await aclient.tasks.export("digits", tmp_path / "t.vpt")
    assert path.read_bytes() == blob and await aclient.tasks.export("digits") == blob
    assert (await aclient.tasks.import_("digits", path)).task_id == "digits"
    assert server.calls("PUT")[0].body == blob


def test_large_dataset_zip_spills_to_disk(dataset_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vpt_client import _files

    monkeypatch.setattr(_files, "SPOOL_MAX_BYTES", 64 * 1024)
    with _files.prepare_dataset(dataset_dir) as upload:
        assert upload.file._rolled  # a real temporary file, not memory
        assert upload.size > 300_000
        with zipfile.ZipFile(upload.file) as zf:
            assert set(zf.namelist()) == set(_tree(dataset_dir))
