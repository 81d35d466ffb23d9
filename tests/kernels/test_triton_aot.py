"""Ahead-of-time compilation for H100 (sm_90) and A100 (sm_80) on a machine without a GPU.

The interpreter checks the maths; this catches what only the GPU compiler rejects: `tl.dot`
shapes and dtypes, layouts, and shared memory past the per-block limit.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels.aot_compile import DTYPES, HEAD_DIMS

ROOT = Path(__file__).resolve().parents[2]
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def compile_all(which: str) -> list[dict]:
    """Both targets at once, one process each, with triton imported without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    procs = [subprocess.Popen([sys.executable, "-m", "tests.kernels.aot_compile", str(arch), which],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in SHARED_LIMIT]
    rows = []
    for p in procs:
        out, err = p.communicate(timeout=1200)
        assert p.returncode == 0, err[-4000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def check(rows: list[dict]) -> None:
    seen = {(r["arch"], r["dtype"], r["head_dim"]) for r in rows}
    assert seen == {(a, d, h) for a in SHARED_LIMIT for d in DTYPES for h in HEAD_DIMS}
    for r in rows:
        assert r["ptx_target"] and r["cubin_bytes"] > 0, r
        assert 0 < r["shared"] <= SHARED_LIMIT[r["arch"]], r


def test_widest_config_compiles_and_fits_for_every_dtype_and_head_dim() -> None:
    check(compile_all("largest"))


@pytest.mark.slow
def test_every_autotune_config_compiles_and_fits(request: pytest.FixtureRequest) -> None:
    """About 5 minutes on two cores with a cold Triton cache: runs only when `-m slow` asks for it."""
    markexpr = request.config.getoption("markexpr") or ""
    if "slow" not in markexpr or "not slow" in markexpr:
        pytest.skip("opt-in: select it with -m slow")
    check(compile_all("all"))
