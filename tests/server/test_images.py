"""The front end's decoder: EXIF orientation, modes, and where a request decodes (inline or in the pool)."""
from __future__ import annotations

import asyncio
import io
import threading

import numpy as np
import pytest
from PIL import Image

from server.errors import ApiError
from server.frontend.images import ORIENTATION, ImageDecoder


def _jpeg(image: Image.Image, orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    exif = image.getexif()
    if orientation is not None:
        exif[ORIENTATION] = orientation
    image.save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def test_exif_orientation_turns_the_image_and_plain_photos_decode_as_pil_does() -> None:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (40, 60, 3), dtype=np.uint8))
    dec = ImageDecoder(10**7)
    plain = dec.decode_one(_jpeg(image), "a")
    assert plain.shape == (40, 60, 3) and plain.dtype == np.uint8
    assert np.array_equal(plain, np.asarray(Image.open(io.BytesIO(_jpeg(image))).convert("RGB")))
    turned = dec.decode_one(_jpeg(image, orientation=6), "b")  # 6: stored rotated, shown turned 90 degrees
    assert turned.shape == (60, 40, 3)
    assert np.array_equal(turned, np.rot90(plain, k=-1))


@pytest.mark.parametrize("mode", ["L", "RGBA", "P"])
def test_other_modes_become_rgb(mode: str) -> None:
    buf = io.BytesIO()
    Image.new(mode, (8, 6), 128 if mode != "RGBA" else (10, 20, 30, 255)).save(buf, "PNG")
    out = ImageDecoder(10**7).decode_one(buf.getvalue(), "m")
    assert out.shape == (6, 8, 3) and out.dtype == np.uint8


def test_small_requests_decode_inline_and_large_ones_in_the_pool() -> None:
    small = _jpeg(Image.new("RGB", (32, 32), (1, 2, 3)))
    buf = io.BytesIO()
    Image.new("RGB", (1500, 1000), (9, 9, 9)).save(buf, "PNG")  # a few KB, 1.5 M pixels
    flat = buf.getvalue()
    dec = ImageDecoder(10**7, threads=1, inline_bytes=max(len(small) * 2, len(flat)))
    where: list[str] = []
    plain_load = dec.load_one
    dec.load_one = lambda im, name: (where.append(threading.current_thread().name), plain_load(im, name))[1]

    async def go() -> None:
        await dec.decode([(small, "one")])               # within inline_bytes: on the loop's thread
        await dec.decode([(small, "a"), (small, "b")])   # at most inline_bytes: still inline
        await dec.decode([(small, "a")] * 20)            # beyond: the pool
        assert (await dec.decode([(flat, "flat")]))[0].shape == (1000, 1500, 3)  # few bytes, many pixels: pool
        with pytest.raises(ApiError) as e:               # a bad image fails the same way on either path
            await dec.decode([(b"not an image", "bad")])
        assert e.value.status == 400 and e.value.code == "image_invalid"
        with pytest.raises(ApiError) as e:               # one bad image among good ones names itself
            await dec.decode([(small, "good"), (small[:60], "cut")])
        assert e.value.status == 400 and "'cut'" in e.value.message

    try:
        asyncio.run(go())
    finally:
        dec.close()
    main = threading.current_thread().name
    assert where[:3] == [main, main, main]  # one request of one image, then one of two
    assert {w for w in where[3:23]} == {where[3]} and where[3].startswith("decode")
    assert where[23].startswith("decode")


def test_decoding_cpu_is_accounted_per_request_in_the_thread_that_decodes() -> None:
    photo = _jpeg(Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)))
    buf = io.BytesIO()
    Image.new("RGB", (1500, 1000), (9, 9, 9)).save(buf, "PNG")
    flat = buf.getvalue()
    heard: list[tuple[float, int, str]] = []

    def account(seconds: float, images: int) -> None:
        heard.append((seconds, images, threading.current_thread().name))

    async def go(dec: ImageDecoder) -> None:
        await dec.decode([(photo, "a")])
        await dec.decode([(photo, "a")] * 3)
        await dec.decode([(flat, "flat")])
        with pytest.raises(ApiError):
            await dec.decode([(photo, "good"), (b"junk", "bad")])

    pooled = ImageDecoder(10**7, threads=1, inline_bytes=len(photo) * 2, account=account)
    plain = ImageDecoder(10**7, threads=0, account=account)
    try:
        asyncio.run(go(pooled))
        asyncio.run(go(plain))
    finally:
        pooled.close()
    main = threading.current_thread().name
    # pooled: inline, the pool (beyond inline_bytes), the flat PNG's headers inline then its pixels in the
    # pool, a failed request (counted: decoding it cost CPU); then the same four requests without a pool
    assert [(n, t == main) for _, n, t in heard] == [(1, True), (3, False), (0, True), (1, False), (2, True),
                                                     (1, True), (3, True), (1, True), (2, True)]
    assert all(s >= 0 for s, _, _ in heard) and heard[1][0] > 0 and heard[6][0] > 0
