"""Errors raised by the `prompt_store` package.

Every backend failure reaches callers as one of these; no redis or OS exception escapes the store
(the original is chained with `from`). `code` is the stable name the server maps to an HTTP answer.
"""
from __future__ import annotations


class StoreError(Exception):
    """Root of every error raised by prompt_store."""

    code = "store_error"


class InvalidId(StoreError, ValueError):
    """A tenant, task or job id does not match `[A-Za-z0-9._-]{1,64}` (or is `.`/`..`)."""

    code = "invalid_id"


class TaskNotFound(StoreError):
    """No such task for this tenant."""

    code = "task_not_found"


class VersionNotFound(StoreError):
    """The task exists but not this version."""

    code = "version_not_found"


class JobNotFound(StoreError):
    """No such job for this tenant."""

    code = "job_not_found"


class StoreConflict(StoreError):
    """The write contradicts the stored state (terminal job, unexpected state, lost queue claim...)."""

    code = "conflict"


class ClaimLost(StoreConflict):
    """The worker's claim on a job is no longer current (another claim fenced it, or the job ended)."""

    code = "claim_lost"


class TaskFenced(StoreConflict):
    """The task was deleted after the job was created: the job may not publish into it."""

    code = "task_deleted"


class JobFinished(StoreConflict):
    """The job is already in a terminal state (succeeded, failed, cancelled); it cannot change state."""

    code = "job_finished"


class StoreUnavailable(StoreError):
    """The backend cannot be reached or timed out; retrying later may succeed."""

    code = "store_unavailable"


class StoreFull(StoreUnavailable):
    """The store's disk is full or read-only (ENOSPC, EDQUOT, EROFS); nothing was half-written."""

    code = "insufficient_storage"


DISK_FULL_ERRNOS = frozenset({28, 122, 30})  # ENOSPC, EDQUOT, EROFS


def is_disk_full(exc: BaseException) -> bool:
    """An OSError that means "no space (or no write access) on this filesystem"."""
    return isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS


class BankFull(StoreError):
    """Every bank slot is pinned by in-flight batches: retrying later can succeed."""

    code = "bank_full"


class TaskTooLarge(StoreError):
    """One task alone needs more bytes than the whole bank holds: retrying cannot help."""

    code = "task_too_large"


class TaskUnservable(StoreError):
    """The stored task file cannot be served by this backbone (corrupt, or another backbone's)."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class RecordCorrupt(StoreError):
    """A stored record cannot be decoded or its blob does not match its checksum."""

    code = "record_corrupt"
