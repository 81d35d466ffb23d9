"""Many tasks per device: the tiered bank under Zipf popularity vs every task resident, and one
10,000-class task among small ones vs the small ones alone.

    .venv/bin/python bench/scale.py [--tasks 100 1000 10000] [--batch 32] [--batches 200] [--rounds 3]

Case `zipf`: T vpt-deep tasks (p=10) in a real local store, requests drawn with Zipf(1.0)
popularity, batches of `--batch` images. The bank's device tier holds 5% of the tasks, its host
tier all of them (warmed by one pass); the reference is the same bank sized for every task. Each
batch prefetches the next batch's tasks (as the server does when requests are queued) and runs
acquire -> pack -> forward with grouped heads -> release. Prints img/s of both, the ratio and
per-tier hit rates, measured round-robin in the same run.

Case `wide`: 100 small tasks (10 classes) alone vs the same 100 plus one 10,000-class task that
gets its share of requests: small tasks' img/s with and without it; `padded_*` shows the former
layout (one table padded to the widest task) on the same batches for reference.

One JSON line per case with the device. On a CPU the device tier lives in host memory, so an
upload costs nothing there: the figures measure bookkeeping, packing and hit rates, not PCIe.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prompt_store.bank import PromptBank
from prompt_store.local import LocalStore
from vpt.backbone import Backbone, load_backbone
from vpt.engine import forward_grouped, forward_logits, stack_slots
from vpt.task import TaskParams, TaskSpec, read_metadata, save_task_file

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 0}
TENANT = "bench"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def fill_store(store: LocalStore, bb: Backbone, names: list[str], prompts: int, classes: int) -> None:
    """One random task file, stored under every name (content does not change the speed)."""
    spec = TaskSpec("vpt-deep", prompts, tuple(f"c{i}" for i in range(classes)))
    blob = save_task_file(TaskParams.new(spec, bb, generator=torch.Generator().manual_seed(0)), bb)
    meta = read_metadata(blob)
    for name in names:
        store.put_task(TENANT, name, blob, meta)


def zipf_batches(n_tasks: int, batch: int, batches: int, seed: int) -> list[list[int]]:
    rank = np.arange(1, n_tasks + 1)
    p = (1.0 / rank) / (1.0 / rank).sum()
    draws = np.random.default_rng(seed).choice(n_tasks, size=(batches, batch), p=p)
    return [row.tolist() for row in draws]


def run_bank(bank: PromptBank, bb: Backbone, images: torch.Tensor, batches: list[list[str]]) -> float:
    """Seconds to serve `batches` through the bank the way the batcher does."""
    t0 = time.perf_counter()
    for i, names in enumerate(batches):
        if i + 1 < len(batches):
            for name in set(batches[i + 1]):  # the next batch's requests are queued meanwhile
                bank.prefetch(TENANT, name)
        lease, errors = bank.acquire_each([(TENANT, n) for n in names])
        assert not any(errors), errors
        with torch.inference_mode():
            for _, logits in forward_grouped(bb, images, lease.table, lease.slots, lease.slot_ids(range(len(names)))):
                torch.softmax(logits.float(), dim=-1)
        bank.release(lease)
    return time.perf_counter() - t0


def warm(bank: PromptBank, names: list[str], chunk: int = 64) -> None:
    for i in range(0, len(names), chunk):
        bank.release(bank.acquire(TENANT, names[i:i + chunk]))


def rates(before, after) -> dict[str, float]:
    dh, dm = after.hits - before.hits, after.misses - before.misses
    hh, hm = after.host_hits - before.host_hits, after.host_misses - before.host_misses
    return {"device_hit_rate": round(dh / max(1, dh + dm), 4), "host_hit_rate": round(hh / max(1, hh + hm), 4),
            "device_evictions": after.evictions - before.evictions, "prefetches": after.prefetches - before.prefetches,
            "transient": after.transient - before.transient}


def zipf_case(bb: Backbone, root: Path, n_tasks: int, args: argparse.Namespace) -> dict:
    store = LocalStore(root / f"zipf{n_tasks}")
    names = [f"t{i}" for i in range(n_tasks)]
    fill_store(store, bb, names, args.prompts, 10)
    per = _task_bytes(bb, store, names[0])
    small = PromptBank(bb, store, max(1, int(0.05 * n_tasks)) * per, host_capacity_bytes=n_tasks * per,
                       subscribe=False)
    full = PromptBank(bb, store, n_tasks * per, host_capacity_bytes=n_tasks * per, subscribe=False)
    warm(small, names)
    warm(full, names)
    images = torch.randn(args.batch, *bb.data_config["input_size"]).to(bb.device, bb.dtype)
    times: dict[str, list[float]] = {"tiered": [], "all_resident": []}
    before = small.stats()
    for r in range(args.rounds):
        work = [[names[j] for j in row] for row in zipf_batches(n_tasks, args.batch, args.batches, seed=r)]
        times["tiered"].append(run_bank(small, bb, images, work))
        times["all_resident"].append(run_bank(full, bb, images, work))
    after = small.stats()
    imgs = args.batch * args.batches
    tiered, resident = imgs / statistics.median(times["tiered"]), imgs / statistics.median(times["all_resident"])
    small.close()
    full.close()
    store.close()
    return {"case": "zipf", "tasks": n_tasks, "prompts": args.prompts, "batch": args.batch,
            "device_tier_tasks": max(1, int(0.05 * n_tasks)), "tiered_img_s": round(tiered, 1),
            "all_resident_img_s": round(resident, 1), "ratio": round(tiered / resident, 3), **rates(before, after)}


def wide_case(bb: Backbone, root: Path, args: argparse.Namespace) -> dict:
    store = LocalStore(root / "wide")
    names = [f"s{i}" for i in range(100)]
    fill_store(store, bb, names, args.prompts, 10)
    fill_store(store, bb, ["wide"], args.prompts, 10_000)
    bank = PromptBank(bb, store, 1 << 30, subscribe=False)
    warm(bank, names + ["wide"])
    images = torch.randn(args.batch, *bb.data_config["input_size"]).to(bb.device, bb.dtype)
    rng = np.random.default_rng(0)
    alone = [[names[j] for j in rng.integers(0, 100, args.batch)] for _ in range(args.batches)]
    mixed = [[(names + ["wide"])[j] for j in rng.integers(0, 101, args.batch)] for _ in range(args.batches)]
    n_small = [sum(n != "wide" for n in b) for b in mixed]
    lease = bank.acquire(TENANT, names + ["wide"])
    padded = stack_slots(bb, lease.slots)                     # the former layout: every head 10,000 wide
    bank.release(lease)
    index = {n: i for i, n in enumerate(names + ["wide"])}
    times: dict[str, list[float]] = {"alone": [], "mixed": [], "padded_alone": [], "padded_mixed": []}
    for _ in range(args.rounds):
        times["alone"].append(run_bank(bank, bb, images, alone))
        times["mixed"].append(run_bank(bank, bb, images, mixed))
        times["padded_alone"].append(_run_padded(bb, padded, images, alone, index))
        times["padded_mixed"].append(_run_padded(bb, padded, images, mixed, index))
    med = {k: statistics.median(v) for k, v in times.items()}
    small_alone = args.batch * args.batches / med["alone"]
    small_mixed = sum(n_small) / med["mixed"]
    padded_alone = args.batch * args.batches / med["padded_alone"]
    bank.close()
    store.close()
    return {"case": "wide", "small_tasks": 100, "wide_classes": 10_000, "batch": args.batch,
            "small_img_s_alone": round(small_alone, 1), "small_img_s_with_wide": round(small_mixed, 1),
            "small_change": round(small_mixed / small_alone - 1, 3),
            "padded_small_img_s_with_wide": round(sum(n_small) / med["padded_mixed"], 1),
            "padded_vs_tiered_alone": round(padded_alone / small_alone, 3)}


def _run_padded(bb: Backbone, table, images: torch.Tensor, batches: list[list[str]], index: dict[str, int]) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        for names in batches:
            slot = torch.tensor([index[n] for n in names]).to(bb.device)
            torch.softmax(forward_logits(bb, images, table, slot).float(), dim=-1)
    return time.perf_counter() - t0


def _task_bytes(bb: Backbone, store: LocalStore, name: str) -> int:
    probe = PromptBank(bb, store, 1 << 30, subscribe=False)
    probe.release(probe.acquire(TENANT, [name]))
    n = probe.stats().resident_bytes
    probe.close()
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_tiny_patch16_224")
    ap.add_argument("--kwargs", type=json.loads, default=TINY, help="timm kwargs (default: a tiny 32 px ViT)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tasks", type=int, nargs="+", default=[100, 1000, 10000])
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cases", nargs="+", default=["zipf", "wide"])
    args = ap.parse_args()
    torch.manual_seed(0)
    bb = load_backbone(args.model, pretrained=False, model_kwargs=args.kwargs, device=args.device)
    extra = {"model": args.model, "device": device_name(bb.device)}
    with tempfile.TemporaryDirectory() as tmp:
        if "zipf" in args.cases:
            for n in args.tasks:
                print(json.dumps({**zipf_case(bb, Path(tmp), n, args), **extra}), flush=True)
        if "wide" in args.cases:
            print(json.dumps({**wide_case(bb, Path(tmp), args), **extra}), flush=True)


if __name__ == "__main__":
    main()
