"""A compose stack run for a test: `docker-compose` (1.x) or `docker compose` (v2) on a project of its own.

Everything it creates is named after `project` (containers, network, volumes) and removed by
`destroy()`. Servers are reached at their container addresses on the project's network (created
by the stack, so the test talks only to loopback and its own network), the proxy on 127.0.0.1.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]


def compose_command() -> list[str] | None:
    """The Compose command the test drives; None when there is none.

    VPT_COMPOSE_TEST_COMMAND chooses one (`docker compose`, `docker-compose`, or a path such as a
    standalone v2 binary); without it, Compose v2 when the docker CLI has it, else `docker-compose`.
    """
    chosen = os.environ.get("VPT_COMPOSE_TEST_COMMAND", "").strip()
    if chosen:
        return shlex.split(chosen)
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0:
        return [docker, "compose"]
    exe = shutil.which("docker-compose")
    return [exe] if exe else None


def compose_version(compose: list[str]) -> str:
    """`compose version`'s first line; AssertionError when the command does not run."""
    try:
        done = subprocess.run([*compose, "version"], capture_output=True, text=True, check=False, timeout=60)
    except OSError as e:
        raise AssertionError(f"{' '.join(compose)}: {e}") from None
    assert done.returncode == 0, f"{' '.join(compose)} version: {done.stderr.strip()}"
    return done.stdout.strip().splitlines()[0]


def engine_answers() -> bool:
    docker = shutil.which("docker")
    return bool(docker) and subprocess.run([docker, "info"], capture_output=True, check=False,
                                           timeout=60).returncode == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def docker(*args: str, check: bool = True, timeout: float = 300) -> str:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


def wait_for(what: str, probe: Callable[[], Any], timeout: float = 300, every: float = 0.5) -> Any:
    """Call `probe` until it returns something truthy; its value. Exceptions count as not yet."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
            last = value
        except (httpx.HTTPError, AssertionError) as e:
            last = e
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


@dataclass
class Stack:
    project: str
    files: list[Path]
    env: dict[str, str]
    compose: list[str]
    api_key: str
    scale: dict[str, int] = field(default_factory=dict)

    def run(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        files = [a for f in self.files for a in ("-f", str(f))]
        done = subprocess.run([*self.compose, "-p", self.project, *files, *args], capture_output=True, text=True,
                              env=self.env, cwd=ROOT, timeout=timeout, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}\n{self.logs()}")
        return done

    def up(self) -> None:
        scale = [a for name, n in self.scale.items() for a in ("--scale", f"{name}={n}")]
        self.run("up", "-d", "--no-build", *scale)
        try:
            for url in self.server_urls():
                wait_for(f"{url}/readyz", lambda u=url: httpx.get(f"{u}/readyz", timeout=5).status_code == 200,
                         timeout=900)
            wait_for("the proxy", lambda: self.client().get("/readyz").status_code == 200, timeout=120)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None

    def containers(self, service: str) -> list[str]:
        """Running container ids of `service`, in replica order."""
        ids = self.run("ps", "-q", service).stdout.split()
        running = [c for c in ids if docker("inspect", "-f", "{{.State.Running}}", c) == "true"]
        return sorted(running, key=lambda c: docker("inspect", "-f", "{{.Name}}", c))

    def address(self, container: str) -> str:
        nets = json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Networks}}", container))
        (net,) = nets.values()
        return net["IPAddress"]

    def server_urls(self) -> list[str]:
        return [f"http://{self.address(c)}:8000" for c in self.containers("server")]

    def client(self, base_url: str | None = None, key: str | None = "default") -> httpx.Client:
        """A client on `base_url` (default: the proxy), with the stack's API key unless `key` is None."""
        headers = {} if key is None else {"Authorization": f"Bearer {self.api_key if key == 'default' else key}"}
        return httpx.Client(base_url=base_url or f"http://127.0.0.1:{self.env['VPT_PROXY_PORT']}", headers=headers,
                            timeout=120)

    def logs(self, tail: int = 60) -> str:
        files = [a for f in self.files for a in ("-f", str(f))]
        done = subprocess.run([*self.compose, "-p", self.project, *files, "logs", "--no-color", f"--tail={tail}"],
                              capture_output=True, text=True, env=self.env, cwd=ROOT, timeout=120, check=False)
        return done.stdout[-20000:]

    def destroy(self) -> None:
        self.run("down", "-v", "--remove-orphans", "--timeout", "5", check=False, timeout=300)
