"""Turning what callers hand us into request bodies: images for predict, datasets for train.

PIL and numpy are optional: an object is only treated as a PIL image or a numpy array when that
module is already loaded (the caller made the object with it), and they are imported lazily.
"""
from __future__ import annotations

import io
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any, BinaryIO, Self

from vpt_client._constants import SPOOL_MAX_BYTES
from vpt_client.errors import InvalidInputError

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO | Any
ProgressCallback = Callable[[int, int], None]  # (bytes sent, bytes total)
FilePart = tuple[str, bytes, str]  # (filename, data, content type)

_ARCHIVE_TYPES = {".zip": "application/zip", ".tar": "application/x-tar",
                  ".tar.gz": "application/gzip", ".tgz": "application/gzip"}
# Already compressed: deflating them again only costs time.
_STORED_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".zip", ".gz"}
_MAGIC = [(b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"), (b"GIF8", "image/gif"),
          (b"BM", "image/bmp"), (b"II*\x00", "image/tiff"), (b"MM\x00*", "image/tiff")]


def sniff_image_type(data: bytes) -> str:
    for magic, content_type in _MAGIC:
        if data.startswith(magic):
            return content_type
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def is_single_image(images: Any) -> bool:
    return not isinstance(images, (list, tuple))


def encode_images(images: ImageInput | Sequence[ImageInput]) -> list[FilePart]:
    items = [images] if is_single_image(images) else list(images)
    if not items:
        raise InvalidInputError("no images given")
    return [encode_image(item, i) for i, item in enumerate(items)]


def encode_image(item: Any, index: int) -> FilePart:
    """One image as (filename, bytes, content type)."""
    if isinstance(item, (str, os.PathLike)):
        path = Path(item)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"cannot read image {path}: {exc.strerror or exc}") from exc
        return path.name, data, sniff_image_type(data)
    if isinstance(item, (bytes, bytearray, memoryview)):
        data = bytes(item)
        return f"image-{index}", data, sniff_image_type(data)
    if hasattr(item, "read"):
        data = item.read()
        if not isinstance(data, bytes):
            raise InvalidInputError(f"image {index}: file objects must be opened in binary mode")
        name = Path(str(getattr(item, "name", f"image-{index}"))).name
        return name, data, sniff_image_type(data)
    pil_image = sys.modules.get("PIL.Image")
    if pil_image is not None and isinstance(item, pil_image.Image):
        return f"image-{index}.png", _pil_to_png(item), "image/png"
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(item, numpy.ndarray):
        return f"image-{index}.png", _array_to_png(item, index), "image/png"
    raise InvalidInputError(
        f"image {index}: unsupported type {type(item).__name__}; give a path, bytes, a binary file, "
        "a PIL image or a numpy array"
    )


def _pil_to_png(image: Any) -> bytes:
    if image.mode not in ("RGB", "RGBA", "L", "LA", "P", "I;16", "I"):
        image = image.convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _array_to_png(array: Any, index: int) -> bytes:
    """HxW, HxWx3 or HxWx4; uint8 as is, floats in [0, 1] scaled to 0..255."""
    import numpy as np

    try:
        from PIL import Image
    except ImportError as exc:
        raise InvalidInputError("sending numpy arrays needs Pillow: pip install pillow") from exc
    if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (1, 3, 4)):
        raise InvalidInputError(f"image {index}: array of shape {array.shape}; expected HxW, HxWx3 or HxWx4")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if np.issubdtype(array.dtype, np.floating):
        array = (np.clip(array, 0.0, 1.0) * 255.0).round()
    elif array.dtype != np.uint8 and (array.min() < 0 or array.max() > 255):
        raise InvalidInputError(f"image {index}: integer values outside 0..255")
    return _pil_to_png(Image.fromarray(np.ascontiguousarray(array).astype(np.uint8)))


class ProgressReader:
    """A read-only file view that reports how much of it has been read (httpx reads uploads in chunks)."""

    def __init__(self, raw: IO[bytes], total: int, callback: ProgressCallback | None) -> None:
        self._raw, self._total, self._callback, self._sent = raw, total, callback, 0

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self._sent += len(chunk)
        if self._callback is not None and chunk:
            self._callback(self._sent, self._total)
        return chunk

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._sent = self._raw.seek(offset, whence)
        return self._sent

    def tell(self) -> int:
        return self._raw.tell()


def archive_content_type(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, content_type in _ARCHIVE_TYPES.items():
        if name.endswith(suffix):
            return content_type
    return None


class DatasetUpload:
    """A dataset ready to upload: an archive file opened for reading, closed (and deleted) by `close`."""

    def __init__(self, filename: str, file: IO[bytes], content_type: str) -> None:
        self.filename, self.file, self.content_type = filename, file, content_type
        self.size = file.seek(0, io.SEEK_END)
        file.seek(0)

    def part(self, on_progress: ProgressCallback | None = None) -> tuple[str, ProgressReader, str]:
        """The multipart file part: (filename, reader reporting progress, content type)."""
        return self.filename, ProgressReader(self.file, self.size, on_progress), self.content_type

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def prepare_dataset(dataset: str | os.PathLike) -> DatasetUpload:
    """A directory is zipped (in memory up to a few MB, then in a temporary file); an archive is opened."""
    path = Path(dataset)
    if path.is_dir():
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX_BYTES)  # noqa: SIM115 - DatasetUpload closes it
        try:
            zip_directory(path, spool)
        except BaseException:
            spool.close()
            raise
        return DatasetUpload(f"{path.resolve().name or 'dataset'}.zip", spool, "application/zip")
    if not path.is_file():
        raise InvalidInputError(f"dataset {path} does not exist")
    content_type = archive_content_type(path)
    if content_type is None:
        raise InvalidInputError(f"dataset {path}: give a directory or a .zip, .tar or .tar.gz archive")
    try:
        return DatasetUpload(path.name, path.open("rb"), content_type)
    except OSError as exc:
        raise InvalidInputError(f"cannot read dataset {path}: {exc.strerror or exc}") from exc


def read_task_file(source: str | os.PathLike | bytes | bytearray | memoryview) -> bytes:
    """The bytes of a task file given as a path or as bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise InvalidInputError(f"cannot read task file {source}: {exc.strerror or exc}") from exc
    if not data:
        raise InvalidInputError("the task file is empty")
    return data


def zip_directory(root: Path, out: IO[bytes]) -> int:
    """Write the tree under `root` to `out` as a zip, one file at a time; return the file count.

    Entries are relative to `root` with `/` separators, in sorted order. Hidden entries (names
    starting with `.`) and `__MACOSX` folders are left out; symbolic links to files are followed.
    """
    count = 0
    with zipfile.ZipFile(out, "w", allowZip64=True) as zf:
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d != "__MACOSX")
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                full = Path(dirpath, name)
                if not full.is_file():
                    continue
                arcname = full.relative_to(root).as_posix()
                stored = full.suffix.lower() in _STORED_SUFFIXES
                zf.write(full, arcname, zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED)
                count += 1
    if count == 0:
        raise InvalidInputError(f"dataset directory {root} holds no files")
    return count
