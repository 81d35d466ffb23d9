"""The Redis store: shared by every server and worker of a deployment.

Keys (all under `{prefix}:`, tenant data under `{prefix}:t:{tenant}:`; see ids.RedisKeys and
docs/store.md). A version is one immutable hash `{record, blob}`. A put reads the counter under
WATCH and, in one MULTI/EXEC, writes the version, bumps the counter, flips `head.current` and
PUBLISHes the change event: a reader resolves `current` and then reads an immutable hash, so it
sees the old version or the new one, never half. Every redis error becomes StoreUnavailable.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import ParamSpec, TypeVar

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError
from redis.retry import Retry

from prompt_store.base import Store, check_put, new_version, verify_blob
from prompt_store.errors import (
    RecordCorrupt,
    StoreConflict,
    StoreUnavailable,
    TaskNotFound,
    VersionNotFound,
)
from prompt_store.events import EventHub, Subscription
from prompt_store.ids import RedisKeys, validate_id, validate_version
from prompt_store.records import ChangeEvent, TaskInfo, TaskVersion
from prompt_store.redis_jobs import RedisJobsMixin, translated

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")
WATCH_RETRIES = 100  # optimistic transactions retried on concurrent change; contention is per task/job

_LOCK_SCRIPT = """
local h = redis.call('GET', KEYS[1])
if (not h) or h == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""
_UNLOCK_SCRIPT = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def _version_record(raw: bytes | None) -> TaskVersion:
    if raw is None:
        raise RecordCorrupt("version hash has no record")
    try:
        return TaskVersion.from_dict(json.loads(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise RecordCorrupt(f"version record is not JSON: {exc}") from exc


def _client(url: str, socket_timeout: float, connect_timeout: float, retry: Retry) -> redis.Redis:
    return redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout,
                                socket_keepalive=True, retry=retry,
                                retry_on_error=[RedisConnectionError, RedisTimeoutError],
                                health_check_interval=15)


class RedisStore(RedisJobsMixin, Store):
    """The Redis backend (redis-py sync client; thread-safe through its connection pool)."""

    def __init__(self, url: str, prefix: str = "vpt", socket_timeout: float = 5.0, connect_timeout: float = 2.0,
                 retries: int = 3) -> None:
        self.url = url
        self.keys = RedisKeys(prefix)
        self.socket_timeout = socket_timeout
        try:
            self.client = _client(url, socket_timeout, connect_timeout,
                                  Retry(ExponentialBackoff(cap=0.5, base=0.05), retries))
            # The listener gets no silent retries: it must see each disconnect to announce a resync.
            self._sub_client = _client(url, socket_timeout, connect_timeout, Retry(NoBackoff(), 0))
        except ValueError as exc:
            raise StoreUnavailable(f"invalid redis url: {exc}") from exc
        self._lock_script = self.client.register_script(_LOCK_SCRIPT)
        self._unlock_script = self.client.register_script(_UNLOCK_SCRIPT)
        self._hub = EventHub("redis-store-events")
        self._stop = threading.Event()
        self._listening = threading.Event()
        self._listener: threading.Thread | None = None
        self._listener_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self.keys.prefix!r})"

    def _optimistic(self, body: Callable[[redis.client.Pipeline], R]) -> R:
        """Run `body(pipe)` (WATCH, reads, MULTI, writes) until EXEC succeeds."""
        for _ in range(WATCH_RETRIES):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    return body(pipe)
                except WatchError:
                    continue
        raise StoreConflict("too many concurrent writers; try again")

    # ---- tasks
    @translated
    def put_task(self, tenant: str, task_id: str, blob: bytes, metadata: Mapping[str, str]) -> TaskVersion:
        meta = check_put(tenant, task_id, blob, metadata)
        blob = bytes(blob)
        draft = new_version(tenant, task_id, 1, blob, meta)  # hashed once, numbered under WATCH
        counter, head = self.keys.counter(tenant, task_id), self.keys.head(tenant, task_id)

        def body(pipe: redis.client.Pipeline) -> TaskVersion:
            pipe.watch(counter, head)
            record = self._queue_put(pipe, draft, blob)
            pipe.execute()
            return record

        return self._optimistic(body)

    def _queue_put(self, pipe: redis.client.Pipeline, draft: TaskVersion, blob: bytes) -> TaskVersion:
        """Read the counter and head (WATCHed by the caller), then MULTI and queue the put's writes."""
        k, tenant, task_id = self.keys, draft.tenant, draft.task_id
        counter, head = k.counter(tenant, task_id), k.head(tenant, task_id)
        n = int(pipe.get(counter) or 0) + 1
        created_at = _s(pipe.hget(head, "created_at"))
        record = dataclasses.replace(draft, version=n, created_at=time.time())
        pipe.multi()
        pipe.set(counter, n)
        pipe.hset(k.version(tenant, task_id, n), mapping={"record": json.dumps(record.to_dict()), "blob": blob})
        pipe.zadd(k.versions(tenant, task_id), {str(n): n})
        pipe.hset(head, mapping={"current": n, "created_at": created_at or record.created_at,
                                 "updated_at": record.created_at})
        pipe.sadd(k.tasks(tenant), task_id)
        pipe.sadd(k.tenants(), tenant)
        pipe.publish(k.events(), ChangeEvent(tenant, task_id, n, "put").to_json())
        return record

    def _read_version(self, tenant: str, task_id: str, n: int) -> tuple[TaskVersion, bytes] | None:
        raw, blob = self.client.hmget(self.keys.version(tenant, task_id, n), ["record", "blob"])
        if raw is None or blob is None:
            return None
        record = _version_record(raw)
        verify_blob(record, blob)
        return record, blob

    @translated
    def get_task(self, tenant: str, task_id: str, version: int | None = None) -> tuple[TaskVersion, bytes]:
        if version is not None:
            found = self._read_version(tenant, task_id, validate_version(version))
            if found is None:
                self.current_version(tenant, task_id)  # TaskNotFound when the task is gone
                raise VersionNotFound(f"task {task_id!r} has no version {version}")
            return found
        for _ in range(3):  # a delete + re-create between the two reads moves `current`: read again
            found = self._read_version(tenant, task_id, self.current_version(tenant, task_id))
            if found is not None:
                return found
        raise TaskNotFound(f"task {task_id!r} not found")

    @translated
    def current_version(self, tenant: str, task_id: str) -> int:
        current = self.client.hget(self.keys.head(tenant, task_id), "current")
        if current is None:
            raise TaskNotFound(f"task {task_id!r} not found")
        return int(current)

    def _infos(self, tenant: str, task_ids: list[str]) -> list[TaskInfo]:
        k = self.keys
        with self.client.pipeline(transaction=True) as pipe:  # one consistent snapshot of all heads
            for task_id in task_ids:
                pipe.hgetall(k.head(tenant, task_id))
                pipe.zcard(k.versions(tenant, task_id))
            raw = pipe.execute()
        heads = [(t, {_s(a): _s(b) for a, b in h.items()}, c) for t, h, c in zip(task_ids, raw[::2], raw[1::2])]
        heads = [(t, h, c) for t, h, c in heads if h.get("current")]
        with self.client.pipeline(transaction=False) as pipe:  # versions are immutable: no snapshot needed
            for task_id, head, _ in heads:
                pipe.hget(k.version(tenant, task_id, int(head["current"])), "record")
            records = pipe.execute()
        return [TaskInfo(tenant=tenant, task_id=t, current_version=int(h["current"]), num_versions=c,
                         created_at=float(h["created_at"]), updated_at=float(h["updated_at"]),
                         current=_version_record(r)) for (t, h, c), r in zip(heads, records) if r is not None]

    @translated
    def get_info(self, tenant: str, task_id: str) -> TaskInfo:
        validate_id(tenant, "tenant")
        infos = self._infos(tenant, [validate_id(task_id)])
        if not infos:
            raise TaskNotFound(f"task {task_id!r} not found")
        return infos[0]

    @translated
    def list_tasks(self, tenant: str) -> list[TaskInfo]:
        task_ids = sorted(_s(t) for t in self.client.smembers(self.keys.tasks(tenant)))
        return self._infos(tenant, task_ids)

    @translated
    def list_task_ids(self, tenant: str) -> list[str]:
        validate_id(tenant, "tenant")
        return sorted(_s(t) for t in self.client.smembers(self.keys.tasks(tenant)))

    @translated
    def list_tenants(self) -> list[str]:
        return sorted(_s(t) for t in self.client.smembers(self.keys.tenants()))

    @translated
    def list_versions(self, tenant: str, task_id: str) -> list[TaskVersion]:
        k = self.keys
        with self.client.pipeline(transaction=True) as pipe:
            pipe.exists(k.head(tenant, task_id))
            pipe.zrange(k.versions(tenant, task_id), 0, -1)
            exists, numbers = pipe.execute()
        if not exists:
            raise TaskNotFound(f"task {task_id!r} not found")
        with self.client.pipeline(transaction=False) as pipe:
            for n in numbers:
                pipe.hget(k.version(tenant, task_id, int(n)), "record")
            records = pipe.execute()
        return sorted((_version_record(r) for r in records if r is not None), key=lambda v: v.version)

    @translated
    def activate(self, tenant: str, task_id: str, version: int) -> TaskVersion:
        k = self.keys
        head, vkey = k.head(tenant, task_id), k.version(tenant, task_id, validate_version(version))

        def body(pipe: redis.client.Pipeline) -> TaskVersion:
            pipe.watch(head, vkey)
            if not pipe.exists(head):
                raise TaskNotFound(f"task {task_id!r} not found")
            raw = pipe.hget(vkey, "record")
            if raw is None:
                raise VersionNotFound(f"task {task_id!r} has no version {version}")
            pipe.multi()
            pipe.hset(head, mapping={"current": version, "updated_at": time.time()})
            pipe.publish(k.events(), ChangeEvent(tenant, task_id, version, "activate").to_json())
            pipe.execute()
            return _version_record(raw)

        return self._optimistic(body)

    @translated
    def delete_task(self, tenant: str, task_id: str) -> None:
        k = self.keys
        head, versions = k.head(tenant, task_id), k.versions(tenant, task_id)

        def body(pipe: redis.client.Pipeline) -> None:
            pipe.watch(head, versions)
            if not pipe.exists(head):
                raise TaskNotFound(f"task {task_id!r} not found")
            numbers = [int(n) for n in pipe.zrange(versions, 0, -1)]
            pipe.multi()
            pipe.incr(k.fence(tenant, task_id))  # in-flight jobs of this task can no longer publish
            pipe.delete(head, versions, *(k.version(tenant, task_id, n) for n in numbers))
            pipe.srem(k.tasks(tenant), task_id)  # the counter stays: numbers never repeat
            pipe.publish(k.events(), ChangeEvent(tenant, task_id, None, "delete").to_json())
            pipe.execute()

        self._optimistic(body)

    # ---- training locks: SET PX owned by a holder, compared-and-set in Lua
    @translated
    def try_lock_task(self, tenant: str, task_id: str, holder: str, ttl_s: float) -> bool:
        validate_id(holder, "lock holder")
        ttl_ms = max(1, int(ttl_s * 1000))
        return bool(self._lock_script(keys=[self.keys.train_lock(tenant, task_id)], args=[holder, ttl_ms]))

    @translated
    def release_task_lock(self, tenant: str, task_id: str, holder: str) -> bool:
        return bool(self._unlock_script(keys=[self.keys.train_lock(tenant, task_id)], args=[holder]))

    @translated
    def task_lock_holder(self, tenant: str, task_id: str) -> str | None:
        return _s(self.client.get(self.keys.train_lock(tenant, task_id)))

    # ---- events
    def subscribe(self, callback: Callable[[ChangeEvent], None]) -> Subscription:
        sub = self._hub.subscribe(callback)
        with self._listener_lock:
            if self._listener is None:
                self._listener = threading.Thread(target=self._listen, name="redis-store-listener", daemon=True)
                self._listener.start()
        self._listening.wait(timeout=2.0)  # so a publish right after subscribe is not missed
        return sub

    def _listen(self) -> None:
        """Follow the events channel; on any error reconnect with backoff, resubscribe, announce a resync."""
        backoff, connected_before = 0.05, False
        while not self._stop.is_set():
            pubsub = self._sub_client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(self.keys.events())
                if connected_before:
                    self._hub.emit(ChangeEvent.resync())  # events published while we were away are lost
                connected_before, backoff = True, 0.05
                self._listening.set()
                while not self._stop.is_set():
                    message = pubsub.get_message(timeout=0.2)
                    if message is not None and message.get("type") == "message":
                        self._on_message(message["data"])
            except (redis.RedisError, OSError) as exc:
                self._listening.clear()
                log.warning("redis event listener disconnected (%s); reconnecting in %.2fs", exc, backoff)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                try:
                    pubsub.close()
                except (redis.RedisError, OSError):
                    pass

    def _on_message(self, data: bytes) -> None:
        try:
            event = ChangeEvent.from_dict(json.loads(data))
        except (ValueError, RecordCorrupt):
            log.warning("ignoring an unreadable change event: %r", data[:200])
            return
        self._hub.emit(event)

    # ---- lifecycle
    @translated
    def ping(self) -> None:
        self.client.ping()

    def close(self) -> None:
        self._stop.set()
        if self._listener is not None and self._listener is not threading.current_thread():
            self._listener.join(timeout=5)
        self._hub.close()
        for client in (self.client, self._sub_client):
            try:
                client.close()
            except (redis.RedisError, OSError):
                pass
