"""File helpers of the local store: atomic writes, JSON records, id-named directory entries."""
from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prompt_store.errors import RecordCorrupt
from prompt_store.ids import ID_PATTERN

TMP_PREFIX = "~tmp~"  # temp files of atomic writes; a sweep removes old ones a crash left behind


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes, fsync: bool) -> None:
    """Write `data` to `path` so readers see the old or the new content (the caller fsyncs the dir)."""
    tmp = path.parent / f"{TMP_PREFIX}{uuid.uuid4().hex}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, separators=(",", ":"), sort_keys=True).encode()


def _read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object; FileNotFoundError propagates, anything unreadable is RecordCorrupt."""
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordCorrupt(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise RecordCorrupt(f"{path.name} is not a JSON object")
    return data


def _id_entries(directory: Path, suffix: str = "") -> list[str]:
    """Names in `directory` that are valid ids once `suffix` is stripped (temp and trash names are not)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        if suffix and not name.endswith(suffix):
            continue
        stem = name[: len(name) - len(suffix)] if suffix else name
        if ID_PATTERN.fullmatch(stem) and stem not in (".", ".."):
            out.append(stem)
    return sorted(out)


def remove_old_temp_files(root: Path, min_age_s: float) -> int:
    """Temp files of atomic writes under `root` older than `min_age_s` (what a killed write left)."""
    now, removed = time.time(), 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.startswith(TMP_PREFIX):
                path = Path(dirpath) / name
                try:
                    if now - path.stat().st_mtime >= min_age_s:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    continue
    return removed
