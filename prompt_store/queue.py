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
from dataclasses import dataclass, replace
from typing import Any

import redis

from prompt_store import claims
from prompt_store.base import Store
from prompt_store.errors import JobFinished, JobNotFound, StoreConflict
from prompt_store.ids import RedisKeys, validate_id
from prompt_store.records import JobRecord
from prompt_store.redis_store import RedisStore, translated

log = logging.getLogger(__name__)

# Receive the next delivery round-robin across tenants: the first tenant after the one served last
# (sorted by name, wrapping) whose stream has an undelivered entry. Returns {tenant, id, fields...}.
_NEXT_SCRIPT = """
local tenants = redis.call('SORT', KEYS[1], 'ALPHA')
local n = #tenants
if n == 0 then return false end
local last = redis.call('GET', KEYS[2]) or ''
local start = 1
for i = 1, n do
  if tenants[i] > last then start = i; break end
end
for k = 0, n - 1 do
  local t = tenants[((start - 1 + k) % n) + 1]
  local stream = ARGV[3] .. t .. ARGV[4]
  local ok, reply = pcall(redis.call, 'XREADGROUP', 'GROUP', ARGV[1], ARGV[2], 'COUNT', 1, 'STREAMS', stream, '>')
  if not ok then
    redis.pcall('XGROUP', 'CREATE', stream, ARGV[1], '0', 'MKSTREAM')
    reply = false
  end
  if reply and reply[1] and #reply[1][2] > 0 then
    redis.call('SET', KEYS[2], t)
    local entry = reply[1][2][1]
    return {t, entry[1], entry[2]}
  end
end
return false
"""

# Reset the idle time of a pending entry (the worker is alive); 0 if the entry is no longer pending.
_TOUCH_SCRIPT = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 then return 0 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""


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


