"""Untrusted image bytes -> decoded uint8 RGB images, with limits, in a thread pool.

Front ends only decode: resizing, cropping and normalising happen on the engine's device for the
whole batch (vpt/preprocess.py). A JPEG larger than the eval transform needs is decoded at a
reduced scale (PIL's draft mode: the DCT scales by 1/2, 1/4 or 1/8) that keeps both sides at least
`min_side`, which cuts decode time by up to ~10x for large photos; it changes pixels slightly (DCT
scaling instead of a full decode then a resize), within the preprocessing tolerance.
"""
from __future__ import annotations

import asyncio
import io
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image, ImageOps

from server.errors import ApiError
from vpt.data.images import IMAGE_FORMATS

# The eval transform resizes the shorter side to the model's input size: a 1 x 100000 sliver would
# become gigabytes. No photo is this elongated.
MAX_ASPECT_RATIO = 64
ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads
INLINE_PIXELS = 1 << 20  # a small request decodes on the event loop only up to this many pixels (~5 ms)


class ImageDecoder:
    """Decodes images to uint8 (H, W, 3) arrays, in `threads` threads (0: on the caller's event loop).

    `inline_bytes`: a request whose images total at most this many bytes, and at most `INLINE_PIXELS`
    pixels once opened (after the JPEG draft scale), decodes on the event loop even with a pool. A
    thread hop costs CPU of its own (a wake-up, future callbacks: ~0.1 ms a request), which a
    front-end process among several does better to spend decoding; a large image (in bytes, or a
    small file of many pixels such as a flat PNG) still goes to the pool, so it never stalls the
    loop's other requests.

    `account(cpu_seconds, images)`, when given, hears the CPU time each request's decoding took in the
    thread that did it (`time.thread_time`), failed requests included: the server's
    `vpt_decode_cpu_seconds_total` and `vpt_decoded_images_total`."""

    def __init__(self, max_pixels: int, min_side: int = 0, threads: int = 2, inline_bytes: int = 0,
                 account: Callable[[float, int], None] | None = None) -> None:
        self.max_pixels = max_pixels
        self.min_side = min_side  # 0: never draft
        self.inline_bytes = inline_bytes
        self.account = account
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode") if threads > 0 else None

    async def decode(self, items: list[tuple[bytes, str]]) -> list[np.ndarray]:
        """`decode_all` in the pool, or inline (no pool, or a small request: see the class docstring)."""
        if self.pool is None:
            return self._timed(self.decode_all, items)
        if sum(len(data) for data, _ in items) > self.inline_bytes:
            return await asyncio.get_running_loop().run_in_executor(self.pool, self._timed, self.decode_all, items)
        t0 = time.thread_time()
        try:
            opened = self._open_all(items)
        except BaseException:
            self._count(t0, len(items))
            raise
        if sum(im.size[0] * im.size[1] for im, _ in opened) <= INLINE_PIXELS:
            try:
                return self._load_all(opened)
            finally:
                self._count(t0, len(items))
        self._count(t0, 0)  # the headers' share; the pool thread counts the pixels and the images
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._timed, self._load_all, opened)

    def _timed(self, fn: Callable, arg: list) -> list[np.ndarray]:
        """`fn(arg)`, its thread's CPU time accounted for `len(arg)` images."""
        t0 = time.thread_time()
        try:
            return fn(arg)
        finally:
            self._count(t0, len(arg))

    def _count(self, t0: float, images: int) -> None:
        if self.account is not None:
            self.account(time.thread_time() - t0, images)

    def _open_all(self, items: list[tuple[bytes, str]]) -> list[tuple[Image.Image, str]]:
        """Every image opened (headers only: sizes known, pixels not decoded yet), or none."""
        opened: list[tuple[Image.Image, str]] = []
        try:
            for data, name in items:
                opened.append((self.open_one(data, name), name))
        except BaseException:
            for im, _ in opened:
                im.close()
            raise
        return opened

    def decode_one(self, data: bytes, name: str) -> np.ndarray:
        """uint8 (H, W, 3), or a 400 `image_invalid` / 413 `payload_too_large` naming the image."""
        return self.load_one(self.open_one(data, name), name)

    def open_one(self, data: bytes, name: str) -> Image.Image:
        """The image opened (its header read and checked, a JPEG's draft scale set), not yet decoded."""
        if not data:
            raise ApiError(400, "image_invalid", f"image {name!r} is empty")
        try:
            im = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
        except Image.DecompressionBombError as e:  # PIL's own cap, met before ours when the header is absurd
            raise ApiError(413, "payload_too_large", f"image {name!r} is too large: {e}") from e
        except Exception as e:  # decoders raise anything (struct.error, SyntaxError...) on bad bytes
            raise ApiError(400, "image_invalid", f"image {name!r} is not a decodable image") from e
        try:
            w, h = im.size
            if w * h > self.max_pixels:
                raise ApiError(413, "payload_too_large",
                               f"image {name!r} has {w}x{h} pixels; the limit is {self.max_pixels}")
            if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
                raise ApiError(400, "image_invalid", f"image {name!r} is {w}x{h} pixels: an aspect ratio beyond "
                                                     f"{MAX_ASPECT_RATIO}:1 is refused")
            try:
                self._draft(im, w, h)
            except Exception as e:  # a corrupt header past what open read
                raise ApiError(400, "image_invalid", f"image {name!r} cannot be decoded: {e}") from e
        except BaseException:
            im.close()
            raise
        return im

    def load_one(self, im: Image.Image, name: str) -> np.ndarray:
        """An opened image's pixels as uint8 (H, W, 3) (EXIF orientation applied); closes the image."""
        with im:
            try:
                im.load()
                if im.getexif().get(ORIENTATION, 1) != 1:  # most photos need no turn: skip the copy
                    im = ImageOps.exif_transpose(im)
                return np.asarray(im if im.mode == "RGB" else im.convert("RGB"))    # (H, W, 3) uint8
            except Exception as e:  # truncated or corrupt data past the header
                raise ApiError(400, "image_invalid", f"image {name!r} cannot be decoded: {e}") from e

    def _load_all(self, opened: list[tuple[Image.Image, str]]) -> list[np.ndarray]:
        try:
            return [self.load_one(im, name) for im, name in opened]
        finally:
            for im, _ in opened:  # the rest, when one failed
                im.close()

    def _draft(self, im: Image.Image, w: int, h: int) -> None:
        """Let a JPEG decode at the smallest DCT scale that keeps both sides >= min_side."""
        if im.format != "JPEG" or not self.min_side or min(w, h) <= 2 * self.min_side:
            return
        s = self.min_side / min(w, h)
        im.draft("RGB", (math.ceil(w * s), math.ceil(h * s)))

    def decode_all(self, items: list[tuple[bytes, str]]) -> list[np.ndarray]:
        """uint8 (H, W, 3) per image; the first bad image fails the request with its name."""
        return [self.decode_one(data, name) for data, name in items]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
