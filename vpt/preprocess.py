"""timm's eval transform as batched tensor code, for uint8 images already on (or bound for) the device.

`preprocess(images, config, device)` takes decoded RGB images as uint8 (H, W, 3) tensors of any
sizes and returns the (n, 3, H', W') float batch the backbone eats, doing what
`vpt.transforms.eval_transform` does with PIL: resize (shorter side to `input / crop_pct`, or both
sides in `squash` mode) with the config's interpolation and antialiasing, centre crop, scale to
[0, 1], normalise.

Resize and crop (bilinear, bicubic): per image and channel, crop = Wy @ x @ Wx^T, where the rows of
Wy (H', h) and Wx (W', w) are the rows of torch's antialiased interpolation matrices
(`F.interpolate(..., antialias=True, align_corners=False)`: PIL's triangle or a = -0.5 cubic filter,
support widened by the scale when downscaling, windows and weights computed in float32 as torch's
CPU kernel computes them) that the centre crop keeps, with zero rows where it pads. The matrices are
banded, so they are stored as blocks of up to `BLOCK` output rows, each reading one window of input
rows, and an image costs a few small matrix products rather than a dense (H', h) one. The blocks
are cached per axis (input size, resized size, crop, mode, device) in a bounded LRU (`PLAN_CACHE`).
Nearest modes resize each size group with `F.interpolate`.

Tolerance: against `F.interpolate` with antialias followed by the crop, the float results agree
within 1e-3 (float32 sums in another order, measured <= 2e-4); after rounding, only values within
~1e-4 of a half can round the other way, by 1: on photos up to 3 pixels in 10^4 (32 px crops of
small upscaled images, where exact halves are common), a few in 10^6 at 224 px.
PIL resizes uint8 with fixed-point filters; this code resizes in float32 and rounds to integers
before normalising, as PIL's uint8 output does. Measured on real photos at 224 px, in 0-255 pixel
units before normalisation: mean absolute difference ~0.15 for both interpolations, worst pixel 1
(bilinear) and up to ~10 at sharp edges (bicubic: PIL's and torch's cubic kernels differ).
tests/vpt/test_preprocess.py pins mean <= 0.5, max <= 16 (bicubic) and <= 1 (bilinear) against PIL,
and <= 1e-3 before rounding, <= 1e-3 of the pixels after it against `F.interpolate`.
`border` crop mode (pad instead of crop) is not supported here.
"""
from __future__ import annotations

import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vpt.transforms import data_config

MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest", "nearest-exact": "nearest-exact"}
CROP_MODES = ("center", "squash")
SEPARABLE = ("bilinear", "bicubic")   # resized with cached weight matrices; the rest with F.interpolate
BLOCK = 32                            # output rows per band block (see AxisPlan)
CHUNK = 1 << 20                       # elements converted to float at a time (4 MiB of float32, reused)


@dataclass(frozen=True)
class EvalGeometry:
    """What the eval transform does to an image of a given size: resize to (rh, rw), crop at (top, left)."""

    rh: int
    rw: int
    top: int
    left: int


@dataclass(frozen=True)
class AxisPlan:
    """One axis of resize + crop as a banded matrix cut into blocks of output indices: output
    b * rows + r is sum_j weight[b, j, r] * input[lo + b * stride + j]. The blocks' windows are evenly
    spaced, so strided views of the slab of inputs [lo, lo + span) read them all; indices outside
    the image get zero weight (the slab is zero there). Outputs past the crop, or where it pads, are 0."""

    lo: int
    span: int
    stride: int
    weight: Tensor     # (blocks, window, rows) float32

    @property
    def nbytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class PlanCache:
    """A thread-safe LRU of `AxisPlan`s, bounded in entries and in bytes of weights."""

    def __init__(self, max_entries: int = 4096, max_bytes: int = 64 << 20) -> None:
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self.nbytes = 0
        self._plans: OrderedDict[tuple, AxisPlan] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, key: tuple, build: Callable[[], AxisPlan]) -> AxisPlan:
        with self._lock:
            plan = self._plans.get(key)
            if plan is not None:
                self._plans.move_to_end(key)
                return plan
        plan = build()
        with self._lock:
            if key not in self._plans:
                self._plans[key] = plan
                self.nbytes += plan.nbytes
            plans = self._plans
            while len(plans) > 1 and (len(plans) > self.max_entries or self.nbytes > self.max_bytes):
                self.nbytes -= plans.popitem(last=False)[1].nbytes
        return plan

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self.nbytes = 0


PLAN_CACHE = PlanCache()


