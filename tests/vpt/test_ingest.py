"""Dataset ingestion: accepted layouts and formats, and refused dataset structures."""
from __future__ import annotations

import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.fixtures.digits import (
    archive_tree,
    digit_png,
    digits_entries,
    make_digits_tree,
    make_digits_zip,
    write_tar,
    write_zip,
)
from vpt.data import DatasetError, IngestedDataset, IngestLimits, ingest_archive
from vpt.data import errors as E
from vpt.errors import VPTError


def ingest(archive: Path, tmp_path: Path, limits: IngestLimits | None = None) -> IngestedDataset:
    return ingest_archive(archive, tmp_path / "out", limits)


def refused(archive: Path, tmp_path: Path, code: str, limits: IngestLimits | None = None) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        ingest(archive, tmp_path, limits)
    assert info.value.code == code, str(info.value)
    assert list((tmp_path / "out").iterdir()) == []
    return info.value


# ---- accepted ---------------------------------------------------------------------------------

def test_digits_zip(digits_zip: Path, tmp_path: Path) -> None:
    ds = ingest(digits_zip, tmp_path)
    assert ds.classes == tuple(str(d) for d in range(10))
    assert ds.num_train == 300 and ds.val is None and ds.layout == "folders"
    assert ds.class_counts() == {str(d): 30 for d in range(10)}
    for path, label in ds.train:
        assert path.is_file() and (tmp_path / "out") in path.parents
        assert path.parent.name == ds.classes[label]
    summary = json.loads(json.dumps(ds.summary()))
    assert summary["num_classes"] == 10 and summary["num_val"] is None and summary["total_bytes"] > 0


@pytest.mark.parametrize("fmt", ["zip", "tar", "tar.gz", "tar.bz2", "tar.xz"])
def test_formats_detected_by_content(tmp_path: Path, fmt: str) -> None:
    archive = make_digits_zip(tmp_path / "upload.bin", classes=range(3), per_class=4, fmt=fmt)
    ds = ingest(archive, tmp_path)
    assert ds.num_classes == 3 and ds.num_train == 12


@pytest.mark.parametrize("layout,kind", [("split", "split-folders"), ("manifest-csv", "manifest-csv"),
                                         ("manifest-jsonl", "manifest-jsonl")])
@pytest.mark.parametrize("top_folder", [None, "my dataset"])
def test_layouts_with_val(tmp_path: Path, layout: str, kind: str, top_folder: str | None) -> None:
    archive = make_digits_zip(tmp_path / "d.tgz", classes=range(4), per_class=10, layout=layout,
                              top_folder=top_folder, fmt="tar.gz")
    ds = ingest(archive, tmp_path)
    assert ds.layout == kind and ds.classes == ("0", "1", "2", "3")
    assert ds.class_counts("train") == {c: 9 for c in ds.classes}
    assert ds.class_counts("val") == {c: 1 for c in ds.classes}
    assert not {p for p, _ in ds.train} & {p for p, _ in ds.val}


def test_wrapped_folder_layout(tmp_path: Path) -> None:
    archive = make_digits_zip(tmp_path / "d.zip", classes=range(2), per_class=3, top_folder="digits")
    ds = ingest(archive, tmp_path)
    assert ds.classes == ("0", "1") and all(p.parts[-3] == "digits" for p, _ in ds.train)


def test_macos_and_hidden_junk_skipped(tmp_path: Path) -> None:
    good = digits_entries(classes=range(2), per_class=2)
    junk = {"__MACOSX/0/._0_0.png": b"\x00\x05\x16\x07", ".DS_Store": b"bud1", "0/.DS_Store": b"bud1",
            "1/Thumbs.db": b"x", ".git/config": b"[core]", "0/._0_1.png": b"\x00"}
    ds = ingest(write_zip(tmp_path / "d.zip", {**good, **junk}), tmp_path)
    assert ds.classes == ("0", "1") and ds.num_train == 4 and ds.skipped_entries == len(junk)
    assert not (tmp_path / "out" / "__MACOSX").exists()


