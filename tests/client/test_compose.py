"""docker-compose.yml and docker-compose.cpu.yml are valid and say what docs/deploy.md promises.

`docker-compose config` validates and interpolates offline. Docker Compose v2 (`docker compose`)
is used for the CPU override when present: its `!reset` tag (v2.24+) is what removes the GPU
reservations, and Compose 1.x cannot read it, so with 1.x alone the override is checked by
applying `!reset` the way Compose v2 does.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BASE, CPU = ROOT / "docker-compose.yml", ROOT / "docker-compose.cpu.yml"
ENV = os.environ | {"VPT_API_KEYS": "acme:k1,globex:k2"}


def _compose_v1() -> list[str]:
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    return [exe]


def _compose_v2() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    return None


def _config(cmd: list[str], *files: Path, env: dict[str, str] = ENV) -> subprocess.CompletedProcess[str]:
    args = [a for f in files for a in ("-f", str(f))]
    return subprocess.run([*cmd, *args, "config"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120,
                          check=False)


def _gpu_devices(service: dict[str, Any]) -> list[Any]:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_base_file_is_valid_and_complete() -> None:
    done = _config(_compose_v1(), BASE)
    assert done.returncode == 0, done.stderr
    cfg = yaml.safe_load(done.stdout)
    services = cfg["services"]
    assert set(services) == {"redis", "server", "worker", "proxy"}
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert redis["command"] == ["redis-server", "--appendonly", "yes", "--appendfsync", "always"]
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert any(v.startswith("redis-data:/data") for v in redis["volumes"])
    for name, command in (("server", ["serve"]), ("worker", ["worker"])):
        svc = services[name]
        assert svc["command"] == command
        assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        env = svc["environment"]
        assert env["VPT_STORE"] == "redis://redis:6379/0" and env["VPT_API_KEYS"] == "acme:k1,globex:k2"
        assert "VPT_ALLOW_UNAUTHENTICATED" not in env
        (gpu,) = _gpu_devices(svc)
        assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
        assert any(v.startswith("model-cache:/cache") for v in svc["volumes"])
        assert any(v.startswith("vpt-data:/data") for v in svc["volumes"])  # uploads shared with workers
    assert "healthcheck" in services["server"] and "readyz" in " ".join(services["server"]["healthcheck"]["test"])
    worker_check = services["worker"]["healthcheck"]
    assert worker_check.get("disable") is True or worker_check.get("test") == ["NONE"]  # 1.x normalises
    assert "ports" not in services["worker"]
    # a host port range, so `--scale server=N` does not collide on one port
    assert str(services["server"]["ports"][0]["published"]) == "8000-8015"
    assert services["proxy"]["profiles"] == ["proxy"]
    assert set(cfg["volumes"]) == {"redis-data", "model-cache", "vpt-data"}


def test_base_file_requires_api_keys() -> None:
    env = {k: v for k, v in ENV.items() if k != "VPT_API_KEYS"}
    done = _config(_compose_v1(), BASE, env=env)
    assert done.returncode != 0
    assert "set VPT_API_KEYS" in done.stderr


class _ResetLoader(yaml.SafeLoader):
    pass


class _Reset:
    pass


_ResetLoader.add_constructor("!reset", lambda loader, node: _Reset())


def _merge(base: Any, over: Any) -> Any:
    """Compose v2's merge: mappings merge, sequences append, `!reset` removes, scalars replace."""
    if isinstance(over, _Reset):
        return _Reset()
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            merged = _merge(base.get(k), v) if k in base else v
            if isinstance(merged, _Reset):
                out.pop(k, None)
            else:
                out[k] = merged
        return out
    if isinstance(base, list) and isinstance(over, list):
        return base + over
    return over


def test_cpu_override_drops_gpu_reservations() -> None:
    v2 = _compose_v2()
    if v2 is not None:
        done = _config(v2, BASE, CPU)
        assert done.returncode == 0, done.stderr
        services = yaml.safe_load(done.stdout)["services"]
    else:
        base = yaml.load(BASE.read_text(), Loader=_ResetLoader)
        services = _merge(base, yaml.load(CPU.read_text(), Loader=_ResetLoader))["services"]
        # what 1.x can check of the override: the rest of it is valid compose once !reset is applied
        assert set(yaml.load(CPU.read_text(), Loader=_ResetLoader)["services"]) == {"server", "worker"}
    for name in ("server", "worker"):
        assert _gpu_devices(services[name]) == []
        assert services[name]["environment"]["VPT_DEVICE"] == "cpu"
        assert services[name]["environment"]["VPT_STORE"] == "redis://redis:6379/0"
    assert _gpu_devices(yaml.safe_load(BASE.read_text())["x-vpt"])  # the base file still reserves GPUs


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