class RedisJobQueue(JobQueue):
    """Redis Streams carry deliveries, one stream per tenant (`{p}:t:{tenant}:queue`, group
    `workers`): XADD to enqueue, a script that reads the next entry round-robin across tenants to
    receive (then a claim on the record), XACK+XDEL once the outcome is recorded, XAUTOCLAIM to take
    over a silent worker's pending delivery. Durable with append-only files."""

    POLL_S = 0.1  # a waiting claim polls (Lua cannot block)

    def __init__(self, store: RedisStore, stale_s: float = 120.0, max_claims: int = 3) -> None:
        super().__init__(store, stale_s, max_claims)
        self._r = store.client
        self.keys = store.keys
        self.group = RedisKeys.QUEUE_GROUP
        self._next = self._r.register_script(_NEXT_SCRIPT)
        self._touch = self._r.register_script(_TOUCH_SCRIPT)
        self._ready: set[str] = set()

    def _stream(self, tenant: str) -> str:
        return self.keys.tenant_queue(tenant)

    def _ensure_group(self, tenant: str, force: bool = False) -> str:
        stream = self._stream(tenant)
        if stream in self._ready and not force:
            return stream
        try:
            self._r.xgroup_create(stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._r.sadd(self.keys.queue_tenants(), tenant)
        self._ready.add(stream)
        return stream

    def _tenants(self) -> list[str]:
        return sorted(t.decode() if isinstance(t, bytes) else t for t in self._r.smembers(self.keys.queue_tenants()))

    @translated
    def submit(self, job: JobRecord) -> JobRecord:
        """The record and its delivery in one MULTI/EXEC: never a queued job nothing will deliver."""
        store: RedisStore = self.store  # type: ignore[assignment]
        k = store.keys
        key, fence = k.job(job.tenant, job.job_id), k.fence(job.tenant, validate_id(job.task_id))
        stream = self._ensure_group(job.tenant)

        def body(pipe: redis.client.Pipeline) -> JobRecord:
            pipe.watch(key, fence)
            if pipe.exists(key):
                raise StoreConflict(f"job {job.job_id!r} already exists")
            new = replace(job, fence=int(pipe.get(fence) or 0))
            pipe.multi()
            pipe.set(key, new.to_json())
            pipe.zadd(k.jobs(job.tenant), {job.job_id: job.created_at})
            pipe.sadd(k.tenants(), job.tenant)
            pipe.xadd(stream, {"tenant": job.tenant, "job_id": job.job_id})
            pipe.execute()
            return new

        return store._optimistic(body)

    @translated
    def enqueue(self, tenant: str, job_id: str) -> str:
        fields = {"tenant": validate_id(tenant, "tenant"), "job_id": validate_id(job_id, "job id")}
        return self._r.xadd(self._ensure_group(tenant), fields).decode()

    @translated
    def claim(self, worker: str, timeout_s: float) -> Claim | None:
        validate_id(worker, "worker")
        deadline = time.monotonic() + max(0.0, timeout_s)
        prefix, suffix = f"{self.keys.prefix}:t:", ":queue"  # tenant_queue(t) == prefix + t + suffix
        while True:
            reply = self._next(keys=[self.keys.queue_tenants(), self.keys.queue_cursor()],
                               args=[self.group, worker, prefix, suffix])
            if reply:
                tenant, mid, flat = reply
                fields = dict(zip(flat[::2], flat[1::2]))
                claim = self._claim_entry(tenant.decode(), mid, fields, worker, self.stale_s, recovering=False)
                if claim is not None:
                    return claim
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            time.sleep(min(self.POLL_S, remaining))

    def _drop(self, tenant: str, mid: bytes | str) -> None:
        stream = self._stream(tenant)
        self._r.xack(stream, self.group, mid)
        self._r.xdel(stream, mid)

    def _claim_entry(self, stream_tenant: str, mid: bytes, fields: dict, worker: str, stale_s: float,
                     recovering: bool) -> Claim | None:
        """Turn a delivery into a claim on the record; drop deliveries of jobs that cannot run (a
        recovered delivery of a job whose worker is alive after all stays: that worker acks it)."""
        text = {k.decode(): v.decode() for k, v in fields.items()}
        try:
            tenant, job_id = validate_id(text["tenant"], "tenant"), validate_id(text["job_id"], "job id")
            if tenant != stream_tenant:
                raise ValueError("entry names another tenant")
        except (KeyError, ValueError):
            log.warning("dropping a malformed queue entry %r: %r", mid, fields)
            self._drop(stream_tenant, mid)
            return None
        try:
            job = self.store.claim_job(tenant, job_id, worker, stale_s, delivery=mid.decode())
        except JobNotFound:
            self._drop(tenant, mid)
            return None
        except StoreConflict as e:  # finished, cancelled, or running under a live worker
            log.info("queue entry %s for job %s not claimed: %s", mid.decode(), job_id, e)
            if not (recovering and not isinstance(e, JobFinished)):
                self._drop(tenant, mid)
            return None
        return Claim.of(job, mid.decode())

    @translated
    def ack(self, claim: Claim) -> bool:
        stream = self._stream(claim.tenant)
        with self._r.pipeline(transaction=True) as pipe:
            pipe.xack(stream, self.group, claim.message_id)
            pipe.xdel(stream, claim.message_id)
            acked, _ = pipe.execute()
        return bool(acked)

    @translated
    def heartbeat(self, claim: Claim, progress: dict[str, Any] | None = None) -> JobRecord:
        job = super().heartbeat(claim, progress)
        self._touch(keys=[self._stream(claim.tenant)], args=[self.group, claim.message_id, claim.worker])
        return job

    @translated
    def recover_stale(self, idle_ms: int, worker: str, count: int = 1) -> list[Claim]:
        validate_id(worker, "worker")
        out: list[Claim] = []
        for tenant in self._tenants():
            stream = self._ensure_group(tenant)
            cursor: bytes | str = "0-0"
            while len(out) < count:
                cursor, messages, *_ = self._r.xautoclaim(stream, self.group, worker,
                                                          min_idle_time=max(0, int(idle_ms)), start_id=cursor,
                                                          count=count - len(out))
                for mid, fields in messages:
                    if not fields:  # deleted meanwhile
                        self._drop(tenant, mid)
                        continue
                    claim = self._claim_entry(tenant, mid, fields, worker, idle_ms / 1000, recovering=True)
                    if claim is not None:
                        out.append(claim)
                if cursor in (b"0-0", "0-0"):
                    break
        return out

    @translated
    def requeue(self, claim: Claim) -> JobRecord:
        job = self.store.finish_job(claim.tenant, claim.job_id, claim.token, "queued")
        self.enqueue(claim.tenant, claim.job_id)
        self.ack(claim)
        return job

    @translated
    def _covered(self, job: JobRecord) -> bool:
        if not job.delivery:
            return False
        info = self._r.xpending_range(self._ensure_group(job.tenant), self.group, min=job.delivery,
                                      max=job.delivery, count=1)
        return bool(info)

    def _before_reap(self, job: JobRecord) -> None:
        if job.claim_token < self.max_claims:
            self.enqueue(job.tenant, job.job_id)

    @translated
    def stats(self) -> dict[str, int]:
        waiting = claimed = 0
        for tenant in self._tenants():
            stream = self._ensure_group(tenant)
            with self._r.pipeline(transaction=True) as pipe:
                pipe.xlen(stream)
                pipe.xpending(stream, self.group)
                length, pending = pipe.execute()
            pending_n = int(pending["pending"]) if isinstance(pending, dict) else int(pending[0])
            waiting, claimed = waiting + max(0, int(length) - pending_n), claimed + pending_n
        return {"waiting": waiting, "claimed": claimed}
