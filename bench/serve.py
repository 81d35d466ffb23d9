"""End-to-end serving: concurrent HTTP clients over mixed tasks vs the offline engine at the same batch size.

    .venv/bin/python bench/serve.py [--model vit_base_patch16_224] [--clients 32] [--tasks 8] [--seconds 30]
        [--training [--train-epochs 40]]

Starts its own `vpt-serve serve` process (random backbone weights saved to a temp file, so the
server and this script share one fingerprint), imports `--tasks` vpt-deep tasks, measures the
engine offline first, then drives the server with `--clients` threads for `--seconds`, then times
how long a newly imported version takes to be served. Prints one JSON line.

`--training` adds the case "training in the background": the server runs one in-process training
worker; serving img/s is measured with it idle, then while a training job (vpt-deep, random
images) runs, and the job is then waited for. Prints a second JSON line (ratio, job outcome, and
the training steps done during the window: serving first, training still progresses).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vpt.backbone import load_backbone
from vpt.engine import forward_logits, stack_slots, task_slot_tensors
from vpt.task import TaskParams, TaskSpec, save_task_file


def png(seed: int, size: int) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))] if xs else float("nan")


def engine_img_s(bb, tasks: list[TaskParams], batch: int, reps: int) -> float:
    table = stack_slots(bb, [task_slot_tensors(bb, t) for t in tasks])
    slot = torch.arange(batch) % len(tasks)
    images = torch.randn(batch, *bb.data_config["input_size"])
    with torch.inference_mode():
        forward_logits(bb, images, table, slot)
        t0 = time.perf_counter()
        for _ in range(reps):
            forward_logits(bb, images, table, slot)
    return batch * reps / (time.perf_counter() - t0)


def start_server(args: argparse.Namespace, weights: Path, store: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "VPT_BACKBONE": args.model, "VPT_BACKBONE_WEIGHTS": str(weights),
           "VPT_BACKBONE_KWARGS": json.dumps(args.kwargs), "VPT_STORE": str(store), "VPT_PORT": str(port),
           "VPT_WORKERS": "1" if args.training else "0", "VPT_MAX_BATCH_SIZE": str(args.batch), "VPT_MAX_WAIT_MS": str(args.wait_ms),
           "VPT_QUEUE_LIMIT": "4096", "VPT_LOG_LEVEL": "warning", "VPT_REQUEST_TIMEOUT_S": "600"}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not become ready")


forward_per_img: list[float] = []


def load(url: str, names: list[str], images: list[bytes], clients: int, seconds: float) -> tuple[list[float], int, int]:
    latencies: list[float] = []
    forward_per_img.clear()
    errors = [0]
    done_images = [0]
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as c:
            k = i
            while time.monotonic() < stop:
                t0 = time.perf_counter()
                r = c.post("/predict", params={"task": names[k % len(names)]}, content=images[k % len(images)],
                           headers={"content-type": "image/png"})
                dt = (time.perf_counter() - t0) * 1000
                with lock:
                    if r.status_code == 200:
                        latencies.append(dt)
                        t = r.json()["timings_ms"]
                        forward_per_img.append(t["forward"] / t["batch_images"])
                        done_images[0] += 1
                    else:
                        errors[0] += 1
                k += clients

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latencies, errors[0], int(done_images[0] / (time.perf_counter() - t0) * 1000)


def swap_visible_ms(url: str, bb, name: str) -> float:
    """PUT a new version whose answer differs, then poll until a prediction comes from it."""
    classes = tuple(f"c{i}" for i in range(10))
    params = TaskParams.new(TaskSpec("vpt-deep", 10, classes), bb)
    with torch.no_grad():
        params.head.weight.zero_()
        params.head.bias.fill_(-5)
        params.head.bias[7] = 5
    blob = save_task_file(params, bb)
    img = png(0, bb.data_config["input_size"][-1])
    with httpx.Client(base_url=url, timeout=600) as c:
        r = c.put(f"/tasks/{name}/import", content=blob)
        t0 = time.perf_counter()
        new_version = r.json()["current_version"]
        while True:
            body = c.post("/predict", params={"task": name}, content=img, headers={"content-type": "image/png"}).json()
            if body["version"] == new_version:
                return (time.perf_counter() - t0) * 1000


def batch_stats(url: str) -> dict[str, float]:
    """Mean images per forward, from the server's own Prometheus histogram."""
    text = httpx.get(url + "/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line.startswith(("vpt_batch_images_sum ", "vpt_batch_images_count ")):
            name, value = line.split()
            values[name] = float(value)
    count = values.get("vpt_batch_images_count", 0.0)
    return {"batches": int(count), "mean_batch": round(values.get("vpt_batch_images_sum", 0.0) / count, 2) if count else 0}


def dataset_zip(path: Path, size: int, classes: int = 4, per_class: int = 50) -> Path:
    """A folder-layout training set of random PNGs (speed does not depend on what they show)."""
    with zipfile.ZipFile(path, "w") as zf:
        for c in range(classes):
            for i in range(per_class):
                zf.writestr(f"c{c}/{i}.png", png(1000 * c + i, size))
    return path


def job_steps(c: httpx.Client, job_id: str) -> tuple[str, int]:
    job = c.get(f"/jobs/{job_id}").json()
    return job["state"], int((job.get("progress") or {}).get("step") or 0)


def training_case(args: argparse.Namespace, url: str, names: list[str], images: list[bytes], idle: float,
                  size: int, tmp: Path) -> dict:
    """Serving img/s while an embedded training job runs, vs idle; then the job must finish."""
    with httpx.Client(base_url=url, timeout=600) as c:
        archive = dataset_zip(tmp / "train.zip", size)
        r = c.post("/tasks/background/train", files={"dataset": ("train.zip", archive.read_bytes())},
                   data={"epochs": str(args.train_epochs), "batch_size": "16", "num_prompts": "10",
                         "val_fraction": "0.1"})
        r.raise_for_status()
        job_id = r.json()["job_id"]
        t_submit = time.perf_counter()
        while (s := job_steps(c, job_id))[1] < 1:  # running and past its first step
            if s[0] not in ("queued", "running"):
                raise SystemExit(f"the training job ended before the window: {c.get(f'/jobs/{job_id}').text}")
            time.sleep(0.2)
        steps0 = job_steps(c, job_id)[1]
        latencies, errors, _ = load(url, names, images, args.clients, args.seconds)
        state, steps1 = job_steps(c, job_id)
        while state in ("queued", "running"):
            time.sleep(0.5)
            state, _ = job_steps(c, job_id)
        job_s = time.perf_counter() - t_submit
    busy = len(latencies) / args.seconds
    return {"case": "training_background", "model": args.model, "clients": args.clients, "batch": args.batch,
            "idle_img_s": round(idle, 2), "training_img_s": round(busy, 2), "ratio": round(busy / idle, 3),
            "errors": errors, "job_state": state, "job_s": round(job_s, 1),
            "train_steps_in_window": steps1 - steps0, "still_running_after_window": state != "succeeded" or None,
            "p99_ms": round(percentile(latencies, 99), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--kwargs", type=json.loads, default={})
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--wait-ms", type=float, default=20)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--port", type=int, default=18731)
    ap.add_argument("--training", action="store_true", help="add the training-in-the-background case")
    ap.add_argument("--train-epochs", type=int, default=40)
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(args.model, pretrained=False, model_kwargs=args.kwargs)
    size = bb.data_config["input_size"][-1]
    tasks = [TaskParams.new(TaskSpec("vpt-deep", args.prompts, tuple(f"c{i}" for i in range(10))), bb)
             for _ in range(args.tasks)]
    engine = engine_img_s(bb, tasks, args.batch, reps=3)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "backbone.safetensors"
        save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
        proc = start_server(args, weights, Path(tmp) / "store", args.port)
        url = f"http://127.0.0.1:{args.port}"
        try:
            names = [f"task{i}" for i in range(args.tasks)]
            with httpx.Client(base_url=url, timeout=600) as c:
                for name, t in zip(names, tasks):
                    c.put(f"/tasks/{name}/import", content=save_task_file(t, bb)).raise_for_status()
            images = [png(i, size) for i in range(64)]
            load(url, names, images, args.clients, min(5.0, args.seconds / 5))  # warm-up
            latencies, errors, _ = load(url, names, images, args.clients, args.seconds)
            server = len(latencies) / args.seconds
            swap = swap_visible_ms(url, bb, names[0])
            batches = batch_stats(url)
            background = (training_case(args, url, names, images, server, size, Path(tmp))
                          if args.training else None)
            proc.terminate()
            proc.wait(30)
            engine = (engine + engine_img_s(bb, tasks, args.batch, reps=3)) / 2  # before and after: drift hits both
        finally:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(30)
    print(json.dumps({
        "model": args.model, "clients": args.clients, "tasks": args.tasks, "batch": args.batch,
        "server_img_s": round(server, 2), "engine_img_s": round(engine, 2),
        "server_vs_engine": round(server / engine, 3), "p50_ms": round(statistics.median(latencies), 1) if latencies else None,
        "p95_ms": round(percentile(latencies, 95), 1), "p99_ms": round(percentile(latencies, 99), 1),
        "swap_visible_ms": round(swap, 1), "errors": errors, **batches,
        "server_forward_ms_per_img": round(statistics.median(forward_per_img), 1) if forward_per_img else None,
        "engine_ms_per_img": round(1000 / engine, 1),
        "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)",
    }))
    if background is not None:
        print(json.dumps({**background, "device": f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"}))


if __name__ == "__main__":
    main()
