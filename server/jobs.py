"""Training jobs: submission (API side) and the worker that runs them (in-process or `vpt-serve worker`).

The job record in the store is the truth (state machine in docs/store.md). A worker claims a job
(the claim bumps the job's fencing token and makes it `running`), trains in its own folder
`work/<tenant>/<job>/<token>/`, then publishes the new task version and marks the job `succeeded`
in one atomic step that holds only while its token is current. A worker that lost its claim
publishes nothing; a redelivered job whose version was already published is completed from the
store instead of training twice.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prompt_store import claims
from prompt_store.base import Store
from prompt_store.errors import ClaimLost, JobFinished, StoreConflict, StoreError, TaskFenced
from prompt_store.ids import new_job_id
from prompt_store.queue import Claim, JobQueue, request_cancel
from prompt_store.records import JobRecord
from server.cleanup import sweep
from server.errors import ApiError
from vpt.data.errors import DatasetError
from vpt.data.limits import IngestLimits
from vpt.errors import TrainingCancelled, TrainingError, VPTError
from vpt.options import TrainOptions
from vpt.spec import read_metadata

if TYPE_CHECKING:  # annotations only: the HTTP front ends submit jobs without loading the model stack
    from vpt.backbone import Backbone
    from vpt.priority import PriorityGate

log = logging.getLogger(__name__)

ACTIVE = {"queued", "running"}


class JobService:
    """What the HTTP routes do with jobs."""

    def __init__(self, store: Store, queue: JobQueue, uploads_dir: Path, work_dir: Path | None = None,
                 max_active_jobs: int | None = None, max_pending_bytes: int | None = None) -> None:
        self.store, self.queue = store, queue
        self.uploads_dir, self.work_dir = uploads_dir, work_dir
        self.max_active_jobs, self.max_pending_bytes = max_active_jobs, max_pending_bytes

    def check_quota(self, tenant: str, upload_bytes: int) -> None:
        """429 when the tenant already has `max_active_jobs` queued or running jobs, or when their
        uploads plus this one would exceed `max_pending_bytes`."""
        active = [j for j in self.store.list_jobs(tenant) if j.state in ACTIVE]
        if self.max_active_jobs is not None and len(active) >= self.max_active_jobs:
            raise ApiError(429, "too_many_jobs",
                           f"this tenant already has {len(active)} queued or running jobs "
                           f"(limit {self.max_active_jobs}); wait for one to finish",
                           headers={"Retry-After": "30"})
        if self.max_pending_bytes is not None:
            pending = sum(_size(j.dataset_path) for j in active)
            if pending + upload_bytes > self.max_pending_bytes:
                raise ApiError(429, "too_much_pending_data",
                               f"this tenant's queued uploads ({pending} bytes) plus this one ({upload_bytes}) "
                               f"exceed {self.max_pending_bytes} bytes; wait for a job to finish",
                               headers={"Retry-After": "30"})

    def submit(self, tenant: str, task_id: str, upload: Path, suffix: str, options: TrainOptions) -> JobRecord:
        """Queue a training job for `task_id`; 409 while another is queued or running for it."""
        job_id = new_job_id()
        guard = f"submit-{job_id}"
        if not self.queue.try_lock_task(tenant, task_id, guard, ttl_s=30):
            raise ApiError(409, "training_in_progress", f"a training job for task {task_id!r} is being submitted")
        try:
            self.check_quota(tenant, _size(str(upload)))
            active = [j for j in self.store.list_jobs(tenant, task_id) if j.state in ACTIVE]
            if active:
                raise ApiError(409, "training_in_progress",
                               f"task {task_id!r} already has a {active[0].state} job {active[0].job_id}",
                               details={"job_id": active[0].job_id})
            dest = self.uploads_dir / tenant / job_id
            try:
                dest.mkdir(parents=True, exist_ok=True)
                archive = dest / f"dataset{suffix}"
                shutil.move(str(upload), archive)
                # The record and its delivery in one step: no job left queued that nothing delivers.
                return self.queue.submit(JobRecord.new(tenant, task_id, options=options.to_dict(),
                                                       dataset_path=str(archive), job_id=job_id))
            except BaseException:
                shutil.rmtree(dest, ignore_errors=True)
                raise
        finally:
            self.queue.release_task_lock(tenant, task_id, guard)

    def cancel_active(self, tenant: str, task_id: str) -> None:
        """Cancel the task's queued or running jobs (a running one stops before it publishes)."""
        for job in self.store.list_jobs(tenant, task_id):
            if job.state in ACTIVE:
                try:
                    self._cancel(tenant, job.job_id)
                except StoreConflict:  # it finished meanwhile
                    pass

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        try:
            return self._cancel(tenant, job_id)
        except JobFinished as e:
            raise ApiError(409, "job_finished", f"job {job_id!r} has already finished") from e

    def _cancel(self, tenant: str, job_id: str) -> JobRecord:
        """A queued job, or one whose worker is gone (silent for `stale_s`), ends now; a live one is asked."""
        job = request_cancel(self.store, tenant, job_id, stale_s=self.queue.stale_s)
        if job.terminal:
            remove_job_files(job, self.work_dir, self.uploads_dir)
        return job


