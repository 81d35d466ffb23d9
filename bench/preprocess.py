"""Device preprocessing on the CPU: vpt/preprocess.py's banded weight matrices vs F.interpolate per size.

    .venv/bin/python bench/preprocess.py [--images 600] [--warmup 2000] [--reps 3] [--seed 0]

Images are random crops of scikit-learn's `load_sample_images` resized to photo-like sizes: each
side 200-800 px, then shrunk as the front end's JPEG draft decoding would (the largest of 1/8, 1/4,
1/2 that keeps both sides >= `Preprocessor.min_side`, sides rounded up), so almost every image has
its own size. Cases: 32 px and 224 px models (crop_pct 0.9, `--interpolation`, default bicubic) at
batch 15 and 64. One JSON line per case, CPU milliseconds per image (time.process_time, torch at
one intra-op thread):
- `old_ms_per_img`: the previous formulation, written out here: per size group stack, permute,
  float, F.interpolate (antialiased), clamp, round, centre crop with zero padding, then normalise;
- `new_ms_per_img`: `Preprocessor.__call__` after `--warmup` images of the same distribution went
  through it (the weight cache as a running server has it: at 224 px most longer sides still miss);
- `new_cold_ms_per_img`: the same batches right after clearing the weight cache (every plan built);
- `ratio`: old / new. Old and new alternate `--reps` times over the same batches; medians are printed.
`max_abs_diff`: the largest difference between the two normalised outputs (a rounding tie that went
the other way is 1/255/std). The load average is printed: other work on the machine skews everything.
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_sample_images

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import vpt.preprocess as pp
from vpt.preprocess import Preprocessor


def photo_sizes(n: int, min_side: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(h, w) of n photos of 200-800 px a side after JPEG draft decoding for `min_side`."""
    out = []
    for h, w in rng.integers(200, 801, (n, 2)).tolist():
        for s in (8, 4, 2):
            if min(math.ceil(h / s), math.ceil(w / s)) >= min_side:
                h, w = math.ceil(h / s), math.ceil(w / s)
                break
        out.append((h, w))
    return out


def photo_batches(count: int, batch: int, min_side: int, rng: np.random.Generator) -> list[list[torch.Tensor]]:
    """`count` batches of uint8 (h, w, 3) images: random crops of the sample photos at photo_sizes."""
    sources = [Image.fromarray(a) for a in load_sample_images().images]
    batches = []
    for _ in range(count):
        images = []
        for h, w in photo_sizes(batch, min_side, rng):
            src = sources[int(rng.integers(2))]
            ch, cw = int(rng.integers(100, 428)), int(rng.integers(100, 641))
            top, left = int(rng.integers(0, 428 - ch)), int(rng.integers(0, 641 - cw))
            im = src.crop((left, top, left + cw, top + ch)).resize((w, h), Image.BILINEAR)
            images.append(torch.from_numpy(np.asarray(im).copy()))
        batches.append(images)
    return batches


def old_preprocess(pre: Preprocessor, images: list[torch.Tensor]) -> torch.Tensor:
    """The previous formulation: one F.interpolate per size group, then clamp, round, crop, normalise."""
    height, width = pre.height, pre.width
    out = torch.empty((len(images), 3, height, width))                                  # (n, 3, H, W)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault((int(img.shape[0]), int(img.shape[1])), []).append(i)
    for (h, w), idx in groups.items():
        g = pre.geometry(h, w)
        x = torch.stack([images[i] for i in idx]).permute(0, 3, 1, 2).float()             # (k, 3, h, w)
        if (g.rh, g.rw) != (h, w):
            x = F.interpolate(x, size=(g.rh, g.rw), mode=pre.mode, antialias=True, align_corners=False)
            x = x.clamp_(0, 255).round_()                                               # (k, 3, rh, rw)
        top, left = g.top, g.left
        if top < 0 or left < 0 or g.rh < height or g.rw < width:
            pad_t, pad_l = max(-top, 0), max(-left, 0)
            x = F.pad(x, (pad_l, max(width - g.rw - pad_l, 0), pad_t, max(height - g.rh - pad_t, 0)))
            top, left = max(top, 0), max(left, 0)
        out[idx] = x[:, :, top:top + height, left:left + width]
    m = torch.tensor(pre.mean).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(pre.std).view(1, 3, 1, 1) * 255.0
    return (out - m) / s


def cpu_ms_per_image(fn, batches: list[list[torch.Tensor]]) -> float:
    t = time.process_time()
    for images in batches:
        fn(images)
    return (time.process_time() - t) * 1000 / sum(len(b) for b in batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600, help="images measured per case (224 px: a quarter)")
    ap.add_argument("--warmup", type=int, default=2000, help="images through the new path before measuring")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--interpolation", default="bicubic", choices=["bicubic", "bilinear"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(args.seed)
    for px in (32, 224):
        cfg = {"input_size": (3, px, px), "crop_pct": 0.9, "interpolation": args.interpolation,
               "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
        pre = Preprocessor(cfg)
        for batch in (15, 64):
            images = args.images if px == 32 else max(args.images // 4, batch)
            batches = photo_batches(max(images // batch, 1), batch, pre.min_side, rng)
            diff = (old_preprocess(pre, batches[0]) - pre(batches[0])).abs().max().item()
            pp.PLAN_CACHE.clear()
            cold = cpu_ms_per_image(pre, batches)
            for warm in photo_batches(max(args.warmup // batch, 1), batch, pre.min_side, rng):
                pre(warm)
            old, new = [], []
            for _ in range(args.reps):
                old.append(cpu_ms_per_image(functools.partial(old_preprocess, pre), batches))
                new.append(cpu_ms_per_image(pre, batches))
            o, n = statistics.median(old), statistics.median(new)
            print(json.dumps({
                "case": f"{px}px_b{batch}", "model_px": px, "batch": batch, "interpolation": args.interpolation,
                "images": sum(len(b) for b in batches), "old_ms_per_img": round(o, 4),
                "new_ms_per_img": round(n, 4), "ratio": round(o / n, 2),
                "new_cold_ms_per_img": round(cold, 4), "plan_cache_entries": len(pp.PLAN_CACHE),
                "plan_cache_mb": round(pp.PLAN_CACHE.nbytes / 2**20, 1),
                "max_abs_diff": round(diff, 6), "torch_threads": torch.get_num_threads(),
                "load_avg": round(os.getloadavg()[0], 2)}), flush=True)


if __name__ == "__main__":
    main()
