"""`vpt-serve serve` with front-end processes: start the engine, then N front ends; watch; stop gracefully.

The supervisor owns the shared-memory ring file, the engine's Unix socket and the listening TCP
sockets: one per front end on the same port where the platform has SO_REUSEPORT (the kernel spreads
connections across them), else one that every front end shares. A front end that dies is restarted
on its own socket, which the supervisor keeps open meanwhile: connections the kernel sent it wait in
its queue for the replacement instead of being refused. Its ring region starts afresh; a front end
that keeps dying, or an engine that dies, stops the server with exit status 1.
SIGTERM/SIGINT stop the front ends first (uvicorn drains their requests), then the engine; exit 0.
"""
from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

from server.channel import (
    ENV_INDEX,
    ENV_SHM,
    ENV_SOCKET,
    RingLayout,
    SlotRing,
    owned_workdir,
    sweep_stale_rings,
    sweep_stale_workdirs,
)
from server.settings import Settings

log = logging.getLogger("vpt-serve.supervisor")

ENV_LISTEN_FD = "VPT_INTERNAL_LISTEN_FD"
MAX_RESTARTS = 5          # per front end, within RESTART_WINDOW_S
RESTART_WINDOW_S = 60.0


def _die_with_parent() -> None:
    """Children get SIGTERM when the supervisor dies, even by SIGKILL (Linux prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class Supervisor:
    def __init__(self, settings: Settings, listeners: list[socket.socket]) -> None:
        self.settings = settings
        self.n = settings.frontends
        sweep_stale_rings()  # what a SIGKILLed server left (its locks died with it)
        sweep_stale_workdirs()
        self.workdir, self._workdir_lock = owned_workdir()  # locked while this supervisor lives
        self.ring = SlotRing.create(RingLayout(self.n, settings.shm_slots, settings.shm_slot_bytes))
        self.socket_path = str(self.workdir / "engine.sock")
        self.metrics_dir = self.workdir / "metrics"
        self.metrics_dir.mkdir()
        self.listeners = listeners  # bound and listening; front end i inherits listeners[i % len]
        self.engine: subprocess.Popen | None = None
        self.frontends: list[subprocess.Popen | None] = [None] * self.n
        self.restarts: list[list[float]] = [[] for _ in range(self.n)]
        self.stopping = False

    def _env(self, **extra: str) -> dict[str, str]:
        return {**os.environ, ENV_SHM: self.ring.describe(), ENV_SOCKET: self.socket_path, **extra}

    def _spawn(self, module: str, env: dict[str, str], fds: tuple[int, ...] = ()) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", module], env=env, pass_fds=fds,
                                preexec_fn=_die_with_parent)  # noqa: PLW1509 (no threads yet)

    def start_engine(self) -> int | None:
        """Start the engine and wait for its socket; its exit status if it died while starting."""
        self.engine = self._spawn("server.engine.main", self._env())
        deadline = time.monotonic() + self.settings.engine_start_timeout_s
        while time.monotonic() < deadline and not self.stopping:
            if self.engine.poll() is not None:
                return self.engine.returncode or 1
            try:
                with socket.socket(socket.AF_UNIX) as probe:
                    probe.connect(self.socket_path)
                return None
            except OSError:
                time.sleep(0.1)
        return None if self.stopping else 1

    def start_frontend(self, i: int) -> None:
        fd = self.listeners[i % len(self.listeners)].fileno()
        env = self._env(**{ENV_INDEX: str(i), ENV_LISTEN_FD: str(fd), "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)})
        self.frontends[i] = self._spawn("server.frontend.main", env, (fd,))

    def watch(self) -> int:
        """Until stopped: restart front ends that die; the engine dying ends the server (1)."""
        while not self.stopping:
            time.sleep(0.2)
            if self.engine is not None and self.engine.poll() is not None and not self.stopping:
                log.error("the engine process exited with %s; stopping", self.engine.returncode)
                return 1
            for i, proc in enumerate(self.frontends):
                if proc is None or proc.poll() is None or self.stopping:
                    continue
                now = time.monotonic()
                self.restarts[i] = [t for t in self.restarts[i] if now - t < RESTART_WINDOW_S] + [now]
                if len(self.restarts[i]) > MAX_RESTARTS:
                    log.error("front end %d keeps exiting (last status %s); stopping", i, proc.returncode)
                    return 1
                log.warning("front end %d exited with %s; restarting it", i, proc.returncode)
                self.start_frontend(i)
        return 0

    def stop(self) -> None:
        """Front ends first (they finish their requests), then the engine."""
        self.stopping = True
        grace = 10.0 + 5.0
        for proc in self.frontends:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.frontends:
            _wait(proc, grace)
        for sock in self.listeners:
            sock.close()
        if self.engine is not None and self.engine.poll() is None:
            self.engine.send_signal(signal.SIGTERM)
        _wait(self.engine, grace)
        self.ring.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        os.close(self._workdir_lock)

    def run(self) -> int:
        def on_signal(signum: int, _frame: object) -> None:
            log.info("signal %d: stopping", signum)
            self.stopping = True

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        try:
            code = self.start_engine()
            if code is not None:
                return code
            for i in range(self.n):
                self.start_frontend(i)
            log.info("serving on %s:%d with %d front end(s) and one engine", self.settings.host,
                     self.settings.port, self.n)
            return self.watch()
        finally:
            self.stop()


def _wait(proc: subprocess.Popen | None, timeout: float) -> None:
    if proc is None:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)
