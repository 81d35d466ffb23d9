"""Front-end throughput: wrk against the single-process server and N front-end processes, vs the offline engine.

    .venv/bin/python bench/frontend.py [--workers 0,1,2] [--seconds 20] [--rounds 1] [--connections 32] [--device cpu]

Needs Debian's wrk (`apt-get install wrk`). Requests are single images: random crops of
scikit-learn's `load_sample_images` resized to random sizes of 200-800 px, JPEG quality 90, each
for a random one of `--tasks` vpt-deep tasks, all on a tiny ViT (random weights saved to a temp
file so server and script share a fingerprint); wrk sends 256 requests built once, at random.
Cases, one JSON line each, in this order:
- `engine`: the offline engine, no HTTP: device preprocessing (vpt/preprocess.py) of already
  decoded uint8 images plus the forward, at `--batch`;
- `server` with `VPT_FRONTEND_WORKERS` = each of `--workers` (0 is the single-process server),
  `--rounds` times, interleaved (0, 1, 2, 0, 1, 2, ...): slow drifts of a shared machine then hit
  every case alike, and `vs_n0` compares each case with the same round's N=0;
- `summary`: medians over the rounds (img/s per N, the per-round ratio to N=0, the front ends' CPU).
Every process runs `--torch-threads` intra-op threads (default 1: on a small shared box, more
threads per process spin against each other). CPU per image by role comes from /proc/<pid>/stat
(utime + stime) of each process before and after the measured run; `kernel_ms_per_img` is the
stime part alone (socket reads and writes, wake-ups). `decode_ms_per_img` is the CPU the server
itself spent decoding, per image, during the measured run (its `vpt_decode_cpu_seconds_total` over
`vpt_decoded_images_total`: thread CPU time around each request's decoding, so it includes what
load does to decoding); `frontend_ms_excl_decode` is the front ends' CPU per image minus it.
`decode_ms_isolated` decodes the same JPEGs in this script on an idle core, for comparison.
`frontend_split` is each front end's share of the front ends' CPU (how evenly the connections
spread over them). `loadgen_ms_per_req` is wrk's own CPU, `machine_busy` the share of all cores
busy during the run and `machine_steal` the share the host took for other work (from /proc/stat):
at `machine_busy` near 1 the server is CPU-bound and every figure depends on what else the machine
does. `cpu_bound_img_s` is what the case would deliver with every core busy at its measured CPU per
image (server processes plus wrk): cores x 1000 / ms per image, the most this machine allows it;
`cpu_bound_vs_n0` divides it by the same round's measured N=0, the largest ratio to N=0 the case could
reach here however well its processes shared the cores.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from server.frontend.images import ImageDecoder
from vpt.backbone import load_backbone
from vpt.engine import forward_logits, stack_slots, task_slot_tensors
from vpt.preprocess import Preprocessor
from vpt.task import TaskParams, TaskSpec, save_task_file

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 2, "num_classes": 0}
CLK = os.sysconf("SC_CLK_TCK")

LUA = """
local bodies, tasks, requests = {}, {}, {}
math.randomseed(%(seed)d)
for i = 0, %(n_images)d - 1 do
  local f = assert(io.open(string.format("%(dir)s/img%%03d.jpg", i), "rb"))
  bodies[#bodies + 1] = f:read("*all")
  f:close()
end
for i = 0, %(n_tasks)d - 1 do tasks[#tasks + 1] = "task" .. i end
local headers = {["Content-Type"] = "image/jpeg"}
-- requests are built once: formatting an ~80 KB body per request would spend the load generator's CPU,
-- which the server shares on a small machine
for i = 1, %(n_requests)d do
  requests[i] = wrk.format("POST", "/predict?top_k=1&task=" .. tasks[math.random(#tasks)], headers,
                           bodies[math.random(#bodies)])
end
request = function()
  return requests[math.random(#requests)]
end
done = function(summary, latency, requests)
  io.write(string.format("JSON {\\"requests\\": %%d, \\"duration_us\\": %%d, \\"status_errors\\": %%d, " ..
    "\\"socket_errors\\": %%d, \\"p50_ms\\": %%.2f, \\"p99_ms\\": %%.2f}\\n", summary.requests, summary.duration,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write +
    summary.errors.timeout, latency:percentile(50) / 1000, latency:percentile(99) / 1000))
end
"""


def photos(n: int, seed: int) -> list[bytes]:
    from sklearn.datasets import load_sample_images

    rng = np.random.default_rng(seed)
    sources = [Image.fromarray(a) for a in load_sample_images().images]
    out = []
    for i in range(n):
        src = sources[i % len(sources)]
        cw, ch = int(rng.integers(120, src.width)), int(rng.integers(120, src.height))
        x, y = int(rng.integers(0, src.width - cw + 1)), int(rng.integers(0, src.height - ch + 1))
        size = (int(rng.integers(200, 801)), int(rng.integers(200, 801)))
        buf = io.BytesIO()
        src.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of `pid` so far: (user + kernel, the kernel's part alone: socket work, wake-ups)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime = int(fields[11]) / CLK, int(fields[12]) / CLK
    return utime + stime, stime


def cpu_by_process(procs: dict[str, list[int]]) -> dict[str, list[tuple[float, float]]]:
    """`cpu_s` of each role's processes, in order, one read of /proc per process."""
    return {role: [cpu_s(p) for p in pids] for role, pids in procs.items()}


def role_sums(times: dict[str, list[tuple[float, float]]]) -> dict[str, tuple[float, float]]:
    """(user + kernel, kernel) CPU seconds per role: its processes' `cpu_s` summed."""
    return {role: (sum(t for t, _ in ts), sum(k for _, k in ts)) for role, ts in times.items()}


def roles(pid: int) -> dict[str, list[int]]:
    """The server's processes by role: supervisor, engine, front ends (N=0: one `server`)."""
    kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    out: dict[str, list[int]] = {"engine": [], "frontend": []}
    for k in kids:
        cmd = Path(f"/proc/{k}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        out["engine" if "server.engine.main" in cmd else "frontend"].append(k)
    if not kids:
        return {"server": [pid]}
    return {"supervisor": [pid], **out}


def engine_case(bb, tasks: list[TaskParams], images: list[bytes], batch: int, seconds: float) -> float:
    """Offline img/s: device preprocessing of decoded images plus the forward, at `batch`."""
    pre = Preprocessor(bb.data_config)
    dec = ImageDecoder(10**9, pre.min_side)
    decoded = [torch.from_numpy(dec.decode_one(b, "x").copy()) for b in images]
    table = stack_slots(bb, [task_slot_tensors(bb, t) for t in tasks])
    rng = np.random.default_rng(0)
    done, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        while time.perf_counter() - t0 < seconds:
            idx = rng.integers(0, len(decoded), batch)
            x = pre([decoded[i] for i in idx], bb.device, bb.dtype)          # (B, 3, H, W)
            slot = torch.as_tensor(rng.integers(0, len(tasks), batch))       # (B,)
            forward_logits(bb, x, table, slot).softmax(-1).cpu()
            done += batch
    return done / (time.perf_counter() - t0)


def decode_ms(images: list[bytes], min_side: int, reps: int = 3) -> float:
    dec = ImageDecoder(10**9, min_side)
    t0 = time.process_time()
    for _ in range(reps):
        for b in images:
            dec.decode_one(b, "x")
    return (time.process_time() - t0) * 1000 / (reps * len(images))


def start(args: argparse.Namespace, weights: Path, store: Path, workers: int) -> subprocess.Popen:
    env = {**os.environ, "VPT_BACKBONE": "vit_tiny_patch16_224", "VPT_BACKBONE_WEIGHTS": str(weights),
           "VPT_BACKBONE_KWARGS": json.dumps(TINY), "VPT_STORE": str(store), "VPT_PORT": str(args.port),
           "VPT_WORKERS": "0", "VPT_MAX_BATCH_SIZE": str(args.batch), "VPT_MAX_WAIT_MS": str(args.wait_ms),
           "VPT_QUEUE_LIMIT": "4096", "VPT_LOG_LEVEL": "warning", "VPT_REQUEST_TIMEOUT_S": "600",
           "VPT_FRONTEND_WORKERS": str(workers), "VPT_DEVICE": args.device,
           "OMP_NUM_THREADS": str(args.torch_threads)}
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=env)
    for _ in range(1200):
        try:
            if httpx.get(f"http://127.0.0.1:{args.port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit("server did not become ready")


def wrk(args: argparse.Namespace, script: Path, seconds: float) -> dict:
    """wrk's summary, and `loadgen_cpu_s`: the CPU seconds wrk itself spent (it shares the machine)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(["wrk", "-t", str(args.wrk_threads), "-c", str(args.connections), "-d", f"{max(1, round(seconds))}s",
                          "--timeout", "60s", "-s", str(script), f"http://127.0.0.1:{args.port}"],
                         capture_output=True, text=True, check=True).stdout
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    res = json.loads(next(line for line in out.splitlines() if line.startswith("JSON "))[5:])
    res["loadgen_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return res


def scrape(port: int) -> dict[str, float]:
    """The counters this bench reads from `/metrics` (summed over label sets)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for name in ("vpt_batch_images_sum", "vpt_batch_images_count", "vpt_decode_cpu_seconds_total",
                 "vpt_decoded_images_total"):
        out[name] = sum(float(m) for m in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)", text, re.MULTILINE))
    return out


def machine_cpu() -> tuple[float, float, float]:
    """(busy, steal, total) jiffies of the whole machine so far, from /proc/stat."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle, steal = v[3] + v[4], v[7] if len(v) > 7 else 0
    return sum(v[:8]) - idle - steal, steal, sum(v[:8])


def server_case(args: argparse.Namespace, weights: Path, store: Path, script: Path, workers: int) -> dict:
    proc = start(args, weights, store, workers)
    try:
        wrk(args, script, args.warmup)
        procs = roles(proc.pid)
        first, counts0, mach0 = cpu_by_process(procs), scrape(args.port), machine_cpu()
        res = wrk(args, script, args.seconds)
        last, mach1, counts1 = cpu_by_process(procs), machine_cpu(), scrape(args.port)
    finally:
        proc.terminate()
        proc.wait(60)
    before, after = role_sums(first), role_sums(last)
    ok = res["requests"] - res["status_errors"]
    res["img_s"] = ok / (res["duration_us"] / 1e6)
    for name, part in (("cpu_ms_per_img", 0), ("kernel_ms_per_img", 1)):
        res[name] = {r: round((after[r][part] - before[r][part]) * 1000 / max(ok, 1), 3) for r in after}
    delta = {k: counts1[k] - counts0[k] for k in counts1}
    res["mean_batch"] = round(delta["vpt_batch_images_sum"] / max(delta["vpt_batch_images_count"], 1), 2)
    res["decode_ms_in_server"] = delta["vpt_decode_cpu_seconds_total"] * 1000 / max(delta["vpt_decoded_images_total"], 1)
    fe = res["cpu_ms_per_img"].get("frontend")  # None for the single process: no front end apart
    res["frontend_ms_excl_decode"] = None if fe is None else fe - res["decode_ms_in_server"]
    res["loadgen_ms_per_req"] = round(res["loadgen_cpu_s"] * 1000 / max(res["requests"], 1), 3)
    busy, steal, total = (b - a for a, b in zip(mach0, mach1))
    res["machine_busy"] = round(busy / max(total, 1), 3)  # of all cores, during the measured run
    res["machine_steal"] = round(steal / max(total, 1), 3)  # taken by the host: other machines' work
    # what every core busy at this run's CPU per image (server and wrk) would give: the most this case can do here
    per_img = sum(res["cpu_ms_per_img"].values()) + res["loadgen_ms_per_req"]
    res["cpu_bound_img_s"] = round((os.cpu_count() or 1) * 1000 / max(per_img, 1e-9), 1)
    spent = [b[0] - a[0] for a, b in zip(first.get("frontend", []), last.get("frontend", []))]
    res["frontend_split"] = [round(x / max(sum(spent), 1e-9), 3) for x in spent]  # how evenly connections spread
    res["exit_code"] = proc.returncode
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", default="0,1,2", help="VPT_FRONTEND_WORKERS values to measure")
    ap.add_argument("--tasks", type=int, default=8)
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--connections", type=int, default=32)
    ap.add_argument("--wrk-threads", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--wait-ms", type=float, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--port", type=int, default=18741)
    ap.add_argument("--rounds", type=int, default=1, help="measure every case this many times, interleaved")
    ap.add_argument("--torch-threads", type=int, default=1, help="intra-op threads per process (OMP_NUM_THREADS)")
    args = ap.parse_args()
    torch.set_num_threads(args.torch_threads)
    torch.manual_seed(0)
    bb = load_backbone("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY, device=args.device)
    tasks = [TaskParams.new(TaskSpec("vpt-deep", 10, tuple(f"c{i}" for i in range(10))), bb)
             for _ in range(args.tasks)]
    images = photos(args.images, seed=0)
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"cpu ({platform.machine()}, {os.cpu_count()} cores)"
    common = {"device": device, "model": "tiny ViT (d=64, 4 blocks, 32 px)", "tasks": args.tasks,
              "torch_threads": args.torch_threads,
              "connections": args.connections, "seconds": args.seconds}
    engine = engine_case(bb, tasks, images, args.batch, min(args.seconds, 10))
    dec = decode_ms(images, Preprocessor(bb.data_config).min_side)
    print(json.dumps({"case": "engine", "img_s": round(engine, 1), "batch": args.batch,
                      "decode_ms_per_img": round(dec, 3), "load_avg": os.getloadavg()[0], **common}), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "backbone.safetensors"
        save_file({k: v.contiguous().cpu() for k, v in bb.model.state_dict().items()}, str(weights))
        imgdir = Path(tmp) / "images"
        imgdir.mkdir()
        for i, b in enumerate(images):
            (imgdir / f"img{i:03d}.jpg").write_bytes(b)
        script = Path(tmp) / "predict.lua"
        script.write_text(LUA % {"seed": 1, "n_images": len(images), "dir": imgdir, "n_tasks": args.tasks,
                                 "n_requests": 256})
        store = Path(tmp) / "store"
        from prompt_store.factory import open_store
        from vpt.task import read_metadata

        st = open_store(str(store))
        for i, t in enumerate(tasks):
            blob = save_task_file(t, bb)
            st.put_task("default", f"task{i}", blob, read_metadata(blob))
        st.close()
        workers = [int(w) for w in args.workers.split(",")]
        rounds: list[dict[int, dict]] = []
        for r in range(args.rounds):  # rounds interleave the cases: the machine's drift hits each alike
            rounds.append({})
            for n in workers:
                res = server_case(args, weights, store, script, n)
                rounds[-1][n] = res
                print(json.dumps(case_line(res, n, r, rounds[-1].get(0), engine, dec, common)), flush=True)
        print(json.dumps(summary(rounds, workers, common)), flush=True)


def case_line(res: dict, n: int, r: int, base: dict | None, engine: float, dec: float, common: dict) -> dict:
    """One JSON line for one server case of round `r`; `base`: the same round's N=0 case, if measured."""
    decode, fe = res["decode_ms_in_server"], res["frontend_ms_excl_decode"]
    return {"case": "server", "round": r, "frontend_workers": n, "img_s": round(res["img_s"], 1),
            "vs_n0": round(res["img_s"] / base["img_s"], 3) if base else None,
            "vs_engine": round(res["img_s"] / engine, 3), "cpu_bound_img_s": res["cpu_bound_img_s"],
            "cpu_bound_vs_n0": round(res["cpu_bound_img_s"] / base["img_s"], 3) if base else None,
            "p50_ms": res["p50_ms"],
            "p99_ms": res["p99_ms"], "errors": res["status_errors"] + res["socket_errors"],
            "mean_batch": res["mean_batch"], "cpu_ms_per_img": res["cpu_ms_per_img"],
            "kernel_ms_per_img": res["kernel_ms_per_img"],
            "decode_ms_per_img": round(decode, 3), "decode_ms_isolated": round(dec, 3),
            "frontend_ms_excl_decode": None if fe is None else round(fe, 3),
            "frontend_split": res["frontend_split"],
            "loadgen_ms_per_req": res["loadgen_ms_per_req"], "machine_busy": res["machine_busy"],
            "machine_steal": res["machine_steal"],
            "exit_code": res["exit_code"], "load_avg": os.getloadavg()[0], **common}


def summary(rounds: list[dict[int, dict]], workers: list[int], common: dict) -> dict:
    """Medians over the rounds: img/s per N, the ratio to the same round's N=0, the front end's CPU."""
    out: dict = {"case": "summary", "rounds": len(rounds)}
    for n in workers:
        runs = [r[n] for r in rounds]
        out[f"n{n}_img_s"] = round(statistics.median(x["img_s"] for x in runs), 1)
        if n and 0 in workers:
            out[f"n{n}_vs_n0"] = round(statistics.median(r[n]["img_s"] / r[0]["img_s"] for r in rounds), 3)
            out[f"n{n}_cpu_bound_vs_n0"] = round(statistics.median(r[n]["cpu_bound_img_s"] / r[0]["img_s"]
                                                                    for r in rounds), 3)
        if n:
            out[f"n{n}_frontend_ms_excl_decode"] = round(statistics.median(x["frontend_ms_excl_decode"] for x in runs), 3)
    return {**out, **common}


if __name__ == "__main__":
    main()
