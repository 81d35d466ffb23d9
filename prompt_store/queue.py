"""The job queue the training workers pull from: claims, heartbeats, recovery, cancellation.

The job record in the store is the truth, and every delivery of a job to a worker is a *claim* on
the record (`Store.claim_job`): a conditional state change that bumps the job's `claim_token`.
A worker's heartbeats, progress, publish and outcome all carry that token and are refused once
another claim fenced it (prompt_store.claims), so a job is published and finished exactly once even
when a stalled worker comes back.

- `LocalJobQueue` (file store): the store's queued records *are* the queue. Any process on the host
  can submit (create a queued record) and any process can claim (`LocalStore.claim_next_job`, under
  the store's file lock, round-robin across tenants). Nothing lives only in memory.
- `RedisJobQueue`: a Redis Stream with one consumer group carries (tenant, job_id) deliveries; a
  delivery is turned into a claim on the record, and acknowledged only once its outcome is recorded.

Recovery is by heartbeat, never by "whatever was running when I started is dead": a running job
whose worker has been silent for `stale_s` is re-queued (or failed after `max_claims` claims) by
`reap`, run by every worker; in Redis mode a delivery still pending in the stream is taken over by
`recover_stale` instead. Cancellation lives on the record (`request_cancel`).
"""
from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from prompt_store import claims
from prompt_store.base import Store
from prompt_store.errors import JobNotFound, StoreConflict
from prompt_store.ids import validate_id
from prompt_store.records import JobRecord

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Claim:
    """One delivery of a job to a worker: `token` is the job's claim token for this delivery."""

    tenant: str
    job_id: str
    worker: str
    message_id: str
    deliveries: int = 1
    token: int = 0
    job: JobRecord | None = None

    @classmethod
    def of(cls, job: JobRecord, message_id: str | None = None) -> Claim:
        return cls(job.tenant, job.job_id, job.worker or "", message_id or job.job_id, job.claim_token,
                   job.claim_token, job)


class JobQueue(ABC):
    """Claims of job records, with heartbeats, recovery, reaping and per-task training locks."""

    def __init__(self, store: Store, stale_s: float = 120.0, max_claims: int = 3) -> None:
        self.store = store
        self.stale_s, self.max_claims = stale_s, max_claims

    def submit(self, job: JobRecord) -> JobRecord:
        """Create a queued job record and make it claimable (one step where the backend allows)."""
        job = self.store.create_job(job)
        self.enqueue(job.tenant, job.job_id)
        return job

    @abstractmethod
    def enqueue(self, tenant: str, job_id: str) -> str:
        """Make an existing queued record claimable; returns the delivery id."""

    @abstractmethod
    def claim(self, worker: str, timeout_s: float) -> Claim | None:
        """The next job for `worker` (now `running` under a new token), waiting up to `timeout_s`."""

    @abstractmethod
    def ack(self, claim: Claim) -> bool:
        """The claim's outcome is recorded: drop the delivery. False if it was no longer pending."""

    def heartbeat(self, claim: Claim, progress: dict[str, Any] | None = None) -> JobRecord:
        """`claim.worker` is alive (and reports progress); ClaimLost or JobFinished if it lost the job."""
        return self.store.heartbeat_job(claim.tenant, claim.job_id, claim.token, progress)

    @abstractmethod
    def recover_stale(self, idle_ms: int, worker: str, count: int = 1) -> list[Claim]:
        """Claim up to `count` deliveries whose worker sent no heartbeat for `idle_ms`."""

    @abstractmethod
    def requeue(self, claim: Claim) -> JobRecord:
        """Hand the claimed job back to the queue (the worker stops, not the job's fault)."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """`waiting` (not yet claimed) and `claimed` (claimed, not finished) counts."""

    def _covered(self, job: JobRecord) -> bool:
        """Whether a pending delivery still covers `job` (then recovery, not the reaper, handles it)."""
        return False

    def _before_reap(self, job: JobRecord) -> None:
        """Called before the reaper may re-queue `job` (Redis adds its delivery first, so a crash in
        between leaves a stray delivery, which a claim drops, never a queued job nothing delivers)."""

    def reap(self) -> list[JobRecord]:
        """Re-queue, or fail after `max_claims` claims, `running` jobs whose worker heartbeat is older
        than `stale_s` and that no pending delivery covers. Returns the jobs it changed."""
        out = []
        for job in self.store.list_all_jobs({"running"}):
            if not claims.is_stale(job, self.stale_s) or self._covered(job):
                continue
            self._before_reap(job)
            try:
                new = self.store.reap_job(job.tenant, job.job_id, self.stale_s, self.max_claims)
            except (StoreConflict, JobNotFound):
                continue
            if new is None:
                continue
            log.warning("job %s: worker %s silent for %.0fs; job %s", job.job_id, job.worker, self.stale_s,
                        "re-queued" if new.state == "queued" else "failed")
            out.append(new)
        return out

    def try_lock_task(self, tenant: str, task_id: str, job_id: str, ttl_s: float) -> bool:
        """At most one training per task: take (or refresh, for the same job) the task's lock."""
        return self.store.try_lock_task(tenant, task_id, job_id, ttl_s)

    def refresh_task_lock(self, tenant: str, task_id: str, job_id: str, ttl_s: float) -> bool:
        """Extend the lock `job_id` holds; False if it lost it (expired and taken by another)."""
        return self.store.try_lock_task(tenant, task_id, job_id, ttl_s)

    def release_task_lock(self, tenant: str, task_id: str, job_id: str) -> bool:
        return self.store.release_task_lock(tenant, task_id, job_id)

    def close(self) -> None:
        """Release resources; the store stays open (its owner closes it)."""


