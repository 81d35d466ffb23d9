"""The store interface both backends implement, and the checks they share.

The store is synchronous and thread-safe: the server calls it from worker threads. It keeps opaque
task-file blobs with a str->str metadata map that the caller extracts from the blob, immutable
numbered versions with one current, job records, and per-task training locks.
"""
from __future__ import annotations

import hashlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Self

from prompt_store import claims
from prompt_store.errors import RecordCorrupt
from prompt_store.events import Subscription
from prompt_store.ids import validate_id
from prompt_store.records import ChangeEvent, JobRecord, TaskInfo, TaskVersion


class Store(ABC):
    """Task versions, job records, change events and training locks for many tenants."""

    # ---- tasks
    @abstractmethod
    def put_task(self, tenant: str, task_id: str, blob: bytes, metadata: Mapping[str, str]) -> TaskVersion:
        """Store `blob` as a new immutable version (numbers only grow, also across deletes), make it
        current atomically, publish a `put` event, and return its record."""

    @abstractmethod
    def get_task(self, tenant: str, task_id: str, version: int | None = None) -> tuple[TaskVersion, bytes]:
        """The current (or given) version and its blob; a reader sees the old or the new, never half."""

    @abstractmethod
    def current_version(self, tenant: str, task_id: str) -> int:
        """The current version number (one cheap read)."""

    @abstractmethod
    def get_info(self, tenant: str, task_id: str) -> TaskInfo: ...

    @abstractmethod
    def list_tasks(self, tenant: str) -> list[TaskInfo]:
        """The tenant's tasks, sorted by task id."""

    def list_task_ids(self, tenant: str) -> list[str]:
        """The tenant's task ids, sorted, read without their records (a listing page reads only its own)."""
        return sorted(t.task_id for t in self.list_tasks(tenant))

    @abstractmethod
    def list_tenants(self) -> list[str]:
        """Every tenant that has stored something, sorted."""

    @abstractmethod
    def list_versions(self, tenant: str, task_id: str) -> list[TaskVersion]:
        """All versions of a task, oldest first."""

    @abstractmethod
    def activate(self, tenant: str, task_id: str, version: int) -> TaskVersion:
        """Make an existing version current (rollback or forward) and publish an `activate` event."""

    @abstractmethod
    def delete_task(self, tenant: str, task_id: str) -> None:
        """Remove a task and all its versions and publish a `delete` event. The version counter is
        kept, so a task re-created under the same id continues after the deleted numbers and a
        (tenant, task, version) key cached anywhere never names different content."""

    # ---- jobs
    @abstractmethod
    def create_job(self, job: JobRecord) -> JobRecord:
        """Store a new job record; StoreConflict if the id exists."""

    @abstractmethod
    def update_job(self, tenant: str, job_id: str, *, expect_states: Iterable[str] | None = None,
                   **fields: Any) -> JobRecord:
        """Atomic read-modify-write under the rules of `records.apply_job_update`."""

    @abstractmethod
    def get_job(self, tenant: str, job_id: str) -> JobRecord: ...

    @abstractmethod
    def list_jobs(self, tenant: str, task_id: str | None = None, state: str | None = None) -> list[JobRecord]:
        """The tenant's jobs, newest first, optionally filtered."""

    @abstractmethod
    def list_all_jobs(self, states: set[str] | None = None) -> list[JobRecord]:
        """Jobs of every tenant (recovery, sweeps), oldest first."""

    # ---- claims and fencing (rules in prompt_store.claims)
    @abstractmethod
    def modify_job(self, tenant: str, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord:
        """Atomic read-modify-write: store `change(job)` unless it is None (then nothing is written);
        returns what is stored. `change` may run more than once (optimistic retries): keep it pure."""

    @abstractmethod
    def publish_job(self, tenant: str, job_id: str, token: int, blob: bytes, metadata: Mapping[str, str],
                    **fields: Any) -> tuple[JobRecord, TaskVersion]:
        """One atomic step: put `blob` as the task's new version and mark the job `succeeded` with it,
        only while `token` is the job's current claim (ClaimLost, JobFinished) and the task was not
        deleted since the job was created (TaskFenced). Idempotent by job id: a retry of a publish that
        happened returns the version it made."""

    @abstractmethod
    def task_fence(self, tenant: str, task_id: str) -> int:
        """How many times the task was deleted; a job records it at creation (`JobRecord.fence`)."""

    def claim_job(self, tenant: str, job_id: str, worker: str, stale_s: float,
                  delivery: str | None = None) -> JobRecord:
        """Claim one job for `worker` (see claims.claim_update); the record carries the new token."""
        return self.modify_job(tenant, job_id, lambda j: claims.claim_update(j, worker, stale_s, delivery))

    def heartbeat_job(self, tenant: str, job_id: str, token: int,
                      progress: dict[str, Any] | None = None) -> JobRecord:
        """The claim's worker is alive (and reports progress); ClaimLost/JobFinished if it lost the job."""
        return self.modify_job(tenant, job_id, lambda j: claims.heartbeat_update(j, token, progress))

    def finish_job(self, tenant: str, job_id: str, token: int, state: str, **fields: Any) -> JobRecord:
        """Record the claim's outcome (terminal, or `queued` to hand it back), fenced by `token`."""
        return self.modify_job(tenant, job_id, lambda j: claims.outcome_update(j, token, state, fields))

    def reap_job(self, tenant: str, job_id: str, stale_s: float, max_claims: int) -> JobRecord | None:
        """Re-queue (or fail, after `max_claims` claims) a running job whose worker went silent.
        Returns the new record, or None if the job was not stale."""
        changed: list[JobRecord] = []

        def change(job: JobRecord) -> JobRecord | None:
            new = claims.reap_update(job, stale_s, max_claims)
            changed[:] = [new] if new is not None else []
            return new

        self.modify_job(tenant, job_id, change)
        return changed[0] if changed else None

    def cancel_job(self, tenant: str, job_id: str, stale_s: float | None = None) -> JobRecord:
        """Cancel a job (see claims.cancel_update); JobFinished if it already ended."""
        return self.modify_job(tenant, job_id, lambda j: claims.cancel_update(j, stale_s))

    # ---- training locks: at most one training per task
    @abstractmethod
    def try_lock_task(self, tenant: str, task_id: str, holder: str, ttl_s: float) -> bool:
        """Take the task's training lock for `holder` (a job id) for `ttl_s` seconds. True if taken,
        or already held by `holder` (then its ttl is refreshed); False if someone else holds it."""

    @abstractmethod
    def release_task_lock(self, tenant: str, task_id: str, holder: str) -> bool:
        """Release the lock if `holder` holds it; True if it did."""

    @abstractmethod
    def task_lock_holder(self, tenant: str, task_id: str) -> str | None:
        """Who holds the task's training lock now, if anyone."""

    # ---- events and lifecycle
    @abstractmethod
    def subscribe(self, callback: Callable[[ChangeEvent], None]) -> Subscription:
        """Call `callback(event)` on a background thread for every change, from any client."""

    @abstractmethod
    def ping(self) -> None:
        """Raise StoreUnavailable if the backend cannot be used."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_put(tenant: str, task_id: str, blob: bytes, metadata: Mapping[str, str]) -> dict[str, str]:
    """Validate a put's arguments; return the metadata as a plain dict."""
    validate_id(tenant, "tenant")
    validate_id(task_id)
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise TypeError(f"blob must be bytes, got {type(blob).__name__}")
    meta = dict(metadata)
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("metadata keys and values must be str")
    return meta


def new_version(tenant: str, task_id: str, version: int, blob: bytes, metadata: dict[str, str],
                now: float | None = None) -> TaskVersion:
    return TaskVersion(tenant=tenant, task_id=task_id, version=version,
                       created_at=time.time() if now is None else now, size_bytes=len(blob),
                       sha256=hashlib.sha256(blob).hexdigest(), metadata=metadata)


def verify_blob(record: TaskVersion, blob: bytes) -> None:
    """RecordCorrupt unless `blob` is exactly what `record` describes."""
    if len(blob) != record.size_bytes or hashlib.sha256(blob).hexdigest() != record.sha256:
        raise RecordCorrupt(
            f"task {record.tenant}/{record.task_id} v{record.version}: blob does not match its checksum"
        )
