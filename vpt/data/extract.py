"""Streaming, path-safe extraction of zip and tar archives.

Members are copied one by one, in 1 MiB chunks, while bytes are counted, so neither a huge
archive nor a member whose header lies about its size can exceed the caps. Nothing is written
outside `dest`: absolute names, `..` components, backslashes and control characters are refused,
links and device entries are refused, files are created with O_EXCL | O_NOFOLLOW, and every parent
directory is checked to resolve inside `dest`.
"""
from __future__ import annotations

import errno
import logging
import lzma
import os
import re
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, BinaryIO

from vpt.data import errors as E
from vpt.data.errors import DatasetError
from vpt.data.limits import IngestLimits

log = logging.getLogger(__name__)

CHUNK = 1 << 20
# Compressed bytes a tar stream may have read ahead of the member being copied (tarfile reads
# 10 KiB records); granted to every member so buffering never looks like a bomb.
_TAR_READAHEAD = 64 << 10
_JUNK = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})
_DRIVE = re.compile(r"^[A-Za-z]:")
# Errors that mean the archive itself is broken (bad CRC, truncated stream, encrypted member...).
_READ_ERRORS = (zipfile.BadZipFile, tarfile.TarError, zlib.error, lzma.LZMAError, struct.error, EOFError,
                RuntimeError, NotImplementedError, OSError, ValueError)
_COMPRESSED_TAR = {b"\x1f\x8b": "gz", b"BZh": "bz2", b"\xfd7zXZ\x00": "xz"}


class RefusedEntry(Exception):
    """An archive entry that must not be extracted; `code` says why."""

    def __init__(self, code: str) -> None:
        self.code = code


class _LocalFailure(Exception):
    """A local filesystem error (disk full...): not the archive's fault, re-raised as the OSError."""


@dataclass
class ExtractResult:
    """What `extract_archive` wrote: how many regular files, the skipped junk entries and byte counts."""

    format: str
    files: int = 0
    skipped: list[str] = field(default_factory=list)
    members: int = 0
    total_bytes: int = 0
    placeholders: set[Path] = field(default_factory=set)  # files created empty (see `keep`)


@dataclass
class _Entry:
    name: str
    kind: str  # file | dir | link | other
    size: int  # declared uncompressed size
    open: Callable[[], IO[bytes]]
    compressed: Callable[[], int]  # compressed bytes behind this member so far
    declared_compressed: int | None = None


def detect_format(path: Path) -> str:
    """`zip`, `tar`, `tar.gz`, `tar.bz2` or `tar.xz`, from the leading bytes, not the name."""
    with open(path, "rb") as f:
        head = f.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    for magic, comp in _COMPRESSED_TAR.items():
        if head.startswith(magic):
            return f"tar.{comp}"
    if head[257:262] == b"ustar":
        return "tar"
    raise DatasetError(E.ARCHIVE_INVALID, f"the dataset is {_what_is(head)}, not a zip or tar archive "
                                          "(.zip, .tar, .tar.gz, .tgz)")


_KNOWN_MAGIC = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
                (b"%PDF", "a PDF document"), (b"7z\xbc\xaf", "a 7-Zip archive"),
                (b"Rar!", "a RAR archive"))


def _what_is(head: bytes) -> str:
    """A few words on what a non-archive upload looks like, from its first bytes."""
    if not head:
        return "an empty file"
    if head[8:12] == b"WEBP" and head[:4] == b"RIFF":
        return "a WebP image"
    if head[:2] == b"BM" and head[6:10] == b"\0\0\0\0":  # the header's reserved fields are zero
        return "a BMP image"
    for magic, what in _KNOWN_MAGIC:
        if head.startswith(magic):
            return what
    try:
        head[:-4].decode("utf-8")  # a cut multi-byte character at the end is still text
    except UnicodeDecodeError:
        return "an unknown kind of file"
    return "a text file" if b"\0" not in head else "an unknown kind of file"


def member_path(name: str) -> PurePosixPath | None:
    """The safe relative path of an archive member (None for the root itself); raises RefusedEntry."""
    if any(ord(c) < 32 or ord(c) == 127 for c in name) or "\\" in name:
        raise RefusedEntry(E.UNSAFE_PATH)
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise RefusedEntry(E.UNSAFE_PATH) from None
    if name.startswith("/") or _DRIVE.match(name):
        raise RefusedEntry(E.UNSAFE_PATH)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if any(p == ".." or len(p.encode("utf-8")) > 255 for p in parts):
        raise RefusedEntry(E.UNSAFE_PATH)
    return PurePosixPath(*parts) if parts else None


