"""Hostile archives: each is refused with its own code and nothing lands outside the destination."""
from __future__ import annotations

import gzip
import io
import stat
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from tests.fixtures.digits import digits_entries, make_digits_zip, write_tar, write_zip
from vpt.data import DatasetError, IngestLimits, ingest_archive
from vpt.data import errors as E


def _snapshot(root: Path, dest: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if dest not in (p, *p.parents)}


def refused(archive: Path, tmp_path: Path, code: str, limits: IngestLimits | None = None) -> DatasetError:
    """Ingest into tmp_path/box/dest; assert the code, no writes outside dest, and an empty dest."""
    dest = tmp_path / "box" / "dest"
    dest.mkdir(parents=True)
    before = _snapshot(tmp_path, dest)
    with pytest.raises(DatasetError) as info:
        ingest_archive(archive, dest, limits)
    assert info.value.code == code, str(info.value)
    assert _snapshot(tmp_path, dest) == before
    assert list(dest.iterdir()) == []
    return info.value


@pytest.fixture(scope="module")
def good() -> dict[str, bytes]:
    return digits_entries(classes=range(2), per_class=2)


def _png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height (with one tiny IDAT): nothing large is allocated."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _zip_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # unix
    info.external_attr = mode << 16
    return info


def _tar_info(name: str, kind: bytes, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


# ---- paths -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../evil.png", "0/../../evil.png", "0/..", "0\\..\\..\\evil.png",
                                  "0/evil\n.png", "C:/evil.png"])
def test_zip_unsafe_names(tmp_path: Path, good: dict[str, bytes], name: str) -> None:
    archive = write_zip(tmp_path / "a.zip", [*good.items(), (name, good["0/0_0.png"])])
    err = refused(archive, tmp_path, E.UNSAFE_PATH)
    assert err.entries == [name]


def test_zip_absolute_path(tmp_path: Path, good: dict[str, bytes]) -> None:
    target = tmp_path / "abs_evil.png"  # would be visible to the snapshot if it were written
    archive = write_zip(tmp_path / "a.zip", [*good.items(), (str(target), b"x")])
    refused(archive, tmp_path, E.UNSAFE_PATH)
    assert not target.exists()


def test_tar_unsafe_names(tmp_path: Path, good: dict[str, bytes]) -> None:
    archive = write_tar(tmp_path / "a.tgz", [*good.items(), ("../evil.png", b"x"), ("/tmp/evil.png", b"y")])
    err = refused(archive, tmp_path, E.UNSAFE_PATH)
    assert err.entries == ["../evil.png", "/tmp/evil.png"]


def test_offenders_listed_up_to_20(tmp_path: Path, good: dict[str, bytes]) -> None:
    archive = write_zip(tmp_path / "a.zip", [*good.items(), *((f"../e{i}.png", b"x") for i in range(25))])
    err = refused(archive, tmp_path, E.UNSAFE_PATH)
    assert err.entries == [f"../e{i}.png" for i in range(20)]


# ---- links and special files -----------------------------------------------------------------

def test_zip_symlink(tmp_path: Path, good: dict[str, bytes]) -> None:
    link = _zip_info("0/link.png", stat.S_IFLNK | 0o777)
    archive = write_zip(tmp_path / "a.zip", [*good.items(), (link, b"../../../../etc/passwd")])
    assert refused(archive, tmp_path, E.LINK).entries == ["0/link.png"]


@pytest.mark.parametrize("mode", [stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO])
def test_zip_device_bits(tmp_path: Path, good: dict[str, bytes], mode: int) -> None:
    archive = write_zip(tmp_path / "a.zip", [*good.items(), (_zip_info("0/dev.png", mode | 0o644), b"")])
    refused(archive, tmp_path, E.LINK)


@pytest.mark.parametrize("kind,linkname", [
    (tarfile.SYMTYPE, "/etc/passwd"), (tarfile.LNKTYPE, "0/0_0.png"),
    (tarfile.CHRTYPE, ""), (tarfile.BLKTYPE, ""), (tarfile.FIFOTYPE, ""),
])
def test_tar_links_and_devices(tmp_path: Path, good: dict[str, bytes], kind: bytes, linkname: str) -> None:
    special = _tar_info("0/x.png", kind, linkname)
    archive = write_tar(tmp_path / "a.tar", [*good.items(), (special, None)], "w")
    assert refused(archive, tmp_path, E.LINK).entries == ["0/x.png"]


def test_tar_symlink_then_write_through_it(tmp_path: Path, good: dict[str, bytes]) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    link = _tar_info("0/escape", tarfile.SYMTYPE, str(outside))
    archive = write_tar(tmp_path / "a.tgz", [*good.items(), (link, None), ("0/escape/evil.png", b"x")])
    refused(archive, tmp_path, E.LINK)
    assert list(outside.iterdir()) == []


# ---- sizes and bombs -------------------------------------------------------------------------

def test_zip_bomb_by_ratio(tmp_path: Path, good: dict[str, bytes]) -> None:
    archive = write_zip(tmp_path / "a.zip", [*good.items(), ("0/bomb.png", bytes(4 << 20))])
    assert refused(archive, tmp_path, E.BOMB).entries == ["0/bomb.png"]


