"""The Redis job queue: one delivery stream per tenant, read round-robin, claims on the records.

See prompt_store.queue for the semantics both queues share and docs/store.md for the keys.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import redis

from prompt_store import claims
from prompt_store.errors import JobFinished, JobNotFound, StoreConflict
from prompt_store.ids import RedisKeys, validate_id
from prompt_store.queue import Claim, JobQueue
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



class RedisJobQueue(JobQueue):
    """Redis Streams carry deliveries, one stream per tenant (`{p}:t:{tenant}:queue`, group
    `workers`): XADD to enqueue, a script that reads the next entry round-robin across tenants to
    receive (then a claim on the record), XACK+XDEL once the outcome is recorded, XAUTOCLAIM to take
    over a silent worker's pending delivery. Durable with append-only files."""

    WAIT_S = 1.0  # longest block on the wake-up list before the streams are read again
    WAKE_MAX = 64  # wake-up tokens kept; more would only wake idle workers for nothing

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
            self._wake(pipe)
            pipe.execute()
            return new

        return store._optimistic(body)

    @translated
    def enqueue(self, tenant: str, job_id: str) -> str:
        fields = {"tenant": validate_id(tenant, "tenant"), "job_id": validate_id(job_id, "job id")}
        pipe = self._r.pipeline(transaction=True)
        pipe.xadd(self._ensure_group(tenant), fields)
        self._wake(pipe)
        return pipe.execute()[0].decode()

    def _wake(self, pipe: redis.client.Pipeline) -> None:
        """Queue a wake-up token (in the caller's transaction): one idle worker blocked in `claim` reads the
        streams at once instead of at its next timeout. Tokens are hints; the streams are the truth."""
        pipe.lpush(self.keys.queue_wake(), "1")
        pipe.ltrim(self.keys.queue_wake(), 0, self.WAKE_MAX - 1)

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
            # Block until a submit/enqueue/requeue pushes a token, or at most WAIT_S (deliveries that need
            # no token, e.g. a stale one another worker may take over, are found on the next pass).
            self._r.blpop([self.keys.queue_wake()], timeout=max(0.01, min(self.WAIT_S, remaining)))

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
        """The record back to `queued`, a new delivery, and the old one acknowledged: one MULTI/EXEC."""
        store: RedisStore = self.store  # type: ignore[assignment]
        key, stream = store.keys.job(claim.tenant, claim.job_id), self._ensure_group(claim.tenant)

        def body(pipe: redis.client.Pipeline) -> JobRecord:
            pipe.watch(key)
            raw = pipe.get(key)
            if raw is None:
                raise JobNotFound(f"job {claim.job_id!r} not found")
            job = claims.outcome_update(JobRecord.from_json(raw), claim.token, "queued", {})
            pipe.multi()
            pipe.set(key, job.to_json())
            pipe.xadd(stream, {"tenant": claim.tenant, "job_id": claim.job_id})
            pipe.xack(stream, self.group, claim.message_id)
            pipe.xdel(stream, claim.message_id)
            self._wake(pipe)
            pipe.execute()
            return job

        return store._optimistic(body)

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
