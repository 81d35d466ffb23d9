"""The compose stack on this host's Docker engine, built from stand-in base images (no Docker Hub).

Marked `docker`: deselected by default, run by `make compose-test`; skipped when no engine answers.
Images are named for the test and removed afterwards (VPT_COMPOSE_TEST_KEEP_IMAGES=1 keeps them,
so a rerun starts in seconds); the stand-in base stays, cached by its tag (rebuilt when absent).
VPT_COMPOSE_TEST_COMMAND chooses the Compose command (`make compose-test COMPOSE=...`).
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator

import pytest

from tests.deploy.stack import (
    ROOT,
    Stack,
    compose_command,
    compose_version,
    docker,
    engine_answers,
    free_port,
)
from tests.fixtures.vit import TINY_KWARGS, TINY_NAME, save_tiny_vit

PROJECT = "vptcomposetest"
IMAGES = {"VPT_CUDA_IMAGE": "vpt-standin/base:bookworm", "VPT_REDIS_IMAGE": f"{PROJECT}/redis:7",
          "VPT_PROXY_IMAGE": f"{PROJECT}/nginx:1", "VPT_IMAGE": f"{PROJECT}/serve", "VPT_IMAGE_TAG": "latest"}
BUILT = [IMAGES["VPT_REDIS_IMAGE"], IMAGES["VPT_PROXY_IMAGE"], f"{IMAGES['VPT_IMAGE']}:latest"]


def _dangling() -> set[str]:
    """Untagged top-level images: what the classic builder leaves of a multi-stage build's stages."""
    return set(docker("images", "-q", "--no-trunc", "--filter", "dangling=true").split())


@pytest.fixture(scope="session")
def images() -> Iterator[dict[str, str]]:
    if not engine_answers():
        pytest.skip("no Docker engine answers (start one: dockerd &)")
    before = _dangling()
    done = subprocess.run(["bash", "deploy/standin/build.sh"], cwd=ROOT, env=os.environ | IMAGES, check=False,
                          timeout=5400)
    assert done.returncode == 0, "deploy/standin/build.sh failed (its output is above)"
    yield IMAGES
    if os.environ.get("VPT_COMPOSE_TEST_KEEP_IMAGES") != "1":
        docker("rmi", *BUILT, check=False)
        # the builder and wheels stages (gigabytes: torch) and an image the build replaced under our tag
        left = sorted(_dangling() - before)
        if left:
            docker("rmi", *left, check=False)


@pytest.fixture
def stack(images: dict[str, str], tmp_path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    compose = compose_command()
    if compose is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed")
    version = compose_version(compose)   # which Compose ran the stack, in the test's output
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"compose: {' '.join(compose)} ({version})")
    key = secrets.token_hex(16)
    env = os.environ | images | {
        "VPT_API_KEYS": f"acme:{key}",
        "REDIS_PASSWORD": secrets.token_hex(16),
        "VPT_PROXY_PORT": str(free_port()),
        "VPT_BACKBONE": TINY_NAME,
        "VPT_BACKBONE_PRETRAINED": "false",
        "VPT_BACKBONE_SEED": "0",
        "VPT_BACKBONE_KWARGS": json.dumps(TINY_KWARGS),
        "VPT_BACKBONE_WEIGHTS": "/weights/tiny.safetensors",
        "VPT_JOB_HEARTBEAT_S": "1",
        "VPT_JOB_STALE_S": "8",
    }
    # every replica and worker needs the same backbone: one weights file, mounted read-only
    weights = save_tiny_vit(tmp_path / "tiny.safetensors")
    weights.chmod(0o644)
    mount = {"volumes": [f"{weights}:/weights/tiny.safetensors:ro"]}
    override = tmp_path / "docker-compose.weights.yml"
    override.write_text(json.dumps({"services": {"server": mount, "worker": mount}}))  # JSON is YAML
    files = [ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml", override]
    s = Stack(project=PROJECT, files=files, env=env, compose=compose, api_key=key,
              scale={"server": 2, "worker": 2})
    s.destroy()  # leftovers of an interrupted run
    try:
        yield s
    finally:
        s.destroy()