class Preprocessor:
    """Batched eval transform for one data config (see the module docstring)."""

    def __init__(self, config: Mapping[str, Any] | Any) -> None:
        cfg = data_config(config)
        _, self.height, self.width = cfg["input_size"]
        self.crop_pct = float(cfg["crop_pct"] or 0.875)
        self.crop_mode = cfg.get("crop_mode") or "center"
        if self.crop_mode not in CROP_MODES:
            raise ValueError(f"crop_mode {self.crop_mode!r} is not supported on the device; use one of {CROP_MODES}")
        interp = str(cfg["interpolation"])
        if interp not in MODES:
            raise ValueError(f"interpolation {interp!r} is not supported on the device; use one of {list(MODES)}")
        self.mode = MODES[interp]
        self.mean = tuple(cfg["mean"])
        self.std = tuple(cfg["std"])
        self.scale = (math.floor(self.height / self.crop_pct), math.floor(self.width / self.crop_pct))

    @property
    def min_side(self) -> int:
        """Decoding may shrink an image (JPEG draft) as long as both sides stay at least this long."""
        return max(self.scale)

    def geometry(self, h: int, w: int) -> EvalGeometry:
        return EvalGeometry(*self._geometry(h, w))

    def _geometry(self, h: int, w: int) -> tuple[int, int, int, int]:
        sh, sw = self.scale
        if self.crop_mode == "squash":
            rh, rw = sh, sw
        elif sh == sw:  # torchvision Resize(int): the shorter side to sh, the longer truncated
            short, long_ = (h, w) if h <= w else (w, h)
            new_long = int(sh * long_ / short)
            rh, rw = (sh, new_long) if h <= w else (new_long, sh)
        else:  # timm's ResizeKeepRatio: the smaller ratio wins
            ratio = min(h / sh, w / sw)
            rh, rw = round(h / ratio), round(w / ratio)
        return rh, rw, _crop_offset(rh, self.height), _crop_offset(rw, self.width)

    def __call__(self, images: Sequence[Tensor], device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, pin: bool = False) -> Tensor:
        """uint8 (H, W, 3) images -> (n, 3, height, width) normalised `dtype` batch on `device`.

        `pin`: stage the images in pinned host memory so the upload overlaps (CUDA only)."""
        x = self.resize_crop(images, device, pin).clamp_(0, 255).round_()                   # (n, 3, H', W')
        return normalise(x, self.mean, self.std).to(dtype)

    def resize_crop(self, images: Sequence[Tensor], device: torch.device | str = "cpu",
                    pin: bool = False) -> Tensor:
        """uint8 (H, W, 3) images -> (n, 3, height, width) float32 0..255 values on `device`, resized
        and centre-cropped (zeros where the crop pads), before clamping and rounding."""
        if self.mode in SEPARABLE:
            blocks = self._blocks(images, torch.device(device), pin)                  # (n, by, bx, 3, ry, rx)
            n, by, bx, _, ry, rx = blocks.shape
            x = blocks.permute(0, 3, 1, 4, 2, 5).reshape(n, 3, by * ry, bx * rx)           # (n, 3, H'', W'')
            return x[:, :, :self.height, :self.width]                                       # (n, 3, H', W')
        out = torch.empty((len(images), 3, self.height, self.width), device=device,
                          dtype=torch.float32)                                              # (n, 3, H', W')
        for (h, w), idx in size_groups(images).items():
            g = self.geometry(h, w)
            x = upload(images, idx, device, pin)                                            # (k, 3, h, w)
            x = resize(x, (g.rh, g.rw), self.mode)                                          # (k, 3, rh, rw)
            out[idx] = _crop(x, g, self.height, self.width)                                 # (k, 3, H', W')
        return out

    def plans(self, h: int, w: int, device: torch.device | str = "cpu") -> tuple[AxisPlan, AxisPlan]:
        """The (rows, columns) plans of an h x w image: its resize and crop as banded matrices
        (bilinear and bicubic only)."""
        rh, rw, top, left = self._geometry(h, w)
        return (_axis_plan(h, rh, top, self.height, self.mode, device),
                _axis_plan(w, rw, left, self.width, self.mode, device))

    def _blocks(self, images: Sequence[Tensor], device: torch.device, pin: bool) -> Tensor:
        """`resize_crop` for bilinear/bicubic, block-major: (n, by, bx, 3, ry, rx), where pixel
        (c, b * ry + r, q * rx + p) of image i is [i, b, q, c, r, p] (rows and columns past the crop
        size, when it does not split into equal blocks, are zero).

        The slab of input pixels each image's plans read is packed into one uint8 buffer (one upload
        for the batch), converted to float a chunk of images at a time into one reused buffer, then
        multiplied by the plans: two batched products per image, rows (one window of input rows per
        block of output rows) then columns (the same for each block of output columns, per row
        block), reading the windows through strided views. Images are not padded to a common size
        for one product per batch: photos of random sizes would pad to the largest, multiplying the
        arithmetic, which is already the larger part of the cost (the products take about half the
        CPU time at 32 px, three quarters at 224 px, where dense (H', h) matrices instead of the
        bands make the whole about 3x slower). The products are float32: CUDA's TF32 matmuls, if a caller
        enabled them, would round the pixels to 11 significant bits and move many roundings."""
        n = len(images)
        plans = []
        for i, img in enumerate(images):
            _check_image(i, img)
            plans.append(self.plans(int(img.shape[0]), int(img.shape[1]), device))
        if n == 0:
            (by, ry), (bx, rx) = _blocking(self.height), _blocking(self.width)
            return torch.zeros((0, by, bx, 3, ry, rx), device=device)
        sizes = [py.span * px.span * 3 for py, px in plans]
        flat = _pack(images, plans, sizes, pin).to(device, non_blocking=True)          # (sum sizes,) uint8
        by, ry = plans[0][0].weight.shape[::2]
        bx, rx = plans[0][1].weight.shape[::2]
        out = torch.empty((n * by, bx, 3 * ry, rx), device=device)                     # (n*by, bx, 3*ry, rx)
        blocks_out = out.unbind(0)
        chunk = torch.empty(min(max(CHUNK, max(sizes)), len(flat)), device=device)   # reused: stays in cache
        off = base = end = 0
        for i, (py, px) in enumerate(plans):
            if off == end:  # the next chunk: whole images, up to CHUNK elements (at least one image)
                base = end
                for size in sizes[i:]:
                    if end > base and end + size - base > chunk.numel():
                        break
                    end += size
                chunk[:end - base].copy_(flat[base:end])
            c, wy, wx = 3 * px.span, py.weight.shape[1], px.weight.shape[1]
            xt = chunk.as_strided((by, c, wy), (py.stride * c, 1, c), off - base)          # (by, 3*sx, wy)
            t = torch.bmm(xt, py.weight)                                                    # (by, 3*sx, ry)
            for b in range(by):
                tw = t.as_strided((bx, 3 * ry, wx), (px.stride * 3 * ry, 1, 3 * ry), b * c * ry)
                torch.bmm(tw, px.weight, out=blocks_out[i * by + b])                        # (bx, 3*ry, rx)
            off += sizes[i]
        return out.view(n, by, bx, 3, ry, rx)


