"""What each kind of server process loads before it serves: import time and memory, in fresh interpreters.

    .venv/bin/python bench/imports.py [--reps 5] [--root PATH ...]

A front end (server/frontend/main.py) imports the web stack, the routes and the channel's client;
the engine (server/engine/main.py) imports the model stack as well. Each rep starts a new Python,
imports one kind's modules (as its `main` does, before any settings are read) and reports the
wall time of the imports, the resident memory after them (`VmRSS`; `RssAnon` is the part no other
process shares: code pages of shared libraries are counted in `VmRSS` but shared between processes)
and which heavy packages got loaded. One JSON line per kind and `--root` (default: this checkout;
pass another checkout, e.g. a `git worktree` of an older commit, to compare in the same run), with
medians over the reps. A front end that starts faster shortens the time during which connections
the kernel gave a restarted front end's socket wait (docs/serving.md).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "timm", "torchvision", "triton", "server.state", "server.engine.batcher", "prompt_store.bank")
KINDS = {
    "frontend": ("server.cli", "server.frontend.app", "server.frontend.fasthttp", "server.frontend.state"),
    "engine": ("server.cli", "server.channel", "server.engine.service", "server.state"),
}
PROBE = """
import json, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
for name in {modules!r}:
    __import__(name)
took = time.perf_counter() - t0
status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
kb = lambda key: int(status.get(key, "0 kB").split()[0])
print(json.dumps({{"import_s": took, "rss_mb": kb("VmRSS") / 1024, "rss_anon_mb": kb("RssAnon") / 1024,
       "loaded": [m for m in {heavy!r} if m in sys.modules]}}))
"""


def probe(root: Path, modules: tuple[str, ...]) -> dict:
    code = PROBE.format(root=str(root), modules=modules, heavy=HEAVY)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--root", action="append", type=Path, help="a checkout to measure (repeatable; default: this one)")
    args = ap.parse_args()
    roots = args.root or [ROOT]
    for kind, modules in KINDS.items():
        runs: dict[Path, list[dict]] = {r: [] for r in roots}
        for _ in range(args.reps):  # interleaved: the machine's drift hits every checkout alike
            for r in roots:
                runs[r].append(probe(r.resolve(), modules))
        for r in roots:
            got = runs[r]
            print(json.dumps({"kind": kind, "root": str(r), "reps": args.reps,
                              "import_s": round(statistics.median(x["import_s"] for x in got), 2),
                              "rss_mb": round(statistics.median(x["rss_mb"] for x in got)),
                              "rss_anon_mb": round(statistics.median(x["rss_anon_mb"] for x in got)),
                              "loaded": got[-1]["loaded"], "python": platform.python_version(),
                              "machine": f"{platform.machine()}, {os.cpu_count()} cores"}), flush=True)


if __name__ == "__main__":
    main()
