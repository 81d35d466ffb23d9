"""Prompt-store latency and throughput for ViT-B/16 VPT-Deep p=50 task files, per backend.

    .venv/bin/python bench/store.py [--backends local redis] [--puts 100] [--gets 300] [--swaps 100]
                                    [--root DIR] [--redis-url URL]

For each backend prints one JSON line: put/get latency (p50, p99) and throughput, and
`swap_visible_p99_ms`: from the start of `put_task` in this process until a subscriber in another
process (a second replica) has the change event. Redis runs on its own `redis-server` on a free
loopback port unless `--redis-url` is given. Columns are computed by the functions in COLUMNS, so
further figures (e.g. the bank's `cold_load_ms`, `warm_acquire_us`) are one more function there.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import redis
from safetensors.numpy import save as st_save

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompt_store import ChangeEvent, Store, open_store

DEPTH, PROMPTS, DIM, CLASSES = 12, 50, 768, 100  # ViT-B/16, VPT-Deep p=50, a 100-class head


def task_blob(seed: int = 0) -> tuple[bytes, dict[str, str]]:
    """A task file as the server stores it: safetensors with prompts (12, 50, 768) and a 100x768 head."""
    rng = np.random.default_rng(seed)
    meta = {"format": "vpt-task/1", "method": "vpt-deep", "num_prompts": str(PROMPTS),
            "classes": json.dumps([f"class-{i}" for i in range(CLASSES)]), "backbone": "vit_base_patch16_224"}
    tensors = {
        "prompts": rng.standard_normal((DEPTH, PROMPTS, DIM), dtype=np.float32),  # (L_p, p, d)
        "head.weight": rng.standard_normal((CLASSES, DIM), dtype=np.float32),     # (C, d)
        "head.bias": np.zeros(CLASSES, dtype=np.float32),                          # (C,)
    }
    return st_save(tensors, metadata=meta), meta


def quantiles_ms(seconds: list[float]) -> tuple[float, float]:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, max(0, round(0.99 * len(ordered)) - 1))]
    return round(statistics.median(ordered) * 1e3, 3), round(p99 * 1e3, 3)


def store_columns(ctx: dict[str, Any]) -> dict[str, Any]:
    """put/get latency and single-client throughput on one task id."""
    store: Store = ctx["store"]
    blob, meta = ctx["blob"], ctx["meta"]
    store.put_task("bench", "warm-up", blob, meta)
    puts = []
    for _ in range(ctx["args"].puts):
        t0 = time.perf_counter()
        store.put_task("bench", "task", blob, meta)
        puts.append(time.perf_counter() - t0)
    gets = []
    for _ in range(ctx["args"].gets):
        t0 = time.perf_counter()
        _, got = store.get_task("bench", "task")
        gets.append(time.perf_counter() - t0)
    assert got == blob
    put_p50, put_p99 = quantiles_ms(puts)
    get_p50, get_p99 = quantiles_ms(gets)
    return {"put_p50_ms": put_p50, "put_p99_ms": put_p99, "get_p50_ms": get_p50, "get_p99_ms": get_p99,
            "put_per_s": round(len(puts) / sum(puts), 1), "get_per_s": round(len(gets) / sum(gets), 1)}


def _replica(url: str, options: dict[str, Any], conn: Any) -> None:
    """Another process with its own store client: report (version, monotonic time) of each put event."""
    store = open_store(url, **options)

    def on_event(event: ChangeEvent) -> None:
        if event.kind == "put" and event.task_id == "swap":
            conn.send((event.version, time.monotonic()))

    store.subscribe(on_event)
    conn.send("ready")
    conn.recv()  # told to stop
    store.close()


def swap_columns(ctx: dict[str, Any]) -> dict[str, Any]:
    """p99 from put_task start here to the event in a subscriber of another process (CLOCK_MONOTONIC
    is shared by all processes of the host)."""
    store: Store = ctx["store"]
    mp = multiprocessing.get_context("spawn")
    here, there = mp.Pipe()
    proc = mp.Process(target=_replica, args=(ctx["url"], ctx["options"], there), daemon=True)
    proc.start()
    assert here.recv() == "ready"
    latencies = []
    rng = random.Random(0)
    for _ in range(ctx["args"].swaps):
        time.sleep(rng.uniform(0.0, 0.05))  # de-phase puts from the local store's 0.05 s poll
        t0 = time.monotonic()
        version = store.put_task("bench", "swap", ctx["blob"], ctx["meta"]).version
        while True:
            if not here.poll(10):
                raise RuntimeError(f"no event for version {version} within 10 s")
            got, t1 = here.recv()
            if got == version:
                latencies.append(t1 - t0)
                break
    here.send("stop")
    proc.join(timeout=10)
    return {"swap_visible_p99_ms": quantiles_ms(latencies)[1], "swap_visible_p50_ms": quantiles_ms(latencies)[0]}


# Each function takes the context (store, url, options, blob, meta, args) and returns columns.
_BACKBONE: list[Any] = []


def bank_columns(ctx: dict[str, Any]) -> dict[str, Any]:
    """Bank cold load (store get + task file parse + deep K/V of all 12 blocks + slot write) and
    warm acquire (resident task: pin + release), with a ViT-B/16 of random weights."""
    import torch

    from prompt_store.bank import PromptBank
    from vpt.backbone import load_backbone
    from vpt.task import TaskParams, TaskSpec, read_metadata, save_task_file

    if not _BACKBONE:
        torch.manual_seed(0)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        _BACKBONE.append(load_backbone("vit_base_patch16_224", pretrained=False, device=device,
                                       dtype=torch.bfloat16 if device == "cuda" else torch.float32))
    bb, store, n = _BACKBONE[0], ctx["store"], ctx["args"].bank_tasks
    classes = tuple(f"class-{i}" for i in range(CLASSES))
    for i in range(n):
        blob = save_task_file(TaskParams.new(TaskSpec("vpt-deep", PROMPTS, classes), bb), bb)
        store.put_task("bench", f"bank-{i}", blob, read_metadata(blob))
    bank = PromptBank(bb, store, capacity_bytes=1 << 34, subscribe=False)
    cold = []
    for i in range(n):
        t0 = time.perf_counter()
        bank.release(bank.acquire("bench", [f"bank-{i}"]))
        if bb.device.type == "cuda":
            torch.cuda.synchronize()
        cold.append(time.perf_counter() - t0)
    warm = []
    for r in range(ctx["args"].gets):
        t0 = time.perf_counter()
        bank.release(bank.acquire("bench", [f"bank-{r % n}"]))
        warm.append(time.perf_counter() - t0)
    cold_p50, _ = quantiles_ms(cold[1:] or cold)  # the first load also allocates the table
    return {"cold_load_ms": cold_p50, "warm_acquire_us": round(statistics.median(warm) * 1e6, 1),
            "bank_slot_bytes": bank.stats().resident_bytes // max(1, bank.stats().resident_tasks)}


COLUMNS: list[Callable[[dict[str, Any]], dict[str, Any]]] = [store_columns, swap_columns, bank_columns]


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({cpu})"


def start_redis(workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    """A private redis-server on a free loopback port (append-only, fsync every second: the compose default)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    workdir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--appendonly", "yes", "--appendfsync", "everysec", "--save", ""],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    probe = redis.Redis.from_url(url, socket_connect_timeout=0.5)
    for _ in range(200):
        try:
            probe.ping()
            return proc, url
        except redis.RedisError:
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError("redis-server did not start")


