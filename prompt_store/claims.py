"""Claims and fencing: the rules both backends apply inside their atomic read-modify-writes.

A job is handed to a worker by a *claim*: a conditional state change (`queued` -> `running`, or a
`running` job whose worker's heartbeat is stale -> `running` again) that bumps the job's
`claim_token`. Every later write of that worker (heartbeat, progress, publish, outcome) names its
token and is refused with ClaimLost once another claim has bumped it, so a worker that stalled
(GC pause, SIGSTOP, VM freeze) and lost its job can never publish or finish it: the token is a
fencing counter. The job record is the truth; a queue only says which job to claim next.
"""
from __future__ import annotations

import time
from typing import Any

from prompt_store.errors import ClaimLost, JobFinished, StoreConflict
from prompt_store.records import TERMINAL_STATES, JobRecord, apply_job_update

ACTIVE_STATES = frozenset({"queued", "running"})


def last_alive(job: JobRecord) -> float:
    """When the job's worker was last heard of (its heartbeat, else the record's last change)."""
    return job.heartbeat_at if job.heartbeat_at is not None else job.updated_at


def is_stale(job: JobRecord, stale_s: float, now: float | None = None) -> bool:
    """A `running` job whose worker has been silent for `stale_s` seconds."""
    now = time.time() if now is None else now
    return job.state == "running" and now - last_alive(job) >= stale_s


def claim_update(job: JobRecord, worker: str, stale_s: float, delivery: str | None = None,
                 now: float | None = None) -> JobRecord:
    """`job` claimed by `worker`: running, a new token, a fresh heartbeat. StoreConflict if the job is
    not claimable (terminal, cancel requested while queued, or running under a live worker)."""
    now = time.time() if now is None else now
    if job.terminal:
        raise JobFinished(f"job {job.job_id} is already {job.state}")
    if job.state == "running" and not is_stale(job, stale_s, now):
        raise StoreConflict(f"job {job.job_id} is running under live worker {job.worker!r}")
    return apply_job_update(job, {"state": "running", "worker": worker, "claim_token": job.claim_token + 1,
                                  "heartbeat_at": now, "delivery": delivery,
                                  **({} if job.state == "running" else {"started_at": now})}, now=now)


def check_token(job: JobRecord, token: int) -> None:
    """Raise unless `token` is the job's current claim: JobFinished if the job already ended,
    ClaimLost if it was claimed again (or re-queued) since."""
    if job.terminal:
        raise JobFinished(f"job {job.job_id} is already {job.state}")
    if job.state != "running" or job.claim_token != token:
        raise ClaimLost(f"claim {token} on job {job.job_id} is no longer current "
                        f"(job is {job.state}, claim {job.claim_token})")


def heartbeat_update(job: JobRecord, token: int, progress: dict[str, Any] | None = None,
                     now: float | None = None) -> JobRecord:
    check_token(job, token)
    now = time.time() if now is None else now
    fields: dict[str, Any] = {"heartbeat_at": now}
    if progress is not None:
        fields["progress"] = progress
    return apply_job_update(job, fields, now=now)


def outcome_update(job: JobRecord, token: int, state: str, fields: dict[str, Any],
                   now: float | None = None) -> JobRecord:
    """The claim's outcome: a terminal state (written once), or `queued` to hand the job back."""
    check_token(job, token)
    if state == "queued":
        fields = {"worker": None, "heartbeat_at": None, "delivery": None, **fields}
    elif state not in TERMINAL_STATES:
        raise ValueError(f"an outcome is a terminal state or 'queued', not {state!r}")
    return apply_job_update(job, {"state": state, **fields}, now=now)


def reap_update(job: JobRecord, stale_s: float, max_claims: int, now: float | None = None) -> JobRecord | None:
    """What the reaper does with a job whose worker is gone: re-queue it, or fail it once it has
    been claimed `max_claims` times. None if the job is not (or no longer) stale."""
    now = time.time() if now is None else now
    if not is_stale(job, stale_s, now):
        return None
    if job.claim_token >= max_claims:
        return apply_job_update(job, {"state": "failed", "error": {
            "code": "worker_lost",
            "message": f"the job's worker stopped answering {job.claim_token} times; giving up"}}, now=now)
    return apply_job_update(job, {"state": "queued", "worker": None, "heartbeat_at": None, "delivery": None},
                            now=now)


def cancel_update(job: JobRecord, stale_s: float | None, now: float | None = None) -> JobRecord:
    """Cancel: a queued job, or a running one whose worker is gone, ends now; a live one is asked."""
    if job.state == "queued" or (stale_s is not None and is_stale(job, stale_s, now)):
        return apply_job_update(job, {"state": "cancelled", "cancel_requested": True}, now=now)
    return apply_job_update(job, {"cancel_requested": True}, expect_states={"running"}, now=now)
