"""The local store's job records, claims and queue (a mixin of LocalStore).

Job records are `tenants/{tenant}/jobs/{job}.json`. Each queued or running job also has an empty
marker `tenants/{tenant}/active/{job}`: the set of markers is the queue, so claiming the next job
reads only active records, never the whole history. A marker is created before its record enters
an active state and removed after it leaves one, so a crash in between leaves at most a marker
whose record is terminal or missing, which the next claim removes. Every change happens under the
store's write lock (a thread lock plus a file lock), which makes a claim a conditional state change
across processes on one host. Workers are served round-robin across tenants: `queue.cursor` names
the tenant served last.
"""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prompt_store import claims
from prompt_store.base import check_put
from prompt_store.errors import JobNotFound, RecordCorrupt, StoreConflict, TaskFenced, TaskNotFound
from prompt_store.ids import validate_id
from prompt_store.local_files import _id_entries, _json_bytes, _read_json
from prompt_store.records import JobRecord, TaskVersion, apply_job_update


class LocalJobsMixin:
    """Job methods of LocalStore; relies on its `_writing`, `_io`, `_write`, `_sync` and `paths`."""

    # ---- records
    def _job(self, tenant: str, job_id: str) -> JobRecord:
        try:
            return JobRecord.from_dict(_read_json(self.paths.job(tenant, job_id)))
        except FileNotFoundError:
            raise JobNotFound(f"job {job_id!r} not found") from None

    def _put_job(self, job: JobRecord) -> None:
        path, marker = self.paths.job(job.tenant, job.job_id), self.paths.active(job.tenant, job.job_id)
        active = job.state in claims.ACTIVE_STATES
        if active and not marker.exists():
            self._write(marker, b"", fsync=False)
        self._write(path, _json_bytes(job.to_dict()))
        self._sync(path.parent, *((marker.parent,) if active else ()))
        if not active:
            marker.unlink(missing_ok=True)

    def _fence(self, tenant: str, task_id: str) -> int:
        try:
            return int(self.paths.fence(tenant, task_id).read_text())
        except FileNotFoundError:
            return 0
        except ValueError as exc:
            raise RecordCorrupt(f"delete counter of task {task_id!r} is unreadable") from exc

    def _bump_fence(self, tenant: str, task_id: str) -> None:
        """Under the write lock, before a delete: in-flight jobs of the task can no longer publish."""
        path = self.paths.fence(tenant, task_id)
        self._write(path, str(self._fence(tenant, task_id) + 1).encode())
        self._sync(path.parent)

    def task_fence(self, tenant: str, task_id: str) -> int:
        with self._io():
            return self._fence(tenant, task_id)

    def create_job(self, job: JobRecord) -> JobRecord:
        validate_id(job.tenant, "tenant")
        validate_id(job.task_id)
        with self._writing():
            if self.paths.job(job.tenant, job.job_id).exists():
                raise StoreConflict(f"job {job.job_id!r} already exists")
            job = dataclasses.replace(job, fence=self._fence(job.tenant, job.task_id))
            self._put_job(job)
        return job

    def update_job(self, tenant: str, job_id: str, *, expect_states: Iterable[str] | None = None,
                   **fields: Any) -> JobRecord:
        return self.modify_job(tenant, job_id, lambda j: apply_job_update(j, fields, expect_states))

    def modify_job(self, tenant: str, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord:
        with self._writing():
            job = self._job(tenant, job_id)
            new = change(job)
            if new is None:
                return job
            self._put_job(new)
        return new

    def get_job(self, tenant: str, job_id: str) -> JobRecord:
        with self._io():
            return self._job(tenant, job_id)

    def list_jobs(self, tenant: str, task_id: str | None = None, state: str | None = None) -> list[JobRecord]:
        jobs = []
        with self._io():
            for job_id in _id_entries(self.paths.jobs_dir(tenant), ".json"):
                with contextlib.suppress(JobNotFound):
                    jobs.append(self._job(tenant, job_id))
        jobs = [j for j in jobs if (task_id is None or j.task_id == task_id) and (state is None or j.state == state)]
        return sorted(jobs, key=lambda j: (j.created_at, j.job_id), reverse=True)

    def list_all_jobs(self, states: set[str] | None = None) -> list[JobRecord]:
        jobs = []
        for tenant in _id_entries(self.paths.tenants_dir):
            if states is not None and set(states) <= claims.ACTIVE_STATES:
                jobs += [j for j in self._active_jobs(tenant) if j.state in states]
            else:
                jobs += [j for j in self.list_jobs(tenant) if states is None or j.state in states]
        return sorted(jobs, key=lambda j: (j.created_at, j.job_id))

    def _active_jobs(self, tenant: str) -> list[JobRecord]:
        """The tenant's queued and running jobs, oldest first, read through the markers."""
        out = []
        with self._io():
            for job_id in _id_entries(self.paths.active_dir(tenant)):
                with contextlib.suppress(JobNotFound, RecordCorrupt):
                    job = self._job(tenant, job_id)
                    if job.state in claims.ACTIVE_STATES:
                        out.append(job)
        return sorted(out, key=lambda j: (j.created_at, j.job_id))

    # ---- the queue: claim the next queued job, round-robin across tenants
    def index_active_jobs(self) -> int:
        """Give every queued or running record its marker (stores written before markers existed);
        returns how many were missing. Reads every record once: called when a queue opens."""
        missing = 0
        with self._writing():
            for tenant in _id_entries(self.paths.tenants_dir):
                for job_id in _id_entries(self.paths.jobs_dir(tenant), ".json"):
                    marker = self.paths.active(tenant, job_id)
                    with contextlib.suppress(JobNotFound, RecordCorrupt):
                        if not marker.exists() and self._job(tenant, job_id).state in claims.ACTIVE_STATES:
                            self._write(marker, b"", fsync=False)
                            missing += 1
        return missing

    def claim_next_job(self, worker: str, stale_s: float) -> JobRecord | None:
        """Claim the oldest queued job of the next tenant after the one served last; None if none."""
        tenants = _id_entries(self.paths.tenants_dir)
        if not any(j.state == "queued" for t in tenants for j in self._active_jobs(t)):
            return None  # the common idle case: no write lock taken
        with self._writing():
            queued: dict[str, JobRecord] = {}
            for tenant in _id_entries(self.paths.tenants_dir):
                self._drop_dead_markers(tenant)
                first = next((j for j in self._active_jobs(tenant) if j.state == "queued"), None)
                if first is not None:
                    queued[tenant] = first
            if not queued:
                return None
            last = self._read_cursor()
            order = sorted(queued)
            tenant = next((t for t in order if t > last), order[0])
            job = claims.claim_update(queued[tenant], worker, stale_s)
            self._put_job(job)
            self._write(self.paths.queue_cursor, tenant.encode(), fsync=False)
        return job

    def _read_cursor(self) -> str:
        try:
            return self.paths.queue_cursor.read_text().strip()
        except FileNotFoundError:
            return ""

    def _drop_dead_markers(self, tenant: str) -> None:
        """Markers whose record is gone or no longer active (a crash between the two writes)."""
        for job_id in _id_entries(self.paths.active_dir(tenant)):
            try:
                active = self._job(tenant, job_id).state in claims.ACTIVE_STATES
            except (JobNotFound, RecordCorrupt):
                active = False
            if not active:
                self.paths.active(tenant, job_id).unlink(missing_ok=True)

    # ---- publish: a new version and the job's success in one step under the lock
    def publish_job(self, tenant: str, job_id: str, token: int, blob: bytes, metadata: Mapping[str, str],
                    **fields: Any) -> tuple[JobRecord, TaskVersion]:
        with self._writing():
            job = self._job(tenant, job_id)
            meta = check_put(tenant, job.task_id, blob, metadata)
            if job.state == "succeeded" and job.claim_token == token and job.version is not None:
                return job, self._record(tenant, job.task_id, job.version)[0]  # a retried publish
            claims.check_token(job, token)
            if self._fence(tenant, job.task_id) != job.fence:
                raise TaskFenced(f"task {job.task_id!r} was deleted after job {job_id} was created")
            record = self._made_by(job) or self._put_locked(tenant, job.task_id, bytes(blob), meta)
            done = claims.outcome_update(job, token, "succeeded", {**fields, "version": record.version})
            self._put_job(done)
        return done, record

    def _made_by(self, job: JobRecord) -> TaskVersion | None:
        """The version `job` already published (a crash between the version and the job record)."""
        try:
            numbers = self._version_numbers(job.tenant, job.task_id)
            for n in reversed(numbers):
                record = self._record(job.tenant, job.task_id, n)[0]
                if record.metadata.get("job_id") == job.job_id:
                    return record
        except TaskNotFound:
            return None
        return None