def run_backend(name: str, url: str, options: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    blob, meta = task_blob()
    store = open_store(url, **options)
    ctx = {"store": store, "url": url, "options": options, "blob": blob, "meta": meta, "args": args}
    row: dict[str, Any] = {"backend": name, "blob_bytes": len(blob)}
    try:
        for column in COLUMNS:
            row.update(column(ctx))
    finally:
        store.close()
    row["device"] = device_name()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", nargs="+", default=["local", "redis"], choices=["local", "redis"])
    ap.add_argument("--puts", type=int, default=100)
    ap.add_argument("--gets", type=int, default=300)
    ap.add_argument("--swaps", type=int, default=100)
    ap.add_argument("--bank-tasks", type=int, default=8, help="ViT-B/16 deep p=50 tasks loaded into the bank")
    ap.add_argument("--root", type=Path, default=None, help="directory for the local store (default: a temp dir)")
    ap.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vpt-store-bench-"))
    redis_proc = None
    try:
        for backend in args.backends:
            if backend == "local":
                root = args.root or work / "local"
                row = run_backend("local", f"file://{root}", {}, args)
            else:
                url = args.redis_url
                if url is None:
                    redis_proc, url = start_redis(work / "redis")
                row = run_backend("redis", url, {"prefix": "bench" + uuid.uuid4().hex[:8]}, args)
            print(json.dumps(row), flush=True)
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