def _size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0


@dataclass
class Outcome:
    """What a claim ends with: a terminal state (`succeeded` carries `blob` to publish) or `queued`."""

    state: str
    fields: dict[str, Any] = field(default_factory=dict)
    blob: bytes | None = None


class TrainingWorker:
    """Claims jobs from the queue and trains them, one at a time, until stopped.

    Every write about a claimed job carries the claim's token, so a worker that lost its claim (it
    stalled past `stale_s` and another worker took the job) can neither publish nor finish it. The
    delivery is acknowledged only once the outcome is recorded; on a store error it stays pending
    and is recovered once the store answers again.
    """

    def __init__(self, store: Store, queue: JobQueue, backbone: Backbone, *, work_dir: Path,
                 limits: IngestLimits | None = None, heartbeat_s: float = 10.0, stale_s: float = 120.0,
                 name: str | None = None, max_deliveries: int = 3, uploads_dir: Path | None = None,
                 sweep_s: float = 300.0, gate: PriorityGate | None = None) -> None:
        self.store, self.queue, self.backbone = store, queue, backbone
        self.work_dir, self.limits, self.uploads_dir = work_dir, limits or IngestLimits(), uploads_dir
        self.heartbeat_s, self.stale_s, self.max_deliveries = heartbeat_s, stale_s, max_deliveries
        self.sweep_s = sweep_s
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.gate = gate  # each training step passes it: serving first on a shared device
        self._stop = threading.Event()
        self.current: Claim | None = None  # the claim being processed

    def stop(self) -> None:
        """Stop claiming; a running training stops at its next step and its job goes back to the queue."""
        self._stop.set()

    def abandon(self) -> None:
        """Shutdown ran out of time while this worker still works: hand its job back from here. The
        process exits next; the next claim's token fences anything the old thread might still write."""
        claim = self.current
        if claim is None:
            return
        try:
            self.queue.requeue(claim)
            log.warning("job %s handed back to the queue (its training did not stop in time)", claim.job_id)
        except StoreError as e:
            log.warning("job %s: could not hand it back (%s); it is recovered once its heartbeat is stale",
                        claim.job_id, e)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_forever(self) -> None:
        log.info("training worker %s started", self.name)
        last_recover = last_sweep = 0.0
        while not self._stop.is_set():
            try:
                if self.uploads_dir is not None and time.monotonic() - last_sweep > self.sweep_s:
                    last_sweep = time.monotonic()
                    sweep(self.store, self.uploads_dir, self.work_dir)
                claim = None
                if time.monotonic() - last_recover > min(self.stale_s / 4, 30):
                    last_recover = time.monotonic()
                    self.queue.reap()
                    stale = self.queue.recover_stale(int(self.stale_s * 1000), self.name)
                    claim = stale[0] if stale else None
                if claim is None:
                    claim = self.queue.claim(self.name, timeout_s=1.0)
                if claim is not None:
                    self.process(claim)
            except StoreError as e:  # store down: wait and retry, never die
                log.warning("worker %s: store error %s; retrying", self.name, e)
                self._stop.wait(1.0)
        log.info("training worker %s stopped", self.name)

    # -- one job ------------------------------------------------------------------------------------

    def process(self, claim: Claim) -> None:
        """Run one claim to a recorded outcome, then acknowledge it (never before)."""
        job = claim.job or self.store.get_job(claim.tenant, claim.job_id)
        attempt = self.work_dir / job.tenant / job.job_id / str(claim.token)
        self.current = claim
        try:
            outcome = self._outcome(job, claim, attempt)
            self._record(job, claim, outcome)
        except ClaimLost as e:  # another claim owns the job now: touch nothing of it
            log.warning("job %s: claim %d lost (%s); dropping this delivery's work", job.job_id, claim.token, e)
            return
        except JobFinished:  # ended meanwhile (e.g. cancelled after its worker went silent)
            remove_job_files(job, self.work_dir, self.uploads_dir)
            self.queue.ack(claim)
            return
        finally:
            self.current = None
            shutil.rmtree(attempt, ignore_errors=True)
        if outcome.state != "queued":
            self.queue.ack(claim)

    def _outcome(self, job: JobRecord, claim: Claim, attempt: Path) -> Outcome:
        if self._stop.is_set():
            return Outcome("queued")
        if claim.token > self.max_deliveries:
            return Outcome("failed", {"error": {"code": "worker_lost",
                                                "message": f"the job was delivered {claim.token} times"}})
        made = self._published_version(job)
        if made is not None:
            return Outcome("succeeded", {"version": made})
        return self._train(job, claim, attempt)

    def _record(self, job: JobRecord, claim: Claim, outcome: Outcome) -> None:
        """Write the outcome under the claim's token (publish and success are one atomic step)."""
        if outcome.state == "queued":
            self.queue.requeue(claim)
            log.info("job %s handed back to the queue", job.job_id)
            return
        if outcome.blob is not None:
            try:
                _, version = self.store.publish_job(job.tenant, job.job_id, claim.token, outcome.blob,
                                                    read_metadata(outcome.blob), **outcome.fields)
                log.info("job %s: task %s/%s version %d published", job.job_id, job.tenant, job.task_id,
                         version.version)
            except TaskFenced as e:  # the task was deleted while this job trained: delete wins
                self.store.finish_job(job.tenant, job.job_id, claim.token, "cancelled",
                                      error={"code": "task_deleted", "message": str(e)})
        else:
            self.store.finish_job(job.tenant, job.job_id, claim.token, outcome.state, **outcome.fields)
        remove_job_files(job, self.work_dir, self.uploads_dir)

    def _published_version(self, job: JobRecord) -> int | None:
        """The version an earlier delivery of `job` published (it died before recording success)."""
        try:
            versions = self.store.list_versions(job.tenant, job.task_id)
        except StoreError:
            return None
        done = [v.version for v in versions if v.metadata.get("job_id") == job.job_id]
        return done[-1] if done else None

    def _train(self, job: JobRecord, claim: Claim, attempt: Path) -> Outcome:
        from vpt.pipeline import train_task_from_archive

        beat = _Heartbeat(self, job, claim)
        beat.start()
        try:
            options = TrainOptions.from_dict(job.options)
            result = train_task_from_archive(
                Path(job.dataset_path or ""), attempt, self.backbone, options, self.limits,
                on_progress=beat.progress, should_cancel=beat.should_stop,
                extra={"job_id": job.job_id, "task_id": job.task_id},
                step_gate=self.gate.training if self.gate is not None else None)
            beat.stop()
            beat.check()
            if self.store.get_job(job.tenant, job.job_id).cancel_requested:  # e.g. the task was deleted
                raise TrainingCancelled("cancelled before publishing")
            return Outcome("succeeded", {"metrics": result.metrics, "progress": beat.last,
                                         "options": result.metadata["training"]["options"]},  # a sweep's winner
                           result.task_file)
        except TrainingCancelled:
            beat.stop()
            beat.check()
            return Outcome("cancelled") if beat.cancel_requested or not self.stopping else Outcome("queued")
        except (DatasetError, TrainingError) as e:
            return Outcome("failed", {"error": {"code": e.code, "message": e.message,
                                                **({"details": e.entries} if getattr(e, "entries", None) else {})}})
        except VPTError as e:
            return Outcome("failed", {"error": {"code": getattr(e, "code", "training_failed"), "message": str(e)}})
        except StoreError:
            raise  # the delivery stays pending and is recovered once the store is back
        except Exception as e:
            log.exception("job %s failed", job.job_id)
            return Outcome("failed", {"error": {"code": "internal_error", "message": f"training failed: {e}"}})
        finally:
            beat.stop()


