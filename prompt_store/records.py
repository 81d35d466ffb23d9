"""The records the store keeps: task versions, task summaries, job records and change events.

All are frozen dataclasses with `to_dict`/`from_dict` (plain JSON types). `from_dict` checks what it
reads and raises RecordCorrupt, so a damaged record is a typed error rather than a KeyError deep in
the server.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from prompt_store.errors import JobFinished, RecordCorrupt, StoreConflict
from prompt_store.ids import new_job_id, validate_id

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
EVENT_KINDS = ("put", "activate", "delete", "resync")
# Fields fixed when a job is created; update_job refuses to change them.
JOB_IMMUTABLE_FIELDS = frozenset({"job_id", "tenant", "task_id", "created_at"})


def _load(cls: type, data: Mapping[str, Any]) -> Any:
    """Build `cls` from a mapping, turning any shape problem into RecordCorrupt."""
    try:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
    except (TypeError, ValueError, AttributeError) as exc:
        raise RecordCorrupt(f"cannot decode {cls.__name__}: {exc}") from exc


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


@dataclass(frozen=True)
class TaskVersion:
    """One immutable version of a task: its blob's size and sha256 plus the caller's metadata."""

    tenant: str
    task_id: str
    version: int
    created_at: float
    size_bytes: int
    sha256: str
    metadata: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _need(isinstance(self.version, int) and self.version >= 1, "version must be an int >= 1")
        _need(isinstance(self.size_bytes, int) and self.size_bytes >= 0, "size_bytes must be an int >= 0")
        _need(isinstance(self.sha256, str) and len(self.sha256) == 64, "sha256 must be 64 hex digits")
        _need(isinstance(self.metadata, dict), "metadata must be a dict")
        _need(all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()),
              "metadata keys and values must be str")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskVersion:
        return _load(cls, data)


@dataclass(frozen=True)
class TaskInfo:
    """A task as a whole: which version is current, how many exist, and the current one's record."""

    tenant: str
    task_id: str
    current_version: int
    num_versions: int
    created_at: float
    updated_at: float
    current: TaskVersion

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskInfo:
        if not isinstance(data, Mapping) or not isinstance(data.get("current"), Mapping):
            raise RecordCorrupt("cannot decode TaskInfo: no current version")
        return _load(cls, {**data, "current": TaskVersion.from_dict(data["current"])})


@dataclass(frozen=True)
class JobRecord:
    """A training job. `cancel_requested` is how a running job is asked to stop (see queue.request_cancel)."""

    job_id: str
    tenant: str
    task_id: str
    state: str = "queued"
    created_at: float = 0.0
    updated_at: float = 0.0
    started_at: float | None = None
    finished_at: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    progress: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    version: int | None = None
    cancel_requested: bool = False
    worker: str | None = None
    dataset_path: str | None = None
    claim_token: int = 0                # fencing counter: grows on every claim (see prompt_store.claims)
    heartbeat_at: float | None = None   # wall clock of the claiming worker's last heartbeat
    fence: int = 0                      # the task's delete counter when the job was created
    delivery: str | None = None         # the queue entry (Redis stream id) of the current claim

    def __post_init__(self) -> None:
        _need(self.state in JOB_STATES, f"state must be one of {JOB_STATES}, got {self.state!r}")
        _need(isinstance(self.options, dict) and isinstance(self.progress, dict),
              "options and progress must be dicts")

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @classmethod
    def new(cls, tenant: str, task_id: str, options: Mapping[str, Any] | None = None,
            dataset_path: str | None = None, job_id: str | None = None, now: float | None = None) -> JobRecord:
        """A fresh queued job with a new id and both timestamps set to now."""
        now = time.time() if now is None else now
        return cls(job_id=validate_id(job_id or new_job_id(), "job id"), tenant=validate_id(tenant, "tenant"),
                   task_id=validate_id(task_id), created_at=now, updated_at=now,
                   options=dict(options or {}), dataset_path=dataset_path)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobRecord:
        return _load(cls, data)

    @classmethod
    def from_json(cls, text: str | bytes) -> JobRecord:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RecordCorrupt(f"job record is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise RecordCorrupt("job record is not a JSON object")
        return cls.from_dict(data)


def apply_job_update(job: JobRecord, fields: Mapping[str, Any],
                     expect_states: Iterable[str] | None = None, now: float | None = None) -> JobRecord:
    """The one set of rules both backends apply inside their atomic read-modify-write.

    - `job_id`, `tenant`, `task_id`, `created_at` cannot change; unknown fields are a TypeError;
    - with `expect_states`, the job must currently be in one of them, else StoreConflict;
    - a terminal state is final and written once: any state write to a terminal job is JobFinished
      (a StoreConflict), so a second outcome (a second publish) is refused;
    - `updated_at` becomes now; entering `running` sets `started_at`, entering a terminal state sets
      `finished_at` (unless the caller passes them).
    """
    names = {f.name for f in dataclasses.fields(JobRecord)}
    unknown = set(fields) - names
    if unknown:
        raise TypeError(f"unknown job fields: {sorted(unknown)}")
    fixed = set(fields) & JOB_IMMUTABLE_FIELDS
    if fixed:
        raise TypeError(f"job fields cannot be changed: {sorted(fixed)}")
    if expect_states is not None:
        allowed = set(expect_states)
        if job.state not in allowed:
            error = JobFinished if job.terminal else StoreConflict
            raise error(f"job {job.job_id} is {job.state}, expected one of {sorted(allowed)}")
    new_state = fields.get("state", job.state)
    if job.terminal and "state" in fields:
        raise JobFinished(f"job {job.job_id} is already {job.state}")
    now = time.time() if now is None else now
    changes: dict[str, Any] = {"updated_at": now, **fields}
    if new_state != job.state:
        if new_state == "running" and "started_at" not in fields:
            changes["started_at"] = now
        if new_state in TERMINAL_STATES and "finished_at" not in fields:
            changes["finished_at"] = now
    try:
        return dataclasses.replace(job, **changes)
    except ValueError as exc:  # e.g. an unknown state
        raise ValueError(f"invalid job update: {exc}") from exc


@dataclass(frozen=True)
class ChangeEvent:
    """A task changed. `resync` (tenant and task_id empty) means events may have been missed:
    drop every cached `current` pointer and re-read."""

    tenant: str
    task_id: str
    version: int | None
    kind: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChangeEvent:
        event = _load(cls, data)
        if event.kind not in EVENT_KINDS:
            raise RecordCorrupt(f"unknown change event kind {event.kind!r}")
        return event

    @classmethod
    def resync(cls) -> ChangeEvent:
        return cls(tenant="", task_id="", version=None, kind="resync")
