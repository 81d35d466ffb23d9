"""docker-compose.yml and docker-compose.cpu.yml are valid and say what docs/deploy.md promises.

`config` validates and interpolates offline, with Compose 1.x (`docker-compose`) and with v2
(`docker compose`) when it is installed. tests/deploy/ runs the stack for real (`make compose-test`).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE, CPU = ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml"
ENV = {k: v for k, v in os.environ.items() if not k.startswith(("VPT_", "REDIS_"))} | {"VPT_API_KEYS": "acme:k1,globex:k2"}


def _composes() -> list[list[str]]:
    found = []
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        found.append([docker, "compose"])
    if exe := shutil.which("docker-compose"):
        found.append([exe])
    return found


@pytest.fixture(params=["v1", "v2"])
def compose(request) -> list[str]:
    for cmd in _composes():
        if (cmd[-1] == "compose") == (request.param == "v2"):
            return cmd
    pytest.skip(f"Compose {request.param} is not installed")


def _config(cmd: list[str], *files: Path, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    args = [a for f in files for a in ("-f", str(f))]
    return subprocess.run([*cmd, *args, "config"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
                          check=False)


def _services(cmd: list[str], *files: Path, env: dict[str, str] = ENV) -> dict[str, Any]:
    done = _config(cmd, *files, env=env)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


def test_base_file_is_valid_and_complete(compose: list[str]) -> None:
    done = _config(compose, BASE)
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    services = cfg["services"]
    assert set(services) == {"redis", "server", "worker", "proxy"}
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    command = " ".join(redis["command"])
    assert "docker-entrypoint.sh redis-server --appendonly yes --appendfsync always" in command
    assert "--requirepass" in command and "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    assert any(str(v).startswith("redis-data:/data") or v.get("source") == "redis-data"
               for v in redis["volumes"] if isinstance(v, (str, dict)))
    for name, cmd in (("server", ["serve"]), ("worker", ["worker"])):
        svc = services[name]
        assert svc["command"] == cmd and svc["runtime"] == "nvidia"
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        env = svc["environment"]
        assert env["VPT_STORE"] == "redis://:@redis:6379/0" and env["VPT_API_KEYS"] == "acme:k1,globex:k2"
        assert env["NVIDIA_VISIBLE_DEVICES"] == "all" and env["VPT_DEVICE"] == "auto"
        assert "VPT_ALLOW_UNAUTHENTICATED" not in env
        for passed in ("VPT_BACKBONE_WEIGHTS", "VPT_BACKBONE_PRETRAINED", "VPT_BACKBONE_SEED", "VPT_BACKBONE_KWARGS"):
            assert passed in env
        assert "ports" not in svc                           # reached through the proxy: no port per replica
        mounts = " ".join(str(v) for v in svc["volumes"])
        assert "model-cache" in mounts and "vpt-data" in mounts  # uploads shared with workers
    assert "readyz" in " ".join(services["server"]["healthcheck"]["test"])
    worker_check = services["worker"]["healthcheck"]
    assert worker_check.get("disable") is True or worker_check.get("test") == ["NONE"]  # 1.x normalises
    assert "profiles" not in services["proxy"]              # the entry point, started by default
    (port,) = services["proxy"]["ports"]
    assert port in ("127.0.0.1:8080:8080/tcp", "127.0.0.1:8080:8080") or (
        port["host_ip"], str(port["published"]), port["target"]) == ("127.0.0.1", "8080", 8080)
    assert set(cfg["volumes"]) == {"redis-data", "model-cache", "vpt-data"}


def test_base_file_requires_api_keys(compose: list[str]) -> None:
    env = {k: v for k, v in ENV.items() if k != "VPT_API_KEYS"}
    done = _config(compose, BASE, env=env)
    assert done.returncode != 0
    assert "set VPT_API_KEYS" in done.stderr


def test_redis_password_reaches_servers_workers_and_redis(compose: list[str]) -> None:
    services = _services(compose, BASE, env=ENV | {"REDIS_PASSWORD": "0f1e2d3c"})
    assert services["redis"]["environment"]["REDIS_PASSWORD"] == "0f1e2d3c"
    for name in ("server", "worker"):
        assert services[name]["environment"]["VPT_STORE"] == "redis://:0f1e2d3c@redis:6379/0"


def test_cpu_without_gpu_runtime(compose: list[str]) -> None:
    """The override (and VPT_RUNTIME=runc) drop the NVIDIA runtime, with either Compose version."""
    with_file = _services(compose, BASE, CPU)
    with_env = _services(compose, BASE, env=ENV | {"VPT_RUNTIME": "runc", "VPT_DEVICE": "cpu"})
    for services in (with_file, with_env):
        for name in ("server", "worker"):
            assert services[name]["runtime"] == "runc"
            assert services[name]["environment"]["VPT_DEVICE"] == "cpu"
            assert services[name]["environment"]["VPT_STORE"] == "redis://:@redis:6379/0"
    assert "!reset" not in CPU.read_text()  # Compose 1.x cannot read it


def test_images_and_addresses_are_settable(compose: list[str]) -> None:
    env = ENV | {"VPT_IMAGE": "reg.example/vpt", "VPT_IMAGE_TAG": "7", "VPT_REDIS_IMAGE": "r:1",
                 "VPT_PROXY_IMAGE": "p:1", "VPT_PROXY_BIND": "0.0.0.0", "VPT_PROXY_PORT": "9000"}
    services = _services(compose, BASE, env=env)
    assert services["server"]["image"] == services["worker"]["image"] == "reg.example/vpt:7"
    assert services["redis"]["image"] == "r:1" and services["proxy"]["image"] == "p:1"
    assert "9000" in str(services["proxy"]["ports"][0]) and "0.0.0.0" in str(services["proxy"]["ports"][0])


def test_dockerfile_runtime_contract() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert text.count("FROM ") >= 2 and "AS builder" in text
    assert "USER vpt" in text and 'ENTRYPOINT ["vpt-serve"]' in text and 'CMD ["serve"]' in text
    assert "HEALTHCHECK" in text and "/readyz" in text
    assert "HF_HOME=/cache" in text and "TORCH_HOME=/cache" in text
    pins = (ROOT / "pyproject.toml").read_text()
    for pkg, arg in (("torch", "TORCH_VERSION"), ("torchvision", "TORCHVISION_VERSION")):
        version = next(line.split("==")[1].strip('",') for line in pins.splitlines()
                       if line.strip().startswith(f'"{pkg}=='))
        assert f"ARG {arg}={version}" in text
    # compose builds with the Dockerfile's own defaults; the CA option's default adds nothing
    args = yaml.safe_load(BASE.read_text())["x-vpt"]["build"]["args"]
    for name in ("CUDA_IMAGE", "EXTRA_CA_CERTS"):
        default = re.search(rf"^ARG {name}=(\S+)$", text, re.MULTILINE)
        assert default and args[name].endswith(f":-{default.group(1)}}}"), (name, args[name])
    assert "BEGIN CERTIFICATE" not in (ROOT / "deploy/ca/none.pem").read_text()