def test_manifest_csv_without_split_and_numeric_labels(tmp_path: Path) -> None:
    entries = digits_entries(classes=range(3), per_class=2)
    labels = {"0": "10", "1": "2", "2": "1"}
    rows = "".join(f"{name},{labels[name[0]]}\n" for name in entries)
    manifest = ("file_name,label\n" + rows).encode()
    ds = ingest(write_zip(tmp_path / "d.zip", {**entries, "manifest.csv": manifest}), tmp_path)
    assert ds.classes == ("1", "2", "10") and ds.val is None and ds.layout == "manifest-csv"
    assert ds.class_counts() == {"1": 2, "2": 2, "10": 2}


def test_manifest_jsonl_int_labels_and_blank_lines(tmp_path: Path) -> None:
    entries = digits_entries(classes=range(2), per_class=2)
    lines = [json.dumps({"file_name": n, "label": int(n[0]), "split": "train"}) for n in entries]
    manifest = "\n\n".join(lines).encode()
    ds = ingest(write_zip(tmp_path / "d.zip", {**entries, "manifest.jsonl": manifest}), tmp_path)
    assert ds.classes == ("0", "1") and ds.num_train == 4


def _encoded(image: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_image_formats_and_modes(tmp_path: Path) -> None:
    rgb = Image.fromarray(np.random.RandomState(0).randint(0, 255, (20, 24, 3), dtype=np.uint8))
    images = {
        "a/rgb.jpg": _encoded(rgb, "JPEG"), "a/cmyk.jpg": _encoded(rgb.convert("CMYK"), "JPEG"),
        "a/grey.png": _encoded(rgb.convert("L"), "PNG"), "a/alpha.png": _encoded(rgb.convert("RGBA"), "PNG"),
        "a/deep.png": _encoded(rgb.convert("I;16"), "PNG"), "b/pal.gif": _encoded(rgb.convert("P"), "GIF"),
        "b/mono.bmp": _encoded(rgb.convert("1"), "BMP"), "b/x.webp": _encoded(rgb, "WEBP"),
        "b/x.tiff": _encoded(rgb, "TIFF"), "b/x.ppm": _encoded(rgb, "PPM"),
    }
    ds = ingest(write_zip(tmp_path / "d.zip", images), tmp_path)
    assert ds.class_counts() == {"a": 5, "b": 5}


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
def test_large_incompressible_image_is_not_a_bomb(tmp_path: Path, fmt: str) -> None:
    noise = Image.fromarray(np.random.RandomState(1).randint(0, 255, (1000, 1100, 3), dtype=np.uint8))
    entries = {**digits_entries(classes=range(2), per_class=2), "1/noise.bmp": _encoded(noise, "BMP")}
    assert len(entries["1/noise.bmp"]) > 3 << 20
    archive = write_zip(tmp_path / "d", entries) if fmt == "zip" else write_tar(tmp_path / "d", entries)
    assert ingest(archive, tmp_path).class_counts() == {"0": 2, "1": 3}


def test_dest_must_be_empty(digits_zip: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(ValueError):
        ingest(digits_zip, tmp_path)
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_workers_give_the_same_dataset(digits_zip: Path, tmp_path: Path) -> None:
    one = ingest_archive(digits_zip, tmp_path / "one")
    four = ingest_archive(digits_zip, tmp_path / "four", workers=4)
    assert [(p.relative_to(tmp_path / "one"), y) for p, y in one.train] == \
           [(p.relative_to(tmp_path / "four"), y) for p, y in four.train]

    good = digits_entries(classes=range(2), per_class=6)
    png = good["0/0_0.png"]
    bad = {"0/0_0.png": png[: len(png) // 2], "1/1_3.png": png[:40]}
    archive = write_zip(tmp_path / "bad.zip", {**good, **bad})
    errors = []
    for workers in (1, 4):
        with pytest.raises(DatasetError) as info:
            ingest_archive(archive, tmp_path / f"bad{workers}", workers=workers)
        errors.append(info.value)
    assert errors[0].code == errors[1].code == E.CORRUPT_IMAGE
    assert errors[0].entries == errors[1].entries and sorted(errors[0].entries) == sorted(bad)


# ---- refused structures -----------------------------------------------------------------------

def test_corrupt_images(tmp_path: Path) -> None:
    good = digits_entries(classes=range(2), per_class=3)
    png = good["0/0_0.png"]
    bad = {"0/0_0.png": png[: len(png) // 2], "1/garbage.jpg": b"\xff\xd8\xff\xe0 not really a jpeg"}
    err = refused(write_zip(tmp_path / "d.zip", {**good, **bad}), tmp_path, E.CORRUPT_IMAGE)
    assert sorted(err.entries) == sorted(bad)


@pytest.mark.parametrize("name,data", [("1/notes.txt", b"hello"), ("1/noext", b"plain"),
                                       ("1/figure.eps", b"%!PS-Adobe-3.0 EPSF-3.0\n")])  # never Ghostscript
def test_not_an_image(tmp_path: Path, name: str, data: bytes) -> None:
    good = digits_entries(classes=range(2), per_class=2)
    err = refused(write_zip(tmp_path / "d.zip", {**good, name: data}), tmp_path, E.NOT_IMAGE)
    assert err.entries == [name]


@pytest.mark.parametrize("extra", [{"2/": b""}, {"2/.DS_Store": b"x"}, {"2/sub/": b""}])
def test_empty_class_folder(tmp_path: Path, extra: dict[str, bytes]) -> None:
    good = digits_entries(classes=range(2), per_class=2)
    err = refused(write_zip(tmp_path / "d.zip", {**good, **extra}), tmp_path, E.EMPTY_CLASS)
    assert err.entries == ["2/"]


def test_val_class_without_training_images(tmp_path: Path) -> None:
    tree = make_digits_tree(tmp_path / "t", classes=range(3), per_class=4, layout="split")
    shutil.rmtree(tree / "train" / "2")
    err = refused(archive_tree(tree, tmp_path / "d.zip"), tmp_path, E.EMPTY_CLASS)
    assert err.entries == ["2"]


def test_too_few_classes(tmp_path: Path) -> None:
    refused(write_zip(tmp_path / "d.zip", digits_entries(classes=range(1), per_class=3)), tmp_path,
            E.TOO_FEW_CLASSES)


@pytest.mark.parametrize("entries", [{"readme.txt": b"no classes here"},
                                     {"0.png": digit_png(0), "1.png": digit_png(1), "2.png": digit_png(2)},
                                     {"train/0.png": digit_png(0), "train/1.png": digit_png(1)}])
def test_files_without_class_folders_are_a_layout_error(tmp_path: Path, entries: dict[str, bytes]) -> None:
    err = refused(write_zip(tmp_path / "d.zip", entries), tmp_path, E.LAYOUT)
    assert err.entries == sorted(entries) and "class folders" in err.message


def test_too_few_images_per_class(tmp_path: Path) -> None:
    good = digits_entries(classes=range(3), per_class=3)
    del good["2/2_1.png"], good["2/2_2.png"]
    err = refused(write_zip(tmp_path / "d.zip", good), tmp_path, E.TOO_FEW_IMAGES)
    assert err.entries == ["2 (1)"]
    ds = ingest(write_zip(tmp_path / "d.zip", good), tmp_path, IngestLimits(min_images_per_class=1))
    assert ds.num_train == 7


def test_too_many_classes(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "d.zip", digits_entries(classes=range(3), per_class=2))
    refused(archive, tmp_path, E.TOO_LARGE, IngestLimits(max_classes=2))


def _manifest_zip(tmp_path: Path, name: str, text: str) -> Path:
    entries = digits_entries(classes=range(2), per_class=2)
    return write_zip(tmp_path / "d.zip", {**entries, name: text.encode()})


def test_manifest_missing_file(tmp_path: Path) -> None:
    text = "file_name,label\n0/0_0.png,0\n0/0_1.png,0\n1/1_0.png,1\n1/gone.png,1\nnowhere/x.png,1\n"
    err = refused(_manifest_zip(tmp_path, "manifest.csv", text), tmp_path, E.MANIFEST_MISSING_FILE)
    assert err.entries == ["1/gone.png", "nowhere/x.png"]


@pytest.mark.parametrize("name,text", [
    ("manifest.csv", "file_name,class\n0/0_0.png,0\n"),             # no label column
    ("manifest.csv", "file_name,label\n0/0_0.png,0\n0/0_1.png\n"),  # short row
    ("manifest.csv", "file_name,label\n0/0_0.png,\n"),              # empty label
    ("manifest.csv", ""),                                            # empty file
    ("manifest.csv", "file_name,label,split\n0/0_0.png,0,test\n"),  # unknown split
    ("manifest.csv", "file_name,label\n0/0_0.png,0\n0/0_0.png,1\n"),  # repeated file
    ("manifest.csv", "file_name,label\n0/0_0.png,\"0\n"),            # unterminated quote
    ("manifest.jsonl", '{"file_name": "0/0_0.png", "label": 0}\n{"file_name": "0/0_1.png"}\n'),
    ("manifest.jsonl", '{"file_name": "0/0_0.png", "label": [1]}\n'),
    ("manifest.jsonl", '{"file_name": "0/0_0.png", "label": true}\n'),
    ("manifest.jsonl", "not json\n"),
    ("manifest.jsonl", '["0/0_0.png", 0]\n'),
])
def test_manifest_invalid(tmp_path: Path, name: str, text: str) -> None:
    refused(_manifest_zip(tmp_path, name, text), tmp_path, E.MANIFEST_INVALID)


def test_both_manifests_refused(tmp_path: Path) -> None:
    entries = digits_entries(classes=range(2), per_class=2)
    rows = "file_name,label\n" + "".join(f"{n},{n[0]}\n" for n in entries)
    archive = write_zip(tmp_path / "d.zip", {**entries, "manifest.csv": rows.encode(), "manifest.jsonl": b""})
    refused(archive, tmp_path, E.MANIFEST_INVALID)


def test_manifest_path_escape(tmp_path: Path) -> None:
    text = "file_name,label\n0/0_0.png,0\n0/0_1.png,0\n../../etc/passwd,1\n/etc/hosts,1\n"
    err = refused(_manifest_zip(tmp_path, "manifest.csv", text), tmp_path, E.UNSAFE_PATH)
    assert err.entries == ["../../etc/passwd", "/etc/hosts"]


def test_error_payload(tmp_path: Path) -> None:
    archive = write_zip(tmp_path / "d.zip", digits_entries(classes=range(1)))
    err = refused(archive, tmp_path, E.TOO_FEW_CLASSES)
    payload = json.loads(json.dumps(err.to_dict()))
    assert payload["code"] == E.TOO_FEW_CLASSES and payload["details"] == ["0"] and payload["message"]
    assert isinstance(err, VPTError)


def test_zip_directory_entries_and_stored_members(tmp_path: Path) -> None:
    entries = digits_entries(classes=range(2), per_class=2)
    archive = write_zip(tmp_path / "d.zip", [("0/", b""), ("1/", b""), *entries.items()], zipfile.ZIP_STORED)
    assert ingest(archive, tmp_path).num_train == 4


def test_tar_with_directory_members(tmp_path: Path) -> None:
    tree = make_digits_tree(tmp_path / "t", classes=range(2), per_class=2)
    archive = tmp_path / "d.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(tree, arcname="data")  # directory members included, inside a wrapper folder
    assert ingest(archive, tmp_path).classes == ("0", "1")
