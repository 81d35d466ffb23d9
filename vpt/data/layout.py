"""Finding classes and samples in an extracted dataset tree.

Accepted layouts (optionally inside one wrapping top folder):
- folders: `<class>/<image>` (images may sit in sub-folders of a class folder);
- split folders: `train/<class>/<image>` and optionally `val/<class>/<image>` (or `validation/`);
- manifest: `manifest.csv` (header row) or `manifest.jsonl` (one object a line) with `file_name`
  (relative to the manifest's folder) and `label`, optionally `split` (`train` or `val`).
"""
from __future__ import annotations

import csv
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from vpt.data import errors as E
from vpt.data.errors import DatasetError
from vpt.data.extract import RefusedEntry, member_path

log = logging.getLogger(__name__)

MANIFESTS = ("manifest.csv", "manifest.jsonl")
_VAL_DIRS = ("val", "validation")
_SPLITS = {"": "train", "train": "train", "val": "val", "validation": "val"}
_MAX_JSONL_LINE = 1 << 16


@dataclass
class Layout:
    """Samples as (absolute path, class name); `val` is None when the dataset gives no split."""

    kind: str  # folders | split-folders | manifest-csv | manifest-jsonl
    train: list[tuple[Path, str]]
    val: list[tuple[Path, str]] | None


@dataclass
class _Row:
    where: str  # e.g. "manifest.csv line 3"
    file_name: str
    label: str
    split: str


def sort_classes(names: set[str] | list[str]) -> list[str]:
    """Sorted class names; numerically when every name is an integer (so "10" follows "9")."""
    if names and all(n.isdecimal() for n in names):
        return sorted(names, key=lambda n: (int(n), n))
    return sorted(names)


def find_layout(dest: Path, max_rows: int) -> Layout:
    """Detect the layout under `dest` (unwrapping one single top folder) and list its samples."""
    root = dest
    while True:
        dirs, files = _listdir(root)
        manifests = [f for f in files if f.name in MANIFESTS]
        if manifests:
            return _manifest_layout(dest, root, manifests, max_rows)
        if any(d.name == "train" for d in dirs):
            return _split_layout(dest, root, dirs)
        if root == dest and len(dirs) == 1 and not files and _looks_wrapped(dirs[0]):
            root = dirs[0]
            continue
        _check_not_flat(dest, root, dirs, files)
        if files:
            log.info("ignoring %d files beside the class folders", len(files))
        return Layout("folders", _class_folders(dest, dirs), None)


_LAYOUT_HINT = ("put each class's images in a folder named after the class (cat/1.jpg, dog/2.jpg), or use "
                "train/<class>/ and val/<class>/ folders, or add a manifest.csv with file_name and label")


def _check_not_flat(dest: Path, root: Path, dirs: list[Path], files: list[Path]) -> None:
    """Refuse files with no class folder at all (a flat archive)."""
    if not dirs and files:
        raise DatasetError(E.LAYOUT, f"the archive holds {len(files)} files but no class folders; {_LAYOUT_HINT}",
                           [f.relative_to(dest).as_posix() for f in files])


def _listdir(d: Path) -> tuple[list[Path], list[Path]]:
    with os.scandir(d) as it:
        entries = sorted(it, key=lambda e: e.name)
    dirs = [Path(e.path) for e in entries if e.is_dir(follow_symlinks=False)]
    files = [Path(e.path) for e in entries if e.is_file(follow_symlinks=False)]
    return dirs, files


def _looks_wrapped(d: Path) -> bool:
    dirs, files = _listdir(d)
    return bool(dirs) or any(f.name in MANIFESTS for f in files)


def _files_under(d: Path) -> list[Path]:
    found: list[Path] = []
    for top, subdirs, names in os.walk(d):  # never follows links (and extraction makes none)
        subdirs.sort()
        found.extend(Path(top, n) for n in sorted(names))
    return found


def _class_folders(dest: Path, dirs: list[Path]) -> list[tuple[Path, str]]:
    samples: list[tuple[Path, str]] = []
    empty: list[str] = []
    for d in dirs:
        files = _files_under(d)
        if not files:
            empty.append(d.relative_to(dest).as_posix() + "/")
        samples.extend((f, d.name) for f in files)
    if empty:
        raise DatasetError(E.EMPTY_CLASS, "class folders without any image", empty)
    return samples


def _split_layout(dest: Path, root: Path, dirs: list[Path]) -> Layout:
    train_dirs, train_files = _listdir(root / "train")
    if not train_dirs and train_files:
        raise DatasetError(E.LAYOUT, f"train/ holds {len(train_files)} files but no class folders; {_LAYOUT_HINT}",
                           [f.relative_to(dest).as_posix() for f in train_files])
    train = _class_folders(dest, train_dirs)
    val_dir = next((d for d in dirs if d.name in _VAL_DIRS), None)
    val: list[tuple[Path, str]] = []
    for d in _listdir(val_dir)[0] if val_dir is not None else []:
        val.extend((f, d.name) for f in _files_under(d))  # an empty val/<class>/ is harmless
    ignored = [d.name for d in dirs if d.name != "train" and d != val_dir]
    if ignored:
        log.info("ignoring folders beside train/ and val/: %s", ignored)
    return Layout("split-folders", train, val or None)


