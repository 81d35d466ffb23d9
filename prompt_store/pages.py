"""Pages of a tenant's tasks and jobs, with opaque cursors; the same for every store backend.

A cursor names the last item of the previous page (a task id; a job's creation time and id), so a
page never repeats or skips an item that existed through the whole listing: tasks created or
deleted meanwhile appear or not, nothing else moves. Tasks come sorted by id, jobs newest first.
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from prompt_store.base import Store
from prompt_store.errors import TaskNotFound, VersionNotFound
from prompt_store.records import JobRecord, TaskInfo

T = TypeVar("T")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class InvalidCursor(ValueError):
    """A cursor this listing did not hand out."""


@dataclass(frozen=True)
class Page(Generic[T]):
    items: list[T]
    next_cursor: str | None  # None on the last page


def _encode(kind: str, key: list[Any]) -> str:
    raw = json.dumps([kind, *key], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode(cursor: str, kind: str, types: tuple[type | tuple[type, ...], ...]) -> list[Any]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = json.loads(raw)
    except (binascii.Error, ValueError) as e:
        raise InvalidCursor(f"cursor {cursor[:40]!r} is not one this listing returned") from e
    if (not isinstance(value, list) or len(value) != len(types) + 1 or value[0] != kind
            or not all(isinstance(v, t) and not isinstance(v, bool) for v, t in zip(value[1:], types))):
        raise InvalidCursor(f"cursor {cursor[:40]!r} is not one this listing returned")
    return value[1:]


def task_page(store: Store, tenant: str, limit: int = DEFAULT_LIMIT, cursor: str | None = None) -> Page[TaskInfo]:
    """Up to `limit` tasks after `cursor`, by task id; only this page's records are read."""
    after = _decode(cursor, "tasks", (str,))[0] if cursor else None
    ids = [t for t in store.list_task_ids(tenant) if after is None or t > after]
    items: list[TaskInfo] = []
    rest = iter(ids)
    for task_id in rest:
        try:
            items.append(store.get_info(tenant, task_id))
        except (TaskNotFound, VersionNotFound):
            continue  # deleted while we listed, or not yet published
        if len(items) == limit:
            break
    more = next(rest, None) is not None
    return Page(items, _encode("tasks", [items[-1].task_id]) if more and items else None)


def job_page(store: Store, tenant: str, limit: int = DEFAULT_LIMIT, cursor: str | None = None,
             task_id: str | None = None, state: str | None = None) -> Page[JobRecord]:
    """Up to `limit` jobs older than `cursor`'s, newest first, optionally of one task or state."""
    jobs = store.list_jobs(tenant, task_id, state)
    if cursor:
        at = tuple(_decode(cursor, "jobs", ((int, float), str)))
        jobs = [j for j in jobs if (j.created_at, j.job_id) < at]
    page = jobs[:limit]
    more = len(jobs) > limit
    return Page(page, _encode("jobs", [page[-1].created_at, page[-1].job_id]) if more else None)