def remove_job_files(job: JobRecord, work_dir: Path | None, uploads_dir: Path | None) -> None:
    """A finished job's work folder (every delivery's) and its uploaded dataset."""
    if work_dir is not None:
        shutil.rmtree(work_dir / job.tenant / job.job_id, ignore_errors=True)
    if job.dataset_path:
        folder = Path(job.dataset_path).parent
        if folder.name == job.job_id:
            shutil.rmtree(folder, ignore_errors=True)
    elif uploads_dir is not None:
        shutil.rmtree(uploads_dir / job.tenant / job.job_id, ignore_errors=True)


class _Heartbeat:
    """Keeps the claim alive, relays progress to the job record, and polls for cancellation and for
    a lost claim: either stops the training at its next step."""

    def __init__(self, worker: TrainingWorker, job: JobRecord, claim: Claim) -> None:
        self.w, self.job, self.claim = worker, job, claim
        self.cancel_requested = False
        self.lost: Exception | None = None
        self._progress: dict[str, Any] | None = None
        self.last: dict[str, Any] = dict(job.progress)   # the latest event, written with the final state
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop and wait, so that no progress write can land after the job's final state."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)

    def should_stop(self) -> bool:
        return self.cancel_requested or self.lost is not None or self.w.stopping

    def check(self) -> None:
        """Raise ClaimLost if the heartbeat found the claim gone."""
        if self.lost is not None:
            raise ClaimLost(str(self.lost))

    def progress(self, event: Any) -> None:
        data = event.to_dict() if hasattr(event, "to_dict") else dict(event)
        with self._lock:
            self._progress = data
            self.last = data

    def _run(self) -> None:
        last_beat = time.monotonic()
        while not self._stop.wait(0.25):
            with self._lock:
                progress, self._progress = self._progress, None
            try:
                if progress is not None or time.monotonic() - last_beat > self.w.heartbeat_s:
                    rec = self.w.queue.heartbeat(self.claim, progress)
                    last_beat = time.monotonic()
                else:
                    rec = self.w.store.get_job(self.job.tenant, self.job.job_id)
                    claims.check_token(rec, self.claim.token)
                self.cancel_requested = self.cancel_requested or rec.cancel_requested
            except StoreConflict as e:  # ClaimLost or JobFinished: someone else owns the job now
                log.warning("job %s: claim %d lost: %s; stopping its training", self.job.job_id,
                            self.claim.token, e)
                self.lost = e
                return
            except StoreError as e:
                log.debug("heartbeat for %s: %s", self.job.job_id, e)