def is_junk(rel: PurePosixPath) -> bool:
    """macOS resource forks, Finder/Explorer droppings and hidden files or folders."""
    return any(p in _JUNK or p.startswith(".") for p in rel.parts)


def extract_archive(archive: Path, dest: Path, limits: IngestLimits,
                    keep: Callable[[PurePosixPath], bool] | None = None) -> ExtractResult:
    """Extract `archive` into the existing directory `dest`, enforcing `limits`.

    With `keep`, a regular file for which `keep(relative path)` is false is created empty (its
    name is all a layout check needs) and listed in `result.placeholders`; its bytes are skipped.
    """
    size = archive.stat().st_size
    if size > limits.max_archive_bytes:
        raise DatasetError(E.TOO_LARGE, f"the archive is {size} bytes; "
                                        f"the limit is {limits.max_archive_bytes}")
    fmt = detect_format(archive)
    result = ExtractResult(format=fmt)
    try:
        if fmt == "zip":
            with zipfile.ZipFile(archive) as zf:
                _copy_entries(_zip_entries(zf, limits), dest, limits, result, keep)
        else:
            with open(archive, "rb") as raw_file:
                raw = _CountingReader(raw_file)
                mode = "r|" + fmt.partition(".")[2]  # a forward-only stream: nothing is seeked or indexed
                with tarfile.open(fileobj=raw, mode=mode, tarinfo=_BoundedTarInfo) as tf:  # type: ignore
                    _copy_entries(_tar_entries(tf, raw), dest, limits, result, keep)
    except DatasetError:
        raise
    except _LocalFailure as e:
        raise e.__cause__ from None  # type: ignore[misc]
    except _READ_ERRORS as e:
        raise DatasetError(E.ARCHIVE_INVALID, f"the {fmt} archive cannot be read: {e}") from e
    log.info("extracted %d files (%d bytes, %d members, %d skipped) from %s",
             result.files, result.total_bytes, result.members, len(result.skipped), archive.name)
    return result


_TAR_META_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                   tarfile.SOLARIS_XHDTYPE)
MAX_TAR_META_BYTES = 1 << 20


class _BoundedTarInfo(tarfile.TarInfo):
    """tarfile reads long-name and pax header blocks whole into memory: refuse huge ones first."""

    def _proc_member(self, tf: tarfile.TarFile) -> tarfile.TarInfo:
        if self.type in _TAR_META_TYPES and self.size > MAX_TAR_META_BYTES:
            raise DatasetError(E.TOO_LARGE, f"a tar metadata block declares {self.size} bytes; "
                                            f"the limit is {MAX_TAR_META_BYTES}")
        return super()._proc_member(tf)  # type: ignore[misc]