def aa_taps(n_in: int, n_out: int, idx: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """torch's antialiased (`antialias=True, align_corners=False`) taps of an n_in -> n_out resize for
    output indices `idx` (k,): first input index xmin (k,), count xsize (k,), weights (k, taps)
    (zero past xsize), for "bilinear" (triangle) or "bicubic" (cubic, a = -0.5).

    As aten's `_compute_indices_min_size_weights_aa` (PIL's precompute_coeffs) for float input, in its
    float32 arithmetic: scale = n_in / n_out, support = (1 or 2) * max(scale, 1),
    centre = (i + 0.5) * scale, window [trunc(centre - support + 0.5), trunc(centre + support + 0.5))
    within the input, filter((j - centre + 0.5) / max(scale, 1)), weights divided by their sum.
    Bit-identical to torch's CPU weights where its build fuses the cubic's multiply-adds (x86
    AVX2/AVX-512), as this does; elsewhere within a float32 rounding."""
    f32, f64 = np.float32, np.float64
    scale = f32(n_in) / f32(n_out)
    half = 1.0 if mode == "bilinear" else 2.0                       # interp_size / 2
    support = f32(half * float(scale)) if scale >= 1.0 else f32(half)
    invscale = float(f32(1.0 / float(scale))) if scale >= 1.0 else 1.0
    taps = math.ceil(support) * 2 + 1
    centre = ((idx + 0.5) * float(scale)).astype(f32)[:, None]       # (k, 1)
    xmin = np.maximum((centre - support).astype(f64) + 0.5, 0).astype(np.int64)
    xmax = np.minimum(((centre + support).astype(f64) + 0.5).astype(np.int64), n_in)
    xsize = np.clip(xmax - xmin, 0, taps)                            # (k, 1)
    j = np.arange(taps)
    x = ((xmin + j).astype(f32) - centre).astype(f64)               # (k, taps)
    x = np.abs(((x + 0.5) * invscale).astype(f32)).astype(f64)      # the filter's float32 argument
    if mode == "bilinear":
        w = np.where(x < 1.0, 1.0 - x, 0.0).astype(f32)
    else:  # a fused multiply-add is a float64 multiply-add rounded once to float32
        # |x| < 1: ((a + 2) x - (a + 3)) x x + 1;  1 <= |x| < 2: ((a x - 5a) x + 8a) x - 4a
        near = ((1.5 * x - 2.5).astype(f32) * x.astype(f32)).astype(f64) * x + 1.0
        far = ((-0.5 * x + 2.5).astype(f32).astype(f64) * x - 4.0).astype(f32).astype(f64) * x + 2.0
        w = np.where(x < 1.0, near.astype(f32), np.where(x < 2.0, far.astype(f32), f32(0)))
    w[j >= xsize] = 0
    total = np.cumsum(w, axis=1, dtype=f32)[:, -1:]                # summed in order, as the kernel does
    np.divide(w, total, out=w, where=total != 0)
    return xmin[:, 0], xsize[:, 0], w


def resize_matrix(n_in: int, n_out: int, mode: str) -> Tensor:
    """The dense (n_out, n_in) float32 matrix of torch's antialiased 1-d resize (see `aa_taps`)."""
    xmin, _, w = aa_taps(n_in, n_out, np.arange(n_out), mode)
    m = np.zeros((n_out, n_in + w.shape[1]), np.float32)
    np.put_along_axis(m, xmin[:, None] + np.arange(w.shape[1]), w, axis=1)
    return torch.from_numpy(np.ascontiguousarray(m[:, :n_in]))


def _axis_plan(n_in: int, n_out: int, start: int, length: int, mode: str, device: torch.device | str) -> AxisPlan:
    """Resize n_in -> n_out (bilinear or bicubic) then keep [start, start + length) (zeros outside
    0..n_out), as banded blocks (see `AxisPlan`), from `PLAN_CACHE`."""
    device = torch.device(device)
    return PLAN_CACHE.get((n_in, n_out, start, length, mode, device),
                          lambda: _build_plan(n_in, n_out, start, length, mode, device))


def _blocking(length: int) -> tuple[int, int]:
    """(blocks, rows): the fewest blocks of at most BLOCK rows, all of one size, covering `length`."""
    blocks = -(-length // BLOCK)
    return blocks, -(-length // blocks)


def _build_plan(n_in: int, n_out: int, start: int, length: int, mode: str, device: torch.device) -> AxisPlan:
    blocks, rows = _blocking(length)
    first, last = max(start, 0), min(start + length, n_out)         # resized indices the crop keeps
    if last <= first:                                                # the crop misses the image: all zeros
        return AxisPlan(0, 1, 0, torch.zeros((blocks, 1, rows), device=device))
    xmin, xsize, taps = aa_taps(n_in, n_out, np.arange(first, last), mode)
    p0, p1 = first - start, last - start                            # output indices of the kept rows
    used = np.arange(p0 // rows, (p1 - 1) // rows + 1)              # blocks holding kept rows
    starts = np.maximum(used * rows, p0) - p0                       # index of each one's first kept row
    lo_b = np.minimum.reduceat(xmin, starts)
    hi_b = np.maximum.reduceat(xmin + xsize, starts)
    # evenly spaced windows (one stride) so that strided views, not copies, can read them all
    stride = max(round(rows * n_in / n_out), 1) if len(used) > 1 else 0
    lo = int((lo_b - used * stride).min())
    window = max(int((hi_b - used * stride).max()) - lo, 1)
    pos = np.arange(p0, p1)
    blk = pos // rows
    w = np.zeros((blocks, window + taps.shape[1], rows), np.float32)
    col = (xmin - lo - blk * stride)[:, None] + np.arange(taps.shape[1])           # window index of each tap
    w[blk[:, None], col, (pos % rows)[:, None]] = taps
    weight = torch.from_numpy(np.ascontiguousarray(w[:, :window]))
    return AxisPlan(lo, (blocks - 1) * stride + window, stride, weight.to(device, non_blocking=True))


def _pack(images: Sequence[Tensor], plans: Sequence[tuple[AxisPlan, AxisPlan]], sizes: Sequence[int],
          pin: bool) -> Tensor:
    """The slab each image's plans read, (span_y, span_x, 3) uint8 (`sizes` elements) with zeros
    outside the image, one after another in a flat buffer on the images' device (pinned when `pin`)."""
    on_cpu = all(img.device.type == "cpu" for img in images)
    flat = torch.empty(sum(sizes), dtype=torch.uint8, device="cpu" if on_cpu else images[0].device,
                       pin_memory=pin and on_cpu)
    buf = flat.numpy() if on_cpu else flat
    off = 0
    for img, (py, px), size in zip(images, plans, sizes):
        src = img.numpy() if on_cpu else img.to(flat.device)
        h, w = src.shape[:2]
        dst = buf[off:off + size].reshape(py.span, px.span, 3)
        y0, y1 = max(py.lo, 0), min(py.lo + py.span, h)
        x0, x1 = max(px.lo, 0), min(px.lo + px.span, w)
        if y1 - y0 < py.span or x1 - x0 < px.span:
            dst[...] = 0
        if y1 > y0 and x1 > x0:
            dst[y0 - py.lo:y1 - py.lo, x0 - px.lo:x1 - px.lo] = src[y0:y1, x0:x1]
        off += size
    return flat


def _check_image(i: int, img: Tensor) -> None:
    if img.dim() != 3 or img.shape[2] != 3 or img.dtype != torch.uint8:
        raise ValueError(f"image {i}: expected uint8 (H, W, 3), got {img.dtype} {tuple(img.shape)}")


def size_groups(images: Sequence[Tensor]) -> dict[tuple[int, int], list[int]]:
    """Indices of the uint8 (H, W, 3) `images` by (H, W), in order; anything else is a ValueError."""
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        _check_image(i, img)
        groups.setdefault((int(img.shape[0]), int(img.shape[1])), []).append(i)
    return groups


def upload(images: Sequence[Tensor], idx: Sequence[int], device: torch.device | str, pin: bool = False) -> Tensor:
    """Images `idx` (one size) as a float (k, 3, h, w) batch of 0..255 values on `device`.

    `pin`: stage the group in pinned host memory so the upload overlaps (CUDA only)."""
    batch = torch.stack([images[i] for i in idx])                                           # (k, h, w, 3) uint8
    batch = (batch.pin_memory() if pin else batch).to(device, non_blocking=True)
    return batch.permute(0, 3, 1, 2).float()                                                # (k, 3, h, w)


def resize(x: Tensor, size: tuple[int, int], mode: str) -> Tensor:
    """(k, 3, h, w) 0..255 -> (k, 3, *size), antialiased for bilinear/bicubic, rounded as PIL's uint8 output."""
    if tuple(x.shape[2:]) == tuple(size):
        return x
    aa = mode in ("bilinear", "bicubic")
    x = F.interpolate(x, size=size, mode=mode, antialias=aa, **({"align_corners": False} if aa else {}))
    return x.clamp_(0, 255).round_()


def normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """(n, 3, H, W) 0..255 -> (x / 255 - mean) / std, per channel, float32."""
    m = torch.tensor(mean, device=x.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=x.device).view(1, 3, 1, 1) * 255.0
    return (x - m).div_(s)


def _crop_offset(resized: int, crop: int) -> int:
    """Where torchvision's CenterCrop starts along one axis: rounded half the excess, or, when the image
    is shorter than the crop, minus the padding it puts before it (half the shortfall, rounded down)."""
    return round((resized - crop) / 2.0) if resized >= crop else -((crop - resized) // 2)


def _crop(x: Tensor, g: EvalGeometry, height: int, width: int) -> Tensor:
    """torchvision's CenterCrop, padding with zeros where the image is smaller than the crop."""
    top, left = g.top, g.left
    if top < 0 or left < 0 or g.rh < height or g.rw < width:
        pad_t, pad_l = max(-top, 0), max(-left, 0)
        pad_b = max(height - g.rh - pad_t, 0)
        pad_r = max(width - g.rw - pad_l, 0)
        x = F.pad(x, (pad_l, pad_r, pad_t, pad_b))
        top, left = max(top, 0), max(left, 0)
    return x[:, :, top:top + height, left:left + width]


def to_uint8_hwc(image: Any) -> Tensor:
    """A PIL RGB image (or HWC uint8 array) -> uint8 (H, W, 3) tensor."""
    arr = np.array(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.uint8)
    return torch.from_numpy(arr)


class ImageTransform:
    """`Preprocessor` as a per-image PIL transform (datasets, the offline `vpt-serve eval`): the same
    arithmetic the server applies to its batches, so offline accuracy is what serving gives."""

    def __init__(self, config: Mapping[str, Any] | Any) -> None:
        self.pre = Preprocessor(config)

    def __call__(self, image: Any) -> Tensor:
        return self.pre([to_uint8_hwc(image)])[0]                                   # (3, H, W)
