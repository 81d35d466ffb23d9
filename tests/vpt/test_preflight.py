"""The submit-time dataset checks: what they catch from names and a sample, what they leave to the job."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.fixtures.digits import (
    archive_tree,
    digit_png,
    digits_entries,
    make_digits_tree,
    write_tar,
    write_zip,
)
from vpt.data import DatasetError, IngestLimits, ingest_archive, preflight_archive
from vpt.data import errors as E


def refused(archive: Path, tmp_path: Path, code: str, **kw: object) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        preflight_archive(archive, tmp_path / "scratch", name=archive.name, **kw)  # type: ignore[arg-type]
    assert info.value.code == code, info.value
    assert list((tmp_path / "scratch").iterdir()) == []  # the temporary tree is gone
    return info.value


@pytest.mark.parametrize("content,what", [(b"class,file\ncat,1.jpg\n" * 30, "a text file"),
                                          (digit_png(3), "a PNG image"), (b"", "an empty file")])
def test_a_file_that_is_no_archive_says_what_it_is(tmp_path: Path, content: bytes, what: str) -> None:
    upload = tmp_path / "d.zip"
    upload.write_bytes(content)
    err = refused(upload, tmp_path, E.ARCHIVE_INVALID)
    assert f"the dataset is {what}, not a zip or tar archive" in err.message and err.entries == ["d.zip"]


def test_a_flat_archive_is_a_layout_error_naming_its_files(tmp_path: Path) -> None:
    entries = {f"{i}.png": digit_png(i) for i in range(4)}
    err = refused(write_zip(tmp_path / "flat.zip", entries), tmp_path, E.LAYOUT)
    assert err.entries == sorted(entries) and "no class folders" in err.message
    split = {f"train/{i}.png": digit_png(i) for i in range(3)} | {"val/a/0.png": digit_png(0)}
    err = refused(write_zip(tmp_path / "split.zip", split), tmp_path, E.LAYOUT)
    assert err.entries == [f"train/{i}.png" for i in range(3)]


def test_classes_are_counted_from_names(tmp_path: Path) -> None:
    err = refused(write_zip(tmp_path / "one.zip", digits_entries(classes=range(1), per_class=3)), tmp_path,
                  E.TOO_FEW_CLASSES)
    assert err.entries == ["0"]
    few = digits_entries(classes=range(3), per_class=2)
    del few["2/2_1.png"]
    assert refused(write_zip(tmp_path / "few.zip", few), tmp_path, E.TOO_FEW_IMAGES).entries == ["2 (1)"]


@pytest.mark.parametrize("bad,code", [(b"\x89PNG\r\n\x1a\n truncated", E.CORRUPT_IMAGE),
                                      (b"just some notes", E.NOT_IMAGE)])
def test_a_bad_file_in_the_sample_is_named(tmp_path: Path, bad: bytes, code: str) -> None:
    entries = digits_entries(classes=range(2), per_class=5)
    name = "notes.txt" if code == E.NOT_IMAGE else "0_bad.png"
    archive = write_zip(tmp_path / "d.zip", {f"1/{name}": bad, **entries})  # among the first files of its class
    assert refused(archive, tmp_path, code).entries == [f"1/{name}"]


def test_a_bad_image_past_the_sample_is_left_to_the_job(tmp_path: Path) -> None:
    entries = list(digits_entries(classes=range(2), per_class=6).items()) + [("1/zz_bad.png", b"\x89PNG broken")]
    archive = write_zip(tmp_path / "d.zip", entries)
    seen = preflight_archive(archive, tmp_path / "scratch")
    assert (seen.num_classes, seen.num_images, seen.sampled) == (2, 13, 6)
    with pytest.raises(DatasetError) as info:  # the job decodes every image
        ingest_archive(archive, tmp_path / "job")
    assert info.value.code == E.CORRUPT_IMAGE and info.value.entries == ["1/zz_bad.png"]


@pytest.mark.parametrize("fmt,layout", [("zip", "folders"), ("tar.gz", "split-folders"), ("tar", "folders")])
def test_good_datasets_pass_and_only_a_sample_is_decoded(tmp_path: Path, fmt: str, layout: str) -> None:
    tree = make_digits_tree(tmp_path / "t", classes=range(4), per_class=10,
                            layout="split" if layout == "split-folders" else "folders")
    seen = preflight_archive(archive_tree(tree, tmp_path / f"d.{fmt}", fmt=fmt), tmp_path / "scratch")
    assert (seen.format, seen.layout, seen.num_classes) == (fmt, layout, 4)
    assert seen.sampled == 12 and seen.num_images >= 40
    assert list((tmp_path / "scratch").iterdir()) == []


def test_entry_checks_need_no_bytes(tmp_path: Path) -> None:
    archive = write_tar(tmp_path / "d.tar", {**digits_entries(classes=range(2), per_class=2), "../evil.png": b"x"})
    assert refused(archive, tmp_path, E.UNSAFE_PATH).entries == ["../evil.png"]
    big = write_zip(tmp_path / "big.zip", digits_entries(classes=range(3), per_class=2))
    refused(big, tmp_path, E.TOO_LARGE, limits=IngestLimits(max_classes=2))


def test_a_manifest_is_read_and_its_files_must_exist(tmp_path: Path) -> None:
    entries = digits_entries(classes=range(2), per_class=2)
    rows = "file_name,label\n" + "".join(f"{n},{n[0]}\n" for n in entries) + "gone.png,1\n"
    err = refused(write_zip(tmp_path / "m.zip", {**entries, "manifest.csv": rows.encode()}), tmp_path,
                  E.MANIFEST_MISSING_FILE)
    assert err.entries == ["gone.png"]