def test_tar_gz_bomb_caught_while_streaming(tmp_path: Path, good: dict[str, bytes]) -> None:
    archive = write_tar(tmp_path / "a.tgz", [*good.items(), ("0/bomb.png", bytes(24 << 20))])
    assert archive.stat().st_size < 100_000
    assert refused(archive, tmp_path, E.BOMB).entries == ["0/bomb.png"]


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_tar_huge_metadata_block(tmp_path: Path, good: dict[str, bytes], kind: bytes) -> None:
    """tarfile would read a long-name or pax block whole into memory: its declared size is capped first."""
    head = tarfile.TarInfo("././@LongLink")
    head.type, head.size = kind, 1 << 32
    (tmp_path / "a.tgz").write_bytes(gzip.compress(head.tobuf(tarfile.GNU_FORMAT) + bytes(1 << 16)))
    refused(tmp_path / "a.tgz", tmp_path, E.TOO_LARGE)


def test_zip_lying_size_header(tmp_path: Path, good: dict[str, bytes]) -> None:
    """A member whose headers under-declare its size is cut at the declared size and fails its CRC."""
    data = bytearray(write_zip(tmp_path / "a.zip", [*good.items(), ("0/big.png", bytes(range(256)) * 400)],
                               compression=zipfile.ZIP_DEFLATED).read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(data))) as zf:
        info = zf.getinfo("0/big.png")
    cd = data.rfind(b"PK\x01\x02")  # the last central directory entry: big.png, written last
    struct.pack_into("<I", data, cd + 24, 100)  # central directory: uncompressed size
    struct.pack_into("<I", data, info.header_offset + 22, 100)  # local header: uncompressed size
    (tmp_path / "a.zip").write_bytes(bytes(data))
    refused(tmp_path / "a.zip", tmp_path, E.ARCHIVE_INVALID)


@pytest.mark.parametrize("fmt", ["zip", "tar.gz"])
@pytest.mark.parametrize("limits", [
    IngestLimits(max_total_bytes=20_000),
    IngestLimits(max_members=10),
    IngestLimits(max_archive_bytes=10_000),
], ids=["total", "members", "archive"])
def test_size_caps(tmp_path: Path, fmt: str, limits: IngestLimits) -> None:
    archive = make_digits_zip(tmp_path / f"d.{fmt}", classes=range(3), per_class=8, fmt=fmt)
    refused(archive, tmp_path, E.TOO_LARGE, limits)


@pytest.mark.parametrize("size", [(100_000, 100_000), (10_000, 6_000)], ids=["pil-bomb", "over-limit"])
def test_huge_declared_image(tmp_path: Path, good: dict[str, bytes], size: tuple[int, int]) -> None:
    archive = write_zip(tmp_path / "a.zip", [*good.items(), ("1/huge.png", _png(*size))])
    assert refused(archive, tmp_path, E.IMAGE_TOO_LARGE).entries == ["1/huge.png"]


def test_pixel_limit_applies_to_real_images(tmp_path: Path, good: dict[str, bytes]) -> None:
    archive = write_zip(tmp_path / "a.zip", good)
    err = refused(archive, tmp_path, E.IMAGE_TOO_LARGE, IngestLimits(max_image_pixels=32 * 32 - 1))
    assert len(err.entries) == 4


# ---- broken archives --------------------------------------------------------------------------

@pytest.mark.parametrize("maker", ["garbage", "truncated-zip", "gzip-not-tar", "truncated-tgz",
                                   "truncated-xz", "corrupt-bz2", "empty"])
def test_invalid_archives(tmp_path: Path, good: dict[str, bytes], maker: str) -> None:
    path = tmp_path / "a.zip"
    if maker == "garbage":
        path.write_bytes(b"this is not an archive" * 50)
    elif maker == "truncated-zip":
        data = write_zip(tmp_path / "full.zip", good).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif maker == "gzip-not-tar":
        path.write_bytes(gzip.compress(b"hello " * 1000))
    elif maker in ("truncated-tgz", "truncated-xz"):
        data = write_tar(tmp_path / "full", good, "w:" + maker[-2:]).read_bytes()
        path.write_bytes(data[: len(data) * 2 // 3])
    elif maker == "corrupt-bz2":
        data = bytearray(write_tar(tmp_path / "full", good, "w:bz2").read_bytes())
        data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
        path.write_bytes(bytes(data))
    else:
        path.write_bytes(b"")
    refused(path, tmp_path, E.ARCHIVE_INVALID)


def test_encrypted_zip_member(tmp_path: Path, good: dict[str, bytes]) -> None:
    data = bytearray(write_zip(tmp_path / "a.zip", good).read_bytes())
    # bit 0 of the flags in the local and the central header: "encrypted"
    for sig, flag_at in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = data.find(sig)
        data[at + flag_at] |= 1
    (tmp_path / "a.zip").write_bytes(bytes(data))
    refused(tmp_path / "a.zip", tmp_path, E.ARCHIVE_INVALID)


def test_duplicate_entry(tmp_path: Path, good: dict[str, bytes]) -> None:
    with pytest.warns(UserWarning):  # zipfile warns about the duplicate name while writing
        archive = write_zip(tmp_path / "a.zip", [*good.items(), ("0/0_0.png", b"second copy")])
    assert refused(archive, tmp_path, E.ARCHIVE_INVALID).entries == ["0/0_0.png"]


def test_file_where_a_folder_is(tmp_path: Path, good: dict[str, bytes]) -> None:
    archive = write_tar(tmp_path / "a.tgz", [("2", b"plain file"), *good.items(), ("2/x.png", b"x")])
    refused(archive, tmp_path, E.ARCHIVE_INVALID)
