"""An offline demo that learns: synthetic digit images and a small ViT whose features separate them.

Nothing is downloaded. Digits 0-9 are drawn with Pillow's built-in font at random sizes, positions,
rotations, stroke widths and contrasts, with pixel noise (`digit_images`). The demo backbone is a
4-block, d=64 timm ViT on 32x32 inputs (8x8 patches), trained briefly on one draw of such digits
(`pretrain_backbone`, all weights, AdamW) and then frozen; tasks trained on it (prompts and head only)
from another draw of digits score far above chance (0.1). It shows the workflow; it says nothing
about transfer from a real pretrained backbone.
"""
from __future__ import annotations

import io
import json
import os
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DEMO_NAME = "vit_tiny_patch16_224"
DEMO_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2}
DEMO_SIZE = 32
CLASSES = tuple(str(d) for d in range(10))


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ValueError, OSError):  # Pillow built without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def render_digit(digit: int, rng: np.random.Generator, size: int = DEMO_SIZE) -> Image.Image:
    """One digit drawn at a random size, place, angle, stroke and contrast, with noise: RGB `size` x `size`."""
    canvas = 64
    bg, fg = int(rng.integers(0, 90)), int(rng.integers(165, 256))
    img = Image.new("L", (canvas, canvas), bg)
    font = _font(int(rng.integers(30, 46)))
    draw = ImageDraw.Draw(img)
    stroke = int(rng.integers(0, 3))
    left, top, right, bottom = draw.textbbox((0, 0), str(digit), font=font, stroke_width=stroke)
    x = (canvas - (right - left)) / 2 - left + rng.uniform(-6, 6)
    y = (canvas - (bottom - top)) / 2 - top + rng.uniform(-6, 6)
    draw.text((x, y), str(digit), fill=fg, font=font, stroke_width=stroke, stroke_fill=fg)
    img = img.rotate(rng.uniform(-15, 15), resample=Image.BILINEAR, fillcolor=bg)
    pixels = np.asarray(img.resize((size, size), Image.BILINEAR), dtype=np.float32)
    pixels = np.clip(pixels + rng.normal(0, 12, pixels.shape), 0, 255).astype(np.uint8)   # (size, size)
    return Image.fromarray(pixels, mode="L").convert("RGB")


def digit_images(per_class: int, seed: int, size: int = DEMO_SIZE) -> list[tuple[int, Image.Image]]:
    """(digit, image) pairs, `per_class` of each digit; different seeds give different draws."""
    rng = np.random.default_rng(seed)
    return [(d, render_digit(d, rng, size)) for _ in range(per_class) for d in range(10)]


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_digits_zip(path: Path, per_class: int = 30, seed: int = 1) -> Path:
    """A training archive in the folder layout: `<digit>/<digit>_<i>.png`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    counts = [0] * 10
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for digit, img in digit_images(per_class, seed):
            zf.writestr(f"{digit}/{digit}_{counts[digit]}.png", _png(img))
            counts[digit] += 1
    return path


def write_images(directory: Path, pairs: Iterable[tuple[int, Image.Image]]) -> list[Path]:
    """Images as `<digit>_<i>.png` files (held-out images to predict)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i, (digit, img) in enumerate(pairs):
        path = directory / f"{digit}_{i}.png"
        path.write_bytes(_png(img))
        out.append(path)
    return out


def fit_all_weights(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> None:
    """Train every weight of a classifier on images x (N, 3, H, W) and labels y (N,): AdamW (lr 2e-3,
    wd 0.05), a one-cycle schedule, batches of 64 in an order seeded by `seed`. Leaves it in train mode."""
    steps = epochs * ((len(x) + 63) // 64)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])              # (B, 10) logits
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()


def pretrain_backbone(path: Path, images_per_class: int = 400, epochs: int = 30, seed: int = 0) -> Path:
    """Train the demo ViT on synthetic digits (draw `seed + 1000`), save it without its head."""
    import timm

    from vpt.transforms import eval_transform

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(DEMO_NAME, pretrained=False, num_classes=10, **DEMO_KWARGS)
        config = {**timm.data.resolve_model_data_config(model), "input_size": (3, DEMO_SIZE, DEMO_SIZE)}
        transform = eval_transform(config)  # what the server applies
        data = digit_images(images_per_class, seed + 1000)
        x = torch.stack([transform(img) for _, img in data])                 # (N, 3, 32, 32)
        y = torch.tensor([digit for digit, _ in data])                       # (N,)
        fit_all_weights(model, x, y, epochs, seed)
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(state, str(tmp))
    os.replace(tmp, path)
    return path


def settings_env(weights: Path) -> dict[str, str]:
    """The VPT_* settings that serve the demo backbone."""
    return {"VPT_BACKBONE": DEMO_NAME, "VPT_BACKBONE_WEIGHTS": str(weights.resolve()),
            "VPT_BACKBONE_KWARGS": json.dumps(DEMO_KWARGS)}