class _CountingReader:
    """A read-only file wrapper that counts the raw (compressed) bytes handed to tarfile."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.count = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.count += len(data)
        return data


def _zip_entries(zf: zipfile.ZipFile, limits: IngestLimits) -> Iterator[_Entry]:
    infos = zf.infolist()
    if len(infos) > limits.max_members:
        raise DatasetError(E.TOO_LARGE, f"the archive has {len(infos)} entries; "
                                        f"the limit is {limits.max_members}")
    declared = sum(i.file_size for i in infos)
    if declared > limits.max_total_bytes:
        raise DatasetError(E.TOO_LARGE, f"the archive expands to {declared} bytes; "
                                        f"the limit is {limits.max_total_bytes}")
    for info in infos:
        fmt = stat.S_IFMT(info.external_attr >> 16)
        if fmt == stat.S_IFLNK or fmt in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK):
            kind = "link"
        elif fmt == stat.S_IFDIR or info.is_dir():
            kind = "dir"
        else:
            kind = "file"
        yield _Entry(info.filename, kind, info.file_size, lambda i=info: zf.open(i),
                     lambda c=info.compress_size: c, declared_compressed=info.compress_size)


def _tar_entries(tf: tarfile.TarFile, raw: _CountingReader) -> Iterator[_Entry]:
    while (m := tf.next()) is not None:
        tf.members.clear()  # a stream needs no index; keep memory flat over many members
        if m.isreg():
            kind = "file"
        elif m.isdir():
            kind = "dir"
        elif m.issym() or m.islnk() or m.ischr() or m.isblk() or m.isfifo():
            kind = "link"
        else:
            kind = "other"
        start = raw.count
        yield _Entry(m.name, kind, m.size, lambda m=m: tf.extractfile(m),  # type: ignore[misc]
                     lambda s=start: raw.count - s + _TAR_READAHEAD)


def _copy_entries(entries: Iterator[_Entry], dest: Path, limits: IngestLimits, result: ExtractResult,
                  keep: Callable[[PurePosixPath], bool] | None = None) -> None:
    """Write the safe regular files; gather refused entries (up to 20) and raise for them at the end."""
    refused: dict[str, list[str]] = {}
    real_dest = os.path.realpath(dest)
    for entry in entries:
        result.members += 1
        if result.members > limits.max_members:
            raise DatasetError(E.TOO_LARGE, f"the archive has more than {limits.max_members} entries")
        try:
            rel = member_path(entry.name)
            if entry.kind == "link":
                raise RefusedEntry(E.LINK)
            if entry.kind == "other":
                raise RefusedEntry(E.ARCHIVE_INVALID)
        except RefusedEntry as r:
            refused.setdefault(r.code, []).append(entry.name)
            continue
        if refused or rel is None:
            continue  # once anything is refused, only keep naming the other offenders
        if is_junk(rel):
            result.skipped.append(entry.name)
            if len(rel.parts) > 1 and not is_junk(rel.parent):  # `cls/.DS_Store` alone: an empty class
                _make_dirs(dest, rel.parts[:-1], real_dest, entry.name)
        elif entry.kind == "dir":
            _make_dirs(dest, rel.parts, real_dest, entry.name)
        else:
            _check_declared(entry, limits, result.total_bytes)
            _make_dirs(dest, rel.parts[:-1], real_dest, entry.name)
            target = dest.joinpath(*rel.parts)
            if keep is None or keep(rel):
                result.total_bytes += _write_member(entry, target, limits, result.total_bytes)
            else:
                _write_placeholder(target, entry.name)
                result.placeholders.add(target)
            result.files += 1
    if refused:
        code, names = next(iter(refused.items()))
        raise DatasetError(code, _REFUSED_MESSAGES[code], names)


_REFUSED_MESSAGES = {
    E.UNSAFE_PATH: "archive entries with absolute paths, '..', backslashes or control characters are refused",
    E.LINK: "archive entries that are symlinks, hard links or device/fifo nodes are refused",
    E.ARCHIVE_INVALID: "archive entries of an unsupported type are refused",
}


def _check_declared(entry: _Entry, limits: IngestLimits, total: int) -> None:
    if total + entry.size > limits.max_total_bytes:
        raise DatasetError(E.TOO_LARGE, f"the archive expands to more than {limits.max_total_bytes} bytes",
                           [entry.name])
    comp = entry.declared_compressed
    if comp is not None and entry.size > max(limits.ratio_floor_bytes, limits.max_ratio * max(comp, 1)):
        raise DatasetError(E.BOMB, f"an entry expands {entry.size / max(comp, 1):.0f}x; "
                                   f"the limit is {limits.max_ratio:g}x", [entry.name])


@contextmanager
def _local_io(name: str) -> Iterator[None]:
    """Translate errors of local writes: clashes are the archive's fault, the rest are ours."""
    try:
        yield
    except (FileExistsError, IsADirectoryError, NotADirectoryError) as e:
        raise DatasetError(E.ARCHIVE_INVALID, "the archive holds the same path twice, or a file where "
                                              "a folder is", [name]) from e
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            raise DatasetError(E.UNSAFE_PATH, "an archive entry's path is too long", [name]) from e
        raise _LocalFailure() from e


def _make_dirs(dest: Path, parts: tuple[str, ...], real_dest: str, name: str) -> None:
    target = dest.joinpath(*parts)
    with _local_io(name):
        target.mkdir(parents=True, exist_ok=True)
    real = os.path.realpath(target)
    if os.path.commonpath([real, real_dest]) != real_dest:  # only a link could do this; we never make one
        raise DatasetError(E.UNSAFE_PATH, "an archive entry resolves outside the extraction directory",
                           [name])


def _write_placeholder(target: Path, name: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_BINARY", 0)
    with _local_io(name):
        os.close(os.open(target, flags, 0o644))


def _write_member(entry: _Entry, target: Path, limits: IngestLimits, total_before: int) -> int:
    """Copy one member in chunks, counting bytes against the total cap and the ratio cap."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_BINARY", 0)
    with _local_io(entry.name):
        fd = os.open(target, flags, 0o644)
    written = 0
    with os.fdopen(fd, "wb") as out, entry.open() as src:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            if total_before + written > limits.max_total_bytes:
                raise DatasetError(E.TOO_LARGE, f"the archive expands to more than "
                                                f"{limits.max_total_bytes} bytes", [entry.name])
            if written > limits.ratio_floor_bytes and written > limits.max_ratio * entry.compressed():
                raise DatasetError(E.BOMB, f"an entry expands more than {limits.max_ratio:g}x", [entry.name])
            with _local_io(entry.name):
                out.write(chunk)
        with _local_io(entry.name):
            out.flush()
    return written
