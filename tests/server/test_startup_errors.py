"""`vpt-serve serve` with bad settings or no hub: one clear line and a hint, no traceback, no retries."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.live_server import ROOT, free_port


def serve(env: dict[str, str], tmp_path: Path) -> subprocess.CompletedProcess:
    full = {**os.environ, "VPT_STORE": str(tmp_path / "store"), "VPT_PORT": str(free_port()),
            "HF_HOME": str(tmp_path / "hf"), **env}
    for name in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        full.pop(name, None)
    return subprocess.run([sys.executable, "-m", "server.cli", "serve"], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.parametrize("env,words", [
    ({"VPT_BACKBONE_KWARGS": "{img_size: 64"}, "VPT_BACKBONE_KWARGS: not valid JSON"),
    ({"VPT_BACKBONE_KWARGS": "[1, 2]"}, "VPT_BACKBONE_KWARGS: must be a JSON object"),
    ({"VPT_PORT": "eighty"}, "VPT_PORT: Input should be a valid integer"),
    ({"VPT_MAX_BATCH_SIZE": "0", "VPT_BACKBONE_SEED": "-1"}, "VPT_MAX_BATCH_SIZE"),
])
def test_a_bad_setting_is_one_line(env: dict[str, str], words: str, tmp_path: Path) -> None:
    out = serve(env, tmp_path)
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: invalid_settings: ") and words in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_an_unreachable_hub_fails_at_once_with_the_offline_recipe(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there: the hub cannot be reached
    out = serve({"HF_ENDPOINT": f"http://127.0.0.1:{port}", "VPT_BACKBONE": "vit_tiny_patch16_224"}, tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "Retry" not in out.stderr and "Retrying" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: backbone_unavailable: "), out.stderr
    hint = [line for line in out.stderr.splitlines() if line.startswith("hint: ")]
    assert hint and "vpt-serve demo" in hint[0] and "VPT_BACKBONE_WEIGHTS" in hint[0]
    assert out.stderr.count("cannot be reached") == 1  # the warning once, not per retry
