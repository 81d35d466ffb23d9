"""Id validation and the only places where ids become Redis keys or file paths.

An id is `[A-Za-z0-9._-]{1,64}` and neither `.` nor `..`. It therefore holds no `:` (the Redis key
separator), no `/` or NUL (path separators), and cannot name a parent directory: a validated id
can never leave its tenant's key prefix or directory. Names the store makes up for itself (temp
files, trash directories) contain `~`, which no id may hold, so they never collide with an id.
"""
from __future__ import annotations

import re
import uuid
from pathlib import Path

from prompt_store.errors import InvalidId, VersionNotFound

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_ID_LEN = 64


def validate_id(value: str, kind: str = "task id") -> str:
    """Return `value` if it is a valid id, else raise InvalidId naming `kind`."""
    if not isinstance(value, str):
        raise InvalidId(f"{kind} must be a string, got {type(value).__name__}")
    if ID_PATTERN.fullmatch(value) is None or value in (".", ".."):
        shown = value if len(value) <= 80 else value[:80] + "..."
        raise InvalidId(
            f"invalid {kind} {shown!r}: use 1-{MAX_ID_LEN} characters from A-Z a-z 0-9 . _ - "
            "(and not '.' or '..')"
        )
    return value


MAX_VERSION = 2**63 - 1


def validate_version(version: int) -> int:
    """Versions are positive ints; anything else names no version."""
    if isinstance(version, bool) or not isinstance(version, int):
        raise TypeError(f"version must be an int, got {type(version).__name__}")
    if version < 1 or version > MAX_VERSION:
        raise VersionNotFound(f"version {version} does not exist (versions are 1..{MAX_VERSION})")
    return version


def new_job_id() -> str:
    """A fresh job id: `job-` and 24 hex digits (valid by construction)."""
    return "job-" + uuid.uuid4().hex[:24]


class RedisKeys:
    """Every Redis key the store uses, all under `{prefix}:`; tenant data under `{prefix}:t:{tenant}:`."""

    QUEUE_GROUP = "workers"

    def __init__(self, prefix: str = "vpt") -> None:
        self.prefix = validate_id(prefix, "key prefix")

    def tenant_prefix(self, tenant: str) -> str:
        return f"{self.prefix}:t:{validate_id(tenant, 'tenant')}:"

    def tenants(self) -> str:
        return f"{self.prefix}:tenants"  # SET of tenants that ever stored a task or job

    def events(self) -> str:
        return f"{self.prefix}:events"  # pub/sub channel of ChangeEvent JSON

    def queue(self) -> str:
        return f"{self.prefix}:queue"  # prefix of the queue's global keys

    def queue_tenants(self) -> str:
        return f"{self.prefix}:queue:tenants"  # SET of tenants that have a job stream

    def queue_cursor(self) -> str:
        return f"{self.prefix}:queue:cursor"  # STRING the tenant served last (round-robin)

    def queue_wake(self) -> str:
        return f"{self.prefix}:queue:wake"  # LIST of wake-up tokens idle workers block on (BLPOP)

    def tenant_queue(self, tenant: str) -> str:
        return self.tenant_prefix(tenant) + "queue"  # STREAM of {tenant, job_id}, group `workers`

    def tasks(self, tenant: str) -> str:
        return self.tenant_prefix(tenant) + "tasks"  # SET of task ids

    def _task(self, tenant: str, task_id: str) -> str:
        return self.tenant_prefix(tenant) + f"task:{validate_id(task_id)}:"

    def head(self, tenant: str, task_id: str) -> str:
        return self._task(tenant, task_id) + "head"  # HASH current, created_at, updated_at

    def versions(self, tenant: str, task_id: str) -> str:
        return self._task(tenant, task_id) + "versions"  # ZSET version -> score version

    def version(self, tenant: str, task_id: str, version: int) -> str:
        return self._task(tenant, task_id) + f"v:{validate_version(version)}"  # HASH record, blob

    def counter(self, tenant: str, task_id: str) -> str:
        return self._task(tenant, task_id) + "seq"  # last version number; survives delete

    def jobs(self, tenant: str) -> str:
        return self.tenant_prefix(tenant) + "jobs"  # ZSET job_id -> created_at

    def job(self, tenant: str, job_id: str) -> str:
        return self.tenant_prefix(tenant) + f"job:{validate_id(job_id, 'job id')}"  # STRING JSON

    def train_lock(self, tenant: str, task_id: str) -> str:
        return self.tenant_prefix(tenant) + f"lock:train:{validate_id(task_id)}"  # STRING holder, PX ttl

    def fence(self, tenant: str, task_id: str) -> str:
        return self._task(tenant, task_id) + "fence"  # deletes so far; survives delete

    def tenant_of(self, key: str) -> str | None:
        """The tenant a key belongs to, or None for a global key (inverse of `tenant_prefix`)."""
        head = f"{self.prefix}:t:"
        if not key.startswith(head):
            return None
        return key[len(head):].split(":", 1)[0]


class LocalPaths:
    """Every path the local store uses, under `root`; tenant data under `root/tenants/{tenant}/`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def write_lock(self) -> Path:
        return self.root / ".write.lock"

    @property
    def events(self) -> Path:
        return self.root / "events.log"

    @property
    def trash(self) -> Path:
        return self.root / "~trash"

    @property
    def tenants_dir(self) -> Path:
        return self.root / "tenants"

    def tenant(self, tenant: str) -> Path:
        return self.tenants_dir / validate_id(tenant, "tenant")

    def tasks_dir(self, tenant: str) -> Path:
        return self.tenant(tenant) / "tasks"

    def task(self, tenant: str, task_id: str) -> Path:
        return self.tasks_dir(tenant) / validate_id(task_id)

    def head(self, tenant: str, task_id: str) -> Path:
        return self.task(tenant, task_id) / "head.json"  # current pointer + timestamps

    def versions_dir(self, tenant: str, task_id: str) -> Path:
        return self.task(tenant, task_id) / "v"

    def version(self, tenant: str, task_id: str, version: int) -> Path:
        return self.versions_dir(tenant, task_id) / f"{validate_version(version)}.ver"  # record + blob

    def counter(self, tenant: str, task_id: str) -> Path:
        return self.tenant(tenant) / "counters" / validate_id(task_id)  # survives delete

    def jobs_dir(self, tenant: str) -> Path:
        return self.tenant(tenant) / "jobs"

    def job(self, tenant: str, job_id: str) -> Path:
        return self.jobs_dir(tenant) / f"{validate_id(job_id, 'job id')}.json"

    def train_lock(self, tenant: str, task_id: str) -> Path:
        return self.tenant(tenant) / "locks" / f"train-{validate_id(task_id)}.json"

    def fence(self, tenant: str, task_id: str) -> Path:
        return self.tenant(tenant) / "fences" / validate_id(task_id)  # deletes so far; survives delete

    def active_dir(self, tenant: str) -> Path:
        return self.tenant(tenant) / "active"  # one empty file per queued or running job: the queue

    def active(self, tenant: str, job_id: str) -> Path:
        return self.active_dir(tenant) / validate_id(job_id, "job id")

    @property
    def queue_cursor(self) -> Path:
        return self.root / "queue.cursor"  # the tenant served last (round-robin across tenants)
