"""How long clients wait when a front end dies: the stall until its replacement serves its socket.

    .venv/bin/python bench/restart.py [--reps 3] [--window 10] [--root PATH ...]

Each front end accepts on its own listening socket (SO_REUSEPORT), which the supervisor keeps open
while it restarts a dead one: new connections the kernel gives that socket wait in its queue until
the replacement has imported its modules, connected to the engine and started serving (none is
refused). This starts the server with two front ends on a tiny ViT (random weights), SIGKILLs one
front end, and from that instant opens fresh connections (`--clients` at once, a new TCP connection
per request, so the kernel spreads them over both sockets) sending `GET /healthz` for `--window`
seconds. Per rep: `stall_s`, the longest any of those requests waited (the replacement's start, as
clients see it); `replaced_s`, when the supervisor had the new process running; `served`, requests
answered; `errors`, requests that failed. One JSON line per rep and `--root`, then a summary with the
medians; pass another checkout (a `git worktree` of an older commit) as a second `--root` to compare
in the same run, the reps interleaved.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.frontend import TINY, roles
from vpt.backbone import load_backbone


def get(port: int, path: str, timeout: float) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


def start(root: Path, env: dict[str, str], port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], cwd=root, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if get(port, "/readyz", 2) == 200:
                return proc
        except OSError:
            pass
        time.sleep(0.25)
    proc.kill()
    raise SystemExit(f"the server in {root} did not become ready")


def one_rep(root: Path, env: dict[str, str], args: argparse.Namespace) -> dict:
    proc = start(root, env, args.port)
    try:
        before = roles(proc.pid)["frontend"]
        results: list[tuple[float, bool]] = []  # (seconds waited, answered)
        lock = threading.Lock()
        t_kill = time.perf_counter()
        os.kill(before[0], signal.SIGKILL)

        def client() -> None:
            while time.perf_counter() - t_kill < args.window:
                t0 = time.perf_counter()
                try:
                    ok = get(args.port, "/healthz", args.window + 30) == 200
                except OSError:
                    ok = False
                with lock:
                    results.append((time.perf_counter() - t0, ok))

        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for t in threads:
            t.start()
        replaced = None
        while replaced is None and time.perf_counter() - t_kill < args.window:
            now = roles(proc.pid)["frontend"]
            if len(now) == len(before) and before[0] not in now:
                replaced = time.perf_counter() - t_kill
            time.sleep(0.01)
        for t in threads:
            t.join()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return {"root": str(root), "stall_s": round(max(w for w, _ in results), 3),
            "replaced_s": None if replaced is None else round(replaced, 3),
            "served": sum(ok for _, ok in results), "errors": sum(not ok for _, ok in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--window", type=float, default=10.0, help="seconds of requests after the kill")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--port", type=int, default=18751)
    ap.add_argument("--root", action="append", type=Path, help="a checkout to measure (repeatable; default: this one)")
    args = ap.parse_args()
    roots = [r.resolve() for r in (args.root or [ROOT])]
    torch.manual_seed(0)
    bb = load_backbone("vit_tiny_patch16_224", pretrained=False, model_kwargs=TINY)
    runs: dict[Path, list[dict]] = {r: [] for r in roots}
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "backbone.safetensors"
        save_file({k: v.contiguous() for k, v in bb.model.state_dict().items()}, str(weights))
        for rep in range(args.reps):  # interleaved: the machine's drift hits every checkout alike
            for root in roots:
                env = {**os.environ, "VPT_BACKBONE": "vit_tiny_patch16_224", "VPT_BACKBONE_WEIGHTS": str(weights),
                       "VPT_BACKBONE_KWARGS": json.dumps(TINY), "VPT_STORE": str(Path(tmp) / f"store{rep}"),
                       "VPT_PORT": str(args.port), "VPT_WORKERS": "0", "VPT_FRONTEND_WORKERS": "2",
                       "VPT_LOG_LEVEL": "error", "OMP_NUM_THREADS": "1"}
                res = one_rep(root, env, args)
                runs[root].append(res)
                print(json.dumps({"case": "rep", "rep": rep, **res}), flush=True)
    machine = f"{platform.machine()}, {os.cpu_count()} cores"
    for root in roots:
        got = runs[root]
        print(json.dumps({"case": "summary", "root": str(root), "reps": args.reps,
                          "stall_s": round(statistics.median(x["stall_s"] for x in got), 3),
                          "replaced_s": round(statistics.median(x["replaced_s"] or args.window for x in got), 3),
                          "errors": sum(x["errors"] for x in got), "machine": machine}), flush=True)


if __name__ == "__main__":
    main()
