"""Decoding and verifying untrusted image files."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from PIL import Image, ImageOps, UnidentifiedImageError

from vpt.data import errors as E
from vpt.data.errors import DatasetError, ImageDecodeError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm", ".pnm"})
# Only these decoders ever see uploaded bytes: no EPS (it runs Ghostscript), no exotic plugins.
IMAGE_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")


def open_rgb(source: str | Path | IO[bytes], max_pixels: int | None = None) -> Image.Image:
    """Decode an image as RGB, honouring EXIF orientation: the one decoder for training and serving.

    With `max_pixels`, the header's size is checked before anything is decoded. Raises
    ImageDecodeError for anything that is not a decodable image of an accepted format.
    """
    try:
        with Image.open(source, formats=IMAGE_FORMATS) as im:
            if max_pixels is not None and im.width * im.height > max_pixels:
                raise ImageDecodeError(f"the image has {im.width}x{im.height} pixels; "
                                       f"the limit is {max_pixels}")
            return ImageOps.exif_transpose(im).convert("RGB")
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"the image is too large: {e}") from e
    except Exception as e:  # decoders raise anything (struct.error, SyntaxError...) on bad bytes
        raise ImageDecodeError(f"not a decodable image ({', '.join(IMAGE_FORMATS)}): {e}") from e


def image_problem(path: Path, max_pixels: int) -> str | None:
    """The DatasetError code that `path` deserves, or None when it decodes to a sane RGB image.

    The pixel count is read from the header before anything is decoded (decompression bombs),
    then PIL's structural verify runs; last, `open_rgb` (the decoder training and serving use)
    decodes it in full.
    """
    try:
        with Image.open(path, formats=IMAGE_FORMATS) as im:
            width, height = im.size
            if width * height > max_pixels:
                return E.IMAGE_TOO_LARGE
            im.verify()
    except Image.DecompressionBombError:
        return E.IMAGE_TOO_LARGE
    except UnidentifiedImageError:
        return E.CORRUPT_IMAGE if path.suffix.lower() in IMAGE_EXTENSIONS else E.NOT_IMAGE
    except Exception:  # decoders raise anything (struct.error, SyntaxError...) on bad bytes
        return E.CORRUPT_IMAGE
    try:
        open_rgb(path)
    except ImageDecodeError:
        return E.CORRUPT_IMAGE
    return None


_MESSAGES = {
    E.IMAGE_TOO_LARGE: "images with more than {max_pixels} pixels are refused",
    E.CORRUPT_IMAGE: "images could not be decoded",
    E.NOT_IMAGE: "files that are not images (JPEG, PNG, BMP, GIF, WebP, TIFF, PPM) were found where images "
                 "are expected",
}


def verify_images(paths: Sequence[Path], names: Sequence[str], max_pixels: int, workers: int = 1) -> None:
    """Raise a DatasetError naming (up to 20) files whose problem is the first one met."""
    def check(i: int) -> tuple[int, str | None]:
        return i, image_problem(paths[i], max_pixels)

    found: dict[str, list[str]] = {}
    if workers > 1:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(pool.map(check, range(len(paths))))
    else:
        results = [check(i) for i in range(len(paths))]
    for i, code in results:
        if code is not None:
            found.setdefault(code, []).append(names[i])
    if found:
        code, bad = next(iter(found.items()))
        log.info("refused dataset: %d files with %s", len(bad), code)
        raise DatasetError(code, _MESSAGES[code].format(max_pixels=max_pixels) + f" ({len(bad)} files)", bad)