def request_cancel(store: Store, tenant: str, job_id: str, stale_s: float | None = None) -> JobRecord:
    """Cancel a job: a queued one (or a running one whose worker has been silent for `stale_s`) is
    `cancelled` now; a live running one gets `cancel_requested`, which its worker polls.

    Raises JobFinished (a StoreConflict) if the job is already terminal, JobNotFound if unknown.
    """
    return store.cancel_job(tenant, job_id, stale_s)


class LocalJobQueue(JobQueue):
    """The file store's queued records are the queue: any process on the host submits and claims."""

    POLL_S = 0.2  # how often a waiting claim looks for work submitted by another process

    def __init__(self, store: Store, stale_s: float = 120.0, max_claims: int = 3) -> None:
        super().__init__(store, stale_s, max_claims)
        if not hasattr(store, "claim_next_job"):
            raise TypeError("LocalJobQueue needs a LocalStore")
        store.index_active_jobs()  # type: ignore[attr-defined]
        self._cond = threading.Condition()
        self._closed = False

    def enqueue(self, tenant: str, job_id: str) -> str:
        validate_id(tenant, "tenant")
        job = self.store.get_job(tenant, validate_id(job_id, "job id"))
        if job.state != "queued":
            raise StoreConflict(f"job {job_id!r} is {job.state}, not queued")
        with self._cond:
            self._cond.notify_all()
        return job_id

    def claim(self, worker: str, timeout_s: float) -> Claim | None:
        validate_id(worker, "worker")
        deadline = time.monotonic() + max(0.0, timeout_s)
        while not self._closed:
            job = self.store.claim_next_job(worker, self.stale_s)  # type: ignore[attr-defined]
            if job is not None:
                return Claim.of(job)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            with self._cond:
                self._cond.wait(min(self.POLL_S, remaining))
        return None

    def ack(self, claim: Claim) -> bool:
        return True  # the recorded outcome is the acknowledgement

    def recover_stale(self, idle_ms: int, worker: str, count: int = 1) -> list[Claim]:
        validate_id(worker, "worker")
        out = []
        for job in self.store.list_all_jobs({"running"}):
            if len(out) >= count:
                break
            if claims.is_stale(job, idle_ms / 1000):
                try:
                    out.append(Claim.of(self.store.claim_job(job.tenant, job.job_id, worker, idle_ms / 1000)))
                except (StoreConflict, JobNotFound):
                    continue
        return out

    def requeue(self, claim: Claim) -> JobRecord:
        job = self.store.finish_job(claim.tenant, claim.job_id, claim.token, "queued")
        with self._cond:
            self._cond.notify_all()
        return job

    def stats(self) -> dict[str, int]:
        active = self.store.list_all_jobs({"queued", "running"})
        waiting = sum(j.state == "queued" for j in active)
        return {"waiting": waiting, "claimed": len(active) - waiting}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
