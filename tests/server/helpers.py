"""Shared helpers for the server tests: task files for the tiny ViT, and image bytes."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from vpt.backbone import Backbone, load_backbone
from vpt.task import TaskParams, TaskSpec, save_task_file

_BB: dict[str, Backbone] = {}


def backbone_for(weights_file: str) -> Backbone:
    if weights_file not in _BB:
        _BB[weights_file] = load_backbone(TINY_NAME, weights=weights_file, model_kwargs=TINY_KWARGS)
    return _BB[weights_file]


def constant_task(bb: Backbone, classes: list[str], winner: int, method: str = "vpt-deep", p: int = 4,
                  seed: int = 0) -> bytes:
    """A task whose head always picks `classes[winner]` (zero weights, one large bias)."""
    g = torch.Generator().manual_seed(seed)
    params = TaskParams.new(TaskSpec(method, p, tuple(classes)), bb, generator=g)
    with torch.no_grad():
        params.head.weight.zero_()
        params.head.bias.fill_(-5.0)
        params.head.bias[winner] = 5.0
    return save_task_file(params, bb)


def png(seed: int = 0, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
