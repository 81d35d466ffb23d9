"""The Redis store's job records, claims and fenced publish (a mixin of RedisStore).

A job is one JSON string, indexed per tenant by a sorted set scored by `created_at`. Every change is
an optimistic transaction (WATCH the job key, read, MULTI/EXEC); a publish also WATCHes the task's
counter, head and delete counter, so the new version and the job's success land in one EXEC that
fails if anything it read changed (see prompt_store.claims for the rules).
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, ParamSpec, TypeVar

import redis

from prompt_store import claims
from prompt_store.base import check_put, new_version
from prompt_store.errors import JobNotFound, StoreConflict, StoreUnavailable, TaskFenced
from prompt_store.ids import validate_id
from prompt_store.records import JobRecord, TaskVersion, apply_job_update

P = ParamSpec("P")
R = TypeVar("R")


def _s(value: bytes | str | None) -> str | None:
    return value.decode() if isinstance(value, bytes) else value


def translated(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn any redis error escaping `fn` into StoreUnavailable, chained."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as exc:
            raise StoreUnavailable(f"redis unavailable: {type(exc).__name__}: {exc}") from exc

    return wrapper


class RedisJobsMixin:
    """Job methods of RedisStore; relies on its `client`, `keys`, `_optimistic` and `_queue_put`."""

    @translated
    def create_job(self, job: JobRecord) -> JobRecord:
        validate_id(job.task_id)
        key, fence = self.keys.job(job.tenant, job.job_id), self.keys.fence(job.tenant, job.task_id)

        def body(pipe: redis.client.Pipeline) -> JobRecord:
            nonlocal job
            pipe.watch(key, fence)
            if pipe.exists(key):
                raise StoreConflict(f"job {job.job_id!r} already exists")
            job = dataclasses.replace(job, fence=int(pipe.get(fence) or 0))
            pipe.multi()
            pipe.set(key, job.to_json())
            pipe.zadd(self.keys.jobs(job.tenant), {job.job_id: job.created_at})
            pipe.sadd(self.keys.tenants(), job.tenant)
            pipe.execute()
            return job

        return self._optimistic(body)

    def update_job(self, tenant: str, job_id: str, *, expect_states: Iterable[str] | None = None,
                   **fields: Any) -> JobRecord:
        return self.modify_job(tenant, job_id, lambda j: apply_job_update(j, fields, expect_states))

    @translated
    def modify_job(self, tenant: str, job_id: str, change: Callable[[JobRecord], JobRecord | None]) -> JobRecord:
        key = self.keys.job(tenant, job_id)

        def body(pipe: redis.client.Pipeline) -> JobRecord:
            pipe.watch(key)
            raw = pipe.get(key)
            if raw is None:
                raise JobNotFound(f"job {job_id!r} not found")
            job = JobRecord.from_json(raw)
            new = change(job)
            if new is None:
                return job
            pipe.multi()
            pipe.set(key, new.to_json())
            pipe.execute()
            return new

        return self._optimistic(body)

    @translated
    def task_fence(self, tenant: str, task_id: str) -> int:
        return int(self.client.get(self.keys.fence(tenant, task_id)) or 0)

    @translated
    def publish_job(self, tenant: str, job_id: str, token: int, blob: bytes, metadata: Mapping[str, str],
                    **fields: Any) -> tuple[JobRecord, TaskVersion]:
        key = self.keys.job(tenant, job_id)
        job = self.get_job(tenant, job_id)
        meta = check_put(tenant, job.task_id, blob, metadata)
        draft = new_version(tenant, job.task_id, 1, bytes(blob), meta)
        k = self.keys

        def body(pipe: redis.client.Pipeline) -> tuple[JobRecord, TaskVersion]:
            pipe.watch(key, k.fence(tenant, job.task_id), k.counter(tenant, job.task_id), k.head(tenant, job.task_id))
            raw = pipe.get(key)
            if raw is None:
                raise JobNotFound(f"job {job_id!r} not found")
            current = JobRecord.from_json(raw)
            if current.state == "succeeded" and current.claim_token == token and current.version is not None:
                pipe.reset()
                return current, self.get_task(tenant, job.task_id, current.version)[0]  # a retried publish
            claims.check_token(current, token)
            if int(pipe.get(k.fence(tenant, job.task_id)) or 0) != current.fence:
                raise TaskFenced(f"task {job.task_id!r} was deleted after job {job_id} was created")
            record = self._queue_put(pipe, draft, bytes(blob))
            done = claims.outcome_update(current, token, "succeeded", {**fields, "version": record.version})
            pipe.set(key, done.to_json())
            pipe.execute()
            return done, record

        return self._optimistic(body)

    @translated
    def get_job(self, tenant: str, job_id: str) -> JobRecord:
        raw = self.client.get(self.keys.job(tenant, job_id))
        if raw is None:
            raise JobNotFound(f"job {job_id!r} not found")
        return JobRecord.from_json(raw)

    @translated
    def list_jobs(self, tenant: str, task_id: str | None = None, state: str | None = None) -> list[JobRecord]:
        ids = [_s(j) for j in self.client.zrange(self.keys.jobs(tenant), 0, -1)]
        raws = self.client.mget([self.keys.job(tenant, j) for j in ids]) if ids else []
        jobs = [JobRecord.from_json(r) for r in raws if r is not None]
        jobs = [j for j in jobs if (task_id is None or j.task_id == task_id) and (state is None or j.state == state)]
        return sorted(jobs, key=lambda j: (j.created_at, j.job_id), reverse=True)

    @translated
    def list_all_jobs(self, states: set[str] | None = None) -> list[JobRecord]:
        jobs = []
        for tenant in sorted(_s(t) for t in self.client.smembers(self.keys.tenants())):
            jobs += [j for j in self.list_jobs(tenant) if states is None or j.state in states]
        return sorted(jobs, key=lambda j: (j.created_at, j.job_id))
