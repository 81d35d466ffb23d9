"""Text output of the `vpt` command line: tables, detail blocks and progress lines."""
from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TextIO

from pydantic import BaseModel

from vpt_client.models import Job

BAR_WIDTH = 24


def to_json(value: Any) -> str:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    return json.dumps(value, indent=2, sort_keys=False)


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, dict):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(cell(v) for v in value) or "-"
    return str(value)


def short_metrics(metrics: dict[str, Any] | None, limit: int = 4) -> str:
    """The scalar metrics, accuracies first, as `k=v` (nested ones are left to --json)."""
    if not metrics:
        return "-"
    scalars = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    scalars.sort(key=lambda kv: "acc" not in kv[0])  # stable: accuracies first, then the server's order
    return " ".join(f"{k}={cell(v)}" for k, v in scalars[:limit]) or "-"


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns, two spaces apart."""
    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in text_rows]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in text_rows]
    return "\n".join(lines)


def details(pairs: Sequence[tuple[str, Any]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {cell(v)}" for k, v in pairs)


def error_details(exc: Exception, limit: int = 20) -> list[str]:
    """The lines under an error: what its `details` name (e.g. a dataset's offending files), from the
    server's answer or from a failed job's error; nothing when it has none."""
    found = getattr(exc, "details", None)
    job = getattr(exc, "job", None)
    if found is None and job is not None and job.error is not None:
        found = job.error.details
    if isinstance(found, dict):
        found = [f"{k}: {cell(v)}" for k, v in found.items()]
    if not isinstance(found, list):
        return [] if found is None else [cell(found)]
    lines = [cell(item) for item in found[:limit]]
    return lines + ([f"... and {len(found) - limit} more"] if len(found) > limit else [])


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def job_fraction(job: Job) -> float:
    p = job.progress
    if job.succeeded:
        return 1.0
    if p is None:
        return 0.0
    if p.fraction is not None:
        return min(max(p.fraction, 0.0), 1.0)
    if p.epochs and p.epoch is not None:
        return min(max(p.epoch / p.epochs, 0.0), 1.0)
    return 0.0


def job_line(job: Job) -> str:
    """`[#####-------]  42% running  run 2/6 (lr 5, wd 0.001)  epoch 3/10  loss 0.412  val_acc 0.91  eta 1m05s`
    (the run only during a sweep)."""
    frac = job_fraction(job)
    filled = round(frac * BAR_WIDTH)
    parts = [f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {frac * 100:3.0f}%", job.state]
    p = job.progress
    if p is not None:
        if p.runs is not None and p.runs > 1:
            parts.append(f"run {p.run}/{p.runs} (lr {cell(p.base_lr)}, wd {cell(p.weight_decay)})")
        if p.epoch is not None:
            parts.append(f"epoch {p.epoch}/{p.epochs if p.epochs is not None else '?'}")
        if p.loss is not None:
            parts.append(f"loss {p.loss:.4f}")
        if p.val_acc is not None:
            parts.append(f"val_acc {p.val_acc:.3f}")
        if p.images_per_s:
            parts.append(f"{p.images_per_s:.0f} img/s")
        if p.eta_s is not None and not job.done:
            parts.append(f"eta {duration(p.eta_s)}")
    return "  ".join(parts)


class UploadProgress:
    """`on_upload` callback: a live percentage on a terminal, one line when done otherwise."""

    def __init__(self, stream: TextIO, name: str, enabled: bool = True) -> None:
        self._stream, self._name, self._enabled = stream, name, enabled
        self._tty = enabled and stream.isatty()
        self._last, self._sent, self._total = 0.0, 0, 0

    def __call__(self, sent: int, total: int) -> None:
        self._sent, self._total = sent, total
        now = time.monotonic()
        if self._tty and (now - self._last >= 0.1 or sent >= total):
            self._last = now
            pct = 100.0 * sent / total if total else 100.0
            self._stream.write(f"\ruploading {self._name}  {pct:5.1f}%  "
                               f"{human_bytes(sent)} / {human_bytes(total)}   ")
            self._stream.flush()

    def finish(self) -> None:
        if self._enabled:
            prefix = "\r" if self._tty else ""
            self._stream.write(f"{prefix}uploaded {self._name} ({human_bytes(self._total)})" + " " * 20 + "\n")
            self._stream.flush()


class TrainingBar:
    """Training progress: redrawn in place with \\r on a terminal; elsewhere one line per change."""

    def __init__(self, stream: TextIO, enabled: bool = True) -> None:
        self._stream, self._enabled = stream, enabled
        self._tty = enabled and stream.isatty()
        self._width, self._last_key = 0, None

    def update(self, job: Job) -> None:
        if not self._enabled:
            return
        if self._tty:
            line = job_line(job)
            self._stream.write("\r" + line.ljust(self._width))
            self._width = max(self._width, len(line))
        else:
            key = (job.state, job.progress.run if job.progress else None,
                   job.progress.epoch if job.progress else None)
            if key == self._last_key:
                return
            self._last_key = key
            self._stream.write(job_line(job) + "\n")
        self._stream.flush()

    def finish(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()
