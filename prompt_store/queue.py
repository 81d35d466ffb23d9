"""The durable job queue the server's job runner pulls training jobs from, plus cancellation.

Semantics (both implementations): FIFO, at-least-once. `claim` hands one job to a worker, which
`heartbeat`s while it works and `ack`s when the job reached a terminal state. A job claimed by a
worker that died (no heartbeat for `idle_ms`) is handed to another by `recover_stale`; its
`Claim.deliveries` then counts deliveries, so a job that kills every worker can be failed.

The queue carries only (tenant, job_id): the job record in the store stays the truth. A runner
moves a claimed job to `running` with `store.update_job(..., expect_states=...)`, so a job that was
cancelled while queued, or that two queues hold, runs at most once at a time. Cancellation lives on
the record (`request_cancel`): a queued job becomes `cancelled` at once, a running one gets
`cancel_requested=True`, which its worker polls.
"""
from __future__ import annotations

import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import redis

from prompt_store.base import Store
from prompt_store.errors import StoreConflict
from prompt_store.ids import RedisKeys, validate_id
from prompt_store.records import JobRecord
from prompt_store.redis_store import RedisStore, translated

log = logging.getLogger(__name__)

# Refresh the idle time of a pending entry only if `worker` still owns it (1 ok, 0 gone, -1 stolen).
_HEARTBEAT_SCRIPT = """
local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if #p == 0 then return 0 end
if p[1][2] ~= ARGV[3] then return -1 end
redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, ARGV[2], 'JUSTID')
return 1
"""


@dataclass(frozen=True)
class Claim:
    """One delivery of a job to a worker."""

    tenant: str
    job_id: str
    worker: str
    message_id: str
    deliveries: int = 1


class JobQueue(ABC):
    """Queue of (tenant, job_id) with claims, heartbeats, recovery and per-task training locks."""

    def __init__(self, store: Store) -> None:
        self.store = store

    @abstractmethod
    def enqueue(self, tenant: str, job_id: str) -> str:
        """Append a job; returns the message id."""

    @abstractmethod
    def claim(self, worker: str, timeout_s: float) -> Claim | None:
        """The next job for `worker`, waiting up to `timeout_s`; None if none came."""

    @abstractmethod
    def ack(self, claim: Claim) -> bool:
        """The job is done (whatever its outcome): drop it. False if it was no longer pending."""

    @abstractmethod
    def heartbeat(self, claim: Claim) -> None:
        """`claim.worker` is still alive and working; StoreConflict if the claim was lost."""

    @abstractmethod
    def recover_stale(self, idle_ms: int, worker: str, count: int = 1) -> list[Claim]:
        """Hand up to `count` jobs whose worker sent no heartbeat for `idle_ms` to `worker`."""

    @abstractmethod
    def stats(self) -> dict[str, int]:
        """`waiting` (not yet claimed) and `claimed` (claimed, not acked) counts."""

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


def request_cancel(store: Store, tenant: str, job_id: str) -> JobRecord:
    """Cancel a job: a queued one becomes `cancelled` now, a running one gets `cancel_requested`.

    Raises JobFinished (a StoreConflict) if the job is already terminal, JobNotFound if unknown.
    """
    for _ in range(5):
        job = store.get_job(tenant, job_id)
        try:
            if job.state == "queued":
                return store.update_job(tenant, job_id, expect_states={"queued"}, state="cancelled",
                                        cancel_requested=True)
            return store.update_job(tenant, job_id, expect_states={"running"}, cancel_requested=True)
        except StoreConflict:
            if store.get_job(tenant, job_id).terminal:
                raise
    raise StoreConflict(f"job {job_id!r} keeps changing state; try again")


@dataclass
class _Pending:
    claim: Claim
    last_seen: float


class LocalJobQueue(JobQueue):
    """In-process queue (embedded mode). On construction it re-enqueues the store's `queued` jobs,
    oldest first, so queued jobs survive a restart; the store's records are the durable part."""

    def __init__(self, store: Store, requeue: bool = True) -> None:
        super().__init__(store)
        self._cond = threading.Condition()
        self._waiting: deque[Claim] = deque()  # worker "" until claimed
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count(1)
        self._closed = False
        if requeue:
            for job in store.list_all_jobs({"queued"}):
                self.enqueue(job.tenant, job.job_id)

    def enqueue(self, tenant: str, job_id: str) -> str:
        validate_id(tenant, "tenant")
        validate_id(job_id, "job id")
        with self._cond:
            for entry in [*self._waiting, *(p.claim for p in self._pending.values())]:
                if (entry.tenant, entry.job_id) == (tenant, job_id):
                    return entry.message_id  # already queued: enqueue is idempotent here
            message_id = str(next(self._ids))
            self._waiting.append(Claim(tenant, job_id, "", message_id, 0))
            self._cond.notify()
        return message_id

    def claim(self, worker: str, timeout_s: float) -> Claim | None:
        validate_id(worker, "worker")
        with self._cond:
            if not self._cond.wait_for(lambda: self._waiting or self._closed, timeout=max(0.0, timeout_s)):
                return None
            if self._closed:
                return None
            entry = self._waiting.popleft()
            claim = replace(entry, worker=worker, deliveries=entry.deliveries + 1)
            self._pending[claim.message_id] = _Pending(claim, time.monotonic())
        return claim

    def ack(self, claim: Claim) -> bool:
        with self._cond:
            return self._pending.pop(claim.message_id, None) is not None

    def heartbeat(self, claim: Claim) -> None:
        with self._cond:
            pending = self._pending.get(claim.message_id)
            if pending is None or pending.claim.worker != claim.worker:
                raise StoreConflict(f"worker {claim.worker!r} no longer holds job {claim.job_id!r}")
            pending.last_seen = time.monotonic()

    def recover_stale(self, idle_ms: int, worker: str, count: int = 1) -> list[Claim]:
        validate_id(worker, "worker")
        now = time.monotonic()
        out = []
        with self._cond:
            for pending in list(self._pending.values()):
                if len(out) >= count:
                    break
                if (now - pending.last_seen) * 1000 >= idle_ms:
                    old = pending.claim
                    pending.claim = replace(old, worker=worker, deliveries=old.deliveries + 1)
                    pending.last_seen = now
                    out.append(pending.claim)
        return out

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"waiting": len(self._waiting), "claimed": len(self._pending)}

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


