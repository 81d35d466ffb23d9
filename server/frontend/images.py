"""Untrusted image bytes -> model input tensors, with limits, in a thread pool."""
from __future__ import annotations

import io
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch
from PIL import Image
from torch import Tensor

from server.errors import ApiError
from vpt.data.images import IMAGE_FORMATS, ImageDecodeError, open_rgb

Transform = Callable[[Image.Image], Tensor]

# The eval transform resizes the shorter side to the model's input size: a 1 x 100000 sliver would
# become gigabytes. No photo is this elongated.
MAX_ASPECT_RATIO = 64


class ImageDecoder:
    """Decodes and preprocesses images with the backbone's eval transform, off the event loop."""

    def __init__(self, transform: Transform, max_pixels: int, threads: int = 2) -> None:
        self.transform = transform
        self.max_pixels = max_pixels
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")

    def decode_one(self, data: bytes, name: str) -> Tensor:
        """(3, H, W) tensor, or a 400 `image_invalid` / 413 `payload_too_large` naming the image."""
        if not data:
            raise ApiError(400, "image_invalid", f"image {name!r} is empty")
        try:
            with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as probe:
                w, h = probe.size
        except Image.DecompressionBombError as e:  # PIL's own cap, met before ours when the header is absurd
            raise ApiError(413, "payload_too_large", f"image {name!r} is too large: {e}") from e
        except Exception as e:  # decoders raise anything (struct.error, SyntaxError...) on bad bytes
            raise ApiError(400, "image_invalid", f"image {name!r} is not a decodable image") from e
        if w * h > self.max_pixels:
            raise ApiError(413, "payload_too_large",
                           f"image {name!r} has {w}x{h} pixels; the limit is {self.max_pixels}")
        if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            raise ApiError(400, "image_invalid", f"image {name!r} is {w}x{h} pixels: an aspect ratio beyond "
                                                 f"{MAX_ASPECT_RATIO}:1 is refused")
        try:
            img = open_rgb(io.BytesIO(data), max_pixels=self.max_pixels)
        except ImageDecodeError as e:
            raise ApiError(400, "image_invalid", f"image {name!r} cannot be decoded: {e}") from e
        return self.transform(img)

    def decode_all(self, items: list[tuple[bytes, str]]) -> Tensor:
        """(n, 3, H, W); the first bad image fails the request with its name."""
        return torch.stack([self.decode_one(data, name) for data, name in items])

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
