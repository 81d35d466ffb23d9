"""Shared helpers for the server tests: task files for the tiny ViT, and image bytes."""
from __future__ import annotations

import io
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
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


def random_task(bb: Backbone, classes: list[str], method: str = "vpt-deep", p: int = 4, seed: int = 0) -> bytes:
    """A task as initialised before training: random prompts and head, so scores differ per image."""
    params = TaskParams.new(TaskSpec(method, p, tuple(classes)), bb, generator=torch.Generator().manual_seed(seed))
    return save_task_file(params, bb)


def png(seed: int = 0, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


TERMINAL = ("succeeded", "failed", "cancelled")


def finished(job: dict) -> bool:
    return job["state"] in TERMINAL


def running(job: dict) -> bool:
    """Running and past its first training step."""
    return job["state"] == "running" and job["progress"].get("step", 0) > 0


def wait_job(c: httpx.Client, job_id: str, until: Callable[[dict], bool] = finished, timeout: float = 300) -> dict:
    """Poll `GET /jobs/{job_id}` until `until(job)`; the job as last seen."""
    deadline = time.monotonic() + timeout
    job: dict = {}
    while time.monotonic() < deadline:
        r = c.get(f"/jobs/{job_id}")
        assert r.status_code == 200, r.text
        job = r.json()
        if until(job):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id}: condition not met within {timeout}s: {job}")


def ring_owner(root: Path) -> tuple[subprocess.Popen, Path]:
    """A real process that creates a ring and lives until killed; the ring's path."""
    proc, paths = _owner(root, "r = SlotRing.create(RingLayout(1, 2, 4096)); print(r.path, flush=True)", 1)
    return proc, paths[0]


def supervisor_leftovers(root: Path) -> tuple[subprocess.Popen, Path, Path]:
    """A real process that creates what a supervisor owns (a ring, a work folder with a file in it)
    as the supervisor does, and lives until killed; the ring's and the folder's paths."""
    proc, (ring, workdir) = _owner(root, "r = SlotRing.create(RingLayout(1, 2, 4096)); d, fd = owned_workdir(); "
                                         "(d / 'engine.sock').write_bytes(b''); print(r.path, flush=True); "
                                         "print(d, flush=True)", 2)
    return proc, ring, workdir


def _owner(root: Path, body: str, lines: int) -> tuple[subprocess.Popen, list[Path]]:
    code = ("import time; from server.channel import RingLayout, SlotRing, owned_workdir; "
            f"{body}; time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=root, stdout=subprocess.PIPE, text=True)
    return proc, [Path(proc.stdout.readline().strip()) for _ in range(lines)]
