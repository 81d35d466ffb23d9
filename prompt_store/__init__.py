"""Task records: the embedded file store, the Redis store, change events, the job queue.

The device-resident bank lives in `prompt_store.bank` (imported on its own: it needs torch).
"""
from __future__ import annotations

from prompt_store.base import Store
from prompt_store.errors import (
    ClaimLost,
    InvalidId,
    JobFinished,
    JobNotFound,
    RecordCorrupt,
    StoreConflict,
    StoreError,
    StoreUnavailable,
    TaskFenced,
    TaskNotFound,
    VersionNotFound,
)
from prompt_store.events import Subscription
from prompt_store.factory import UnsupportedStoreUrl, open_queue, open_store
from prompt_store.ids import new_job_id, validate_id
from prompt_store.local import LocalStore
from prompt_store.queue import Claim, JobQueue, LocalJobQueue, request_cancel
from prompt_store.records import (
    JOB_STATES,
    TERMINAL_STATES,
    ChangeEvent,
    JobRecord,
    TaskInfo,
    TaskVersion,
    apply_job_update,
)
from prompt_store.redis_queue import RedisJobQueue
from prompt_store.redis_store import RedisStore

__all__ = [
    "JOB_STATES",
    "TERMINAL_STATES",
    "ChangeEvent",
    "Claim",
    "ClaimLost",
    "InvalidId",
    "JobFinished",
    "JobNotFound",
    "JobQueue",
    "JobRecord",
    "LocalJobQueue",
    "LocalStore",
    "RecordCorrupt",
    "RedisJobQueue",
    "RedisStore",
    "Store",
    "StoreConflict",
    "StoreError",
    "StoreUnavailable",
    "Subscription",
    "TaskFenced",
    "TaskInfo",
    "TaskNotFound",
    "TaskVersion",
    "UnsupportedStoreUrl",
    "VersionNotFound",
    "apply_job_update",
    "new_job_id",
    "open_queue",
    "open_store",
    "request_cancel",
    "validate_id",
]