def _entries(response: Any) -> list[tuple[bytes, dict]]:
    """(id, fields) pairs from an XREADGROUP reply, RESP2 (list) or RESP3 (dict) shaped."""
    streams = response.items() if isinstance(response, dict) else (response or [])
    out = []
    for item in streams:
        _, messages = item
        out += [(mid, fields) for mid, fields in messages if fields]
    return out


class RedisJobQueue(JobQueue):
    """Redis Streams with one consumer group: XADD to enqueue, XREADGROUP to claim, XACK+XDEL to
    ack, XAUTOCLAIM to take over a dead worker's pending entry. Durable with append-only files."""

    def __init__(self, store: RedisStore, block_ms: int = 1000) -> None:
        super().__init__(store)
        self._r = store.client
        self.stream = store.keys.queue()
        self.group = RedisKeys.QUEUE_GROUP
        # Each XREADGROUP blocks at most this, well under the socket timeout, and claim() loops.
        self._block_ms = max(1, min(block_ms, int(store.socket_timeout * 500)))
        self._heartbeat = self._r.register_script(_HEARTBEAT_SCRIPT)
        self._group_ready = False

    def _ensure_group(self, force: bool = False) -> None:
        if self._group_ready and not force:
            return
        try:
            self._r.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    def _with_group(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Call `fn`, recreating the stream and group once if they vanished (e.g. data loss)."""
        self._ensure_group()
        try:
            return fn(*args, **kwargs)
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self._ensure_group(force=True)
            return fn(*args, **kwargs)

    @translated
    def enqueue(self, tenant: str, job_id: str) -> str:
        fields = {"tenant": validate_id(tenant, "tenant"), "job_id": validate_id(job_id, "job id")}
        self._ensure_group()
        return self._r.xadd(self.stream, fields).decode()

    @translated
    def claim(self, worker: str, timeout_s: float) -> Claim | None:
        validate_id(worker, "worker")
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            block = max(1, min(self._block_ms, remaining_ms))
            reply = self._with_group(self._r.xreadgroup, self.group, worker, {self.stream: ">"}, count=1, block=block)
            for mid, fields in _entries(reply):
                claim = self._parse(mid, fields, worker)
                if claim is not None:
                    return claim
            if time.monotonic() >= deadline:
                return None

    def _parse(self, mid: bytes, fields: dict, worker: str, deliveries: int = 1) -> Claim | None:
        text = {k.decode(): v.decode() for k, v in fields.items()}
        try:
            return Claim(validate_id(text["tenant"], "tenant"), validate_id(text["job_id"], "job id"), worker,
                         mid.decode(), deliveries)
        except (KeyError, ValueError):
            log.warning("dropping a malformed queue entry %r: %r", mid, fields)
            self._r.xack(self.stream, self.group, mid)
            self._r.xdel(self.stream, mid)
            return None

    @translated
    def ack(self, claim: Claim) -> bool:
        with self._r.pipeline(transaction=True) as pipe:
            pipe.xack(self.stream, self.group, claim.message_id)
            pipe.xdel(self.stream, claim.message_id)
            acked, _ = pipe.execute()
        return bool(acked)

    @translated
    def heartbeat(self, claim: Claim) -> None:
        result = self._heartbeat(keys=[self.stream], args=[self.group, claim.message_id, claim.worker])
        if result != 1:
            raise StoreConflict(f"worker {claim.worker!r} no longer holds job {claim.job_id!r}")

    @translated
    def recover_stale(self, idle_ms: int, worker: str, count: int = 1) -> list[Claim]:
        validate_id(worker, "worker")
        out: list[Claim] = []
        cursor: bytes | str = "0-0"
        while len(out) < count:
            cursor, messages, *_ = self._with_group(self._r.xautoclaim, self.stream, self.group, worker,
                                                    min_idle_time=max(0, int(idle_ms)), start_id=cursor,
                                                    count=count - len(out))
            for mid, fields in messages:
                info = self._r.xpending_range(self.stream, self.group, min=mid, max=mid, count=1)
                deliveries = info[0]["times_delivered"] if info else 2
                claim = self._parse(mid, fields or {}, worker, deliveries) if fields else None
                if claim is not None:
                    out.append(claim)
            if cursor in (b"0-0", "0-0"):
                break
        return out

    @translated
    def stats(self) -> dict[str, int]:
        self._ensure_group()
        with self._r.pipeline(transaction=True) as pipe:
            pipe.xlen(self.stream)
            pipe.xpending(self.stream, self.group)
            length, pending = pipe.execute()
        claimed = int(pending["pending"]) if isinstance(pending, dict) else int(pending[0])
        return {"waiting": max(0, int(length) - claimed), "claimed": claimed}
