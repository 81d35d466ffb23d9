"""Serving first: one gate orders a shared device between serving batches and training steps.

Serving wraps each batch in `gate.serving()`, training each step in `gate.training()`; one of
them holds the device at a time. A batch waiting at the gate always goes before the next
training step. While serving is busy (a batch waiting, or one ran within `busy_window_s`),
training may still take `training_share` of the device's time: every second of serving earned
while a step waits gives `share / (1 - share)` seconds of credit, a contended step spends its
duration, and a step starts only with credit left. So under full load training gets about
`share` of the time and still progresses; with serving idle it runs freely; with `share = 0` it
waits for serving to go idle.

On CUDA, the same interface also runs serving on a high-priority stream and training on a
low-priority one, each synchronised when its turn ends, so serving kernels are scheduled first
where the two overlap (e.g. serving work launched while a step drains).
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateStats:
    serving_runs: int
    training_steps: int
    training_waits: int        # steps that had to wait for serving
    serving_s: float
    training_s: float
    credit_s: float


class PriorityGate:
    """Orders serving batches before training steps; training keeps at most `training_share` under load."""

    def __init__(self, training_share: float = 0.2, *, device: torch.device | str | None = None,
                 busy_window_s: float = 0.05, max_credit_s: float = 1.0) -> None:
        if not 0.0 <= training_share < 1.0:
            raise ValueError(f"training_share must be in [0, 1), got {training_share}")
        self.training_share = training_share
        self.busy_window_s, self.max_credit_s = busy_window_s, max_credit_s
        self._cond = threading.Condition()
        self._holder: str | None = None
        self._reserved = False            # the next turn is promised to a waiting training step
        self._serving_waiting = 0
        self._training_waiting = 0
        self._last_serving = float("-inf")
        self._credit = 0.0
        self._runs = self._steps = self._waits = 0
        self._serving_s = self._training_s = 0.0
        self._streams = _streams(device)

    # -- the two sides ----------------------------------------------------------------------------

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Hold the device for one serving batch (waits only for a training step already running)."""
        with self._cond:
            self._serving_waiting += 1
            try:
                self._cond.wait_for(lambda: self._holder is None and not (self._reserved and self._training_waiting))
            finally:
                self._serving_waiting -= 1
            self._holder = "serving"
        t0 = time.perf_counter()
        try:
            with self._on_stream(0):
                yield
        finally:
            self._end_serving(time.perf_counter() - t0)

    @contextmanager
    def training(self) -> Iterator[None]:
        """Hold the device for one training step, after any waiting batch and within the share."""
        with self._cond:
            self._training_waiting += 1
            waited = False
            try:
                while not self._training_may_start():
                    waited = True
                    self._cond.wait(timeout=self.busy_window_s)
            finally:
                self._training_waiting -= 1
            self._reserved = False
            self._holder = "training"
            contended = self._busy()
            self._waits += waited
        t0 = time.perf_counter()
        try:
            with self._on_stream(1):
                yield
        finally:
            self._end_training(time.perf_counter() - t0, contended)

    def stats(self) -> GateStats:
        with self._cond:
            return GateStats(self._runs, self._steps, self._waits, self._serving_s, self._training_s, self._credit)

    # -- internals --------------------------------------------------------------------------------

    def _busy(self) -> bool:
        return self._serving_waiting > 0 or time.perf_counter() - self._last_serving < self.busy_window_s

    def _training_may_start(self) -> bool:
        if self._holder is not None:
            return False
        if self._reserved:
            return True
        if self._serving_waiting > 0:  # a waiting batch goes first
            return False
        return not self._busy() or self._credit > 0

    def _end_serving(self, dt: float) -> None:
        with self._cond:
            self._holder = None
            self._runs += 1
            self._serving_s += dt
            self._last_serving = time.perf_counter()
            if self._training_waiting and self.training_share > 0:
                earned = dt * self.training_share / (1.0 - self.training_share)
                self._credit = min(self._credit + earned, self.max_credit_s)
                self._reserved = self._credit > 0
            self._cond.notify_all()

    def _end_training(self, dt: float, contended: bool) -> None:
        with self._cond:
            self._holder = None
            self._steps += 1
            self._training_s += dt
            if contended or self._serving_waiting > 0:
                self._credit = max(self._credit - dt, -self.max_credit_s)
            self._cond.notify_all()

    def _on_stream(self, which: int) -> Any:
        if self._streams is None:
            return nullcontext()
        return _stream_turn(self._streams[which])


def _streams(device: torch.device | str | None) -> tuple[Any, Any] | None:
    """(serving, training) CUDA streams of high and low priority, or None off CUDA."""
    if device is None or torch.device(device).type != "cuda":
        return None
    try:
        low, high = torch.cuda.Stream.priority_range()
        dev = torch.device(device)
        return torch.cuda.Stream(dev, priority=high), torch.cuda.Stream(dev, priority=low)
    except (RuntimeError, AttributeError) as e:  # an old driver: order by the gate alone
        log.warning("CUDA stream priorities unavailable (%s); the gate orders by turns only", e)
        return None


@contextmanager
def _stream_turn(stream: Any) -> Iterator[None]:
    stream.wait_stream(torch.cuda.current_stream(stream.device))  # see what the caller's stream wrote
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        stream.synchronize()  # the turn ends when its kernels have