def _manifest_layout(dest: Path, root: Path, manifests: list[Path], max_rows: int) -> Layout:
    if len(manifests) > 1:
        raise DatasetError(E.MANIFEST_INVALID, "give either manifest.csv or manifest.jsonl, not both",
                           [m.relative_to(dest).as_posix() for m in manifests])
    manifest = manifests[0]
    rows = _read_csv(manifest, max_rows) if manifest.suffix == ".csv" else _read_jsonl(manifest, max_rows)
    unsafe: list[str] = []
    invalid: list[str] = []
    missing: list[str] = []
    seen: set[Path] = set()
    splits: dict[str, list[tuple[Path, str]]] = {"train": [], "val": []}
    for row in rows:
        split = _SPLITS.get(row.split.strip().lower())
        try:
            rel = member_path(row.file_name)
        except RefusedEntry:
            unsafe.append(row.file_name)
            continue
        path = root.joinpath(*rel.parts) if rel is not None else root
        if rel is None or split is None or path in seen:
            invalid.append(f"{row.where}: " + ("bad split" if split is None else "bad or repeated file_name"))
        elif not path.is_file():
            missing.append(row.file_name)
        else:
            seen.add(path)
            splits[split].append((path, row.label))
    if unsafe:
        raise DatasetError(E.UNSAFE_PATH, "manifest file names must be relative paths without '..'", unsafe)
    if invalid:
        raise DatasetError(E.MANIFEST_INVALID, "manifest rows with a bad split (train or val), or a repeated "
                                               "or empty file_name", invalid)
    if missing:
        raise DatasetError(E.MANIFEST_MISSING_FILE,
                           f"{len(missing)} manifest rows name files that are not in the archive", missing)
    kind = "manifest-csv" if manifest.suffix == ".csv" else "manifest-jsonl"
    return Layout(kind, splits["train"], splits["val"] or None)


def _read_csv(path: Path, max_rows: int) -> list[_Row]:
    rows: list[_Row] = []
    bad: list[str] = []
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f, strict=True)
            header = [h.strip().lower() for h in next(reader, [])]
            if "file_name" not in header or "label" not in header:
                raise DatasetError(E.MANIFEST_INVALID, "manifest.csv needs a header row with the columns "
                                                       "file_name and label", header or ["(empty file)"])
            col = {name: header.index(name) for name in ("file_name", "label", "split") if name in header}
            for rec in reader:
                if not any(c.strip() for c in rec):
                    continue
                where = f"{path.name} line {reader.line_num}"
                if len(rec) != len(header):
                    bad.append(where)
                    continue
                name, label = rec[col["file_name"]].strip(), rec[col["label"]].strip()
                if not name or not label:
                    bad.append(where)
                    continue
                rows.append(_Row(where, name, label, rec[col["split"]] if "split" in col else ""))
                if len(rows) > max_rows:
                    raise DatasetError(E.MANIFEST_INVALID, f"the manifest has more than {max_rows} rows")
    except (csv.Error, UnicodeDecodeError) as e:
        raise DatasetError(E.MANIFEST_INVALID, f"manifest.csv cannot be parsed: {e}") from e
    if bad:
        raise DatasetError(E.MANIFEST_INVALID, "manifest rows with a missing file_name or label, "
                                               "or the wrong number of columns", bad)
    return rows


def _read_jsonl(path: Path, max_rows: int) -> list[_Row]:
    rows: list[_Row] = []
    bad: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(_MAX_JSONL_LINE + 1), b""), start=1):
            where = f"{path.name} line {lineno}"
            row = _parse_json_row(raw, where) if len(raw) <= _MAX_JSONL_LINE else None
            if row is None:
                bad.append(where)
            elif row.file_name:  # a blank line
                rows.append(row)
            if len(rows) > max_rows:
                raise DatasetError(E.MANIFEST_INVALID, f"the manifest has more than {max_rows} rows")
    if bad:
        raise DatasetError(E.MANIFEST_INVALID, "manifest lines must be JSON objects with a string "
                                               "file_name and a string or integer label", bad)
    return rows


def _parse_json_row(raw: bytes, where: str) -> _Row | None:
    """A row, an empty row for a blank line, or None when the line is invalid."""
    try:
        text = raw.decode("utf-8").lstrip("\ufeff").strip()
        if not text:
            return _Row(where, "", "", "")
        obj = json.loads(text)
    except (UnicodeDecodeError, ValueError):
        return None
    if not isinstance(obj, dict):
        return None
    name, label, split = obj.get("file_name"), obj.get("label"), obj.get("split") or ""
    if isinstance(label, int) and not isinstance(label, bool):
        label = str(label)
    if not isinstance(name, str) or not name.strip() or not isinstance(label, str) or not label.strip():
        return None
    if not isinstance(split, str):
        return None
    return _Row(where, name.strip(), label.strip(), split)
