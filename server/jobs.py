"""Training jobs: submission (API side) and the worker that runs them (in-process or `vpt-serve worker`).

The job record in the store is the truth; the queue only carries (tenant, job_id). A worker moves a
job to `running`, trains, publishes a new task version, then marks the job `succeeded` with that
version. A redelivered job whose version was already published (the worker died between the two
writes) is completed from the store instead of training twice.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from prompt_store.base import Store
from prompt_store.errors import JobFinished, StoreConflict, StoreError
from prompt_store.ids import new_job_id
from prompt_store.queue import Claim, JobQueue, request_cancel
from prompt_store.records import TERMINAL_STATES, JobRecord
from server.errors import ApiError
from vpt.backbone import Backbone
from vpt.data.errors import DatasetError
from vpt.data.limits import IngestLimits
from vpt.errors import VPTError
from vpt.priority import PriorityGate
from vpt.task import read_metadata
from vpt.train import TrainingCancelled, TrainingError, TrainOptions

log = logging.getLogger(__name__)

ACTIVE = {"queued", "running"}


class JobService:
    """What the HTTP routes do with jobs."""

    def __init__(self, store: Store, queue: JobQueue, uploads_dir: Path) -> None:
        self.store, self.queue = store, queue
        self.uploads_dir = uploads_dir

    def submit(self, tenant: str, task_id: str, upload: Path, suffix: str, options: TrainOptions) -> JobRecord:
        """Queue a training job for `task_id`; 409 while another is queued or running for it."""
        job_id = new_job_id()
        guard = f"submit-{job_id}"
        if not self.queue.try_lock_task(tenant, task_id, guard, ttl_s=30):
            raise ApiError(409, "training_in_progress", f"a training job for task {task_id!r} is being submitted")
        try:
            active = [j for j in self.store.list_jobs(tenant, task_id) if j.state in ACTIVE]
            if active:
                raise ApiError(409, "training_in_progress",
                               f"task {task_id!r} already has a {active[0].state} job {active[0].job_id}",
                               details={"job_id": active[0].job_id})
            dest = self.uploads_dir / tenant / job_id
            dest.mkdir(parents=True, exist_ok=True)
            archive = dest / f"dataset{suffix}"
            shutil.move(str(upload), archive)
            job = self.store.create_job(JobRecord.new(tenant, task_id, options=options.to_dict(),
                                                      dataset_path=str(archive), job_id=job_id))
            self.queue.enqueue(tenant, job.job_id)
            return job
        finally:
            self.queue.release_task_lock(tenant, task_id, guard)

    def cancel_active(self, tenant: str, task_id: str) -> None:
        """Cancel the task's queued or running jobs (a running one stops before it publishes)."""
        for job in self.store.list_jobs(tenant, task_id):
            if job.state in ACTIVE:
                try:
                    request_cancel(self.store, tenant, job.job_id)
                except StoreConflict:  # it finished meanwhile
                    pass

    def cancel(self, tenant: str, job_id: str) -> JobRecord:
        try:
            return request_cancel(self.store, tenant, job_id)
        except JobFinished as e:
            raise ApiError(409, "job_finished", f"job {job_id!r} has already finished") from e


def fail_interrupted(store: Store) -> int:
    """Embedded mode at startup: jobs left `running` by a dead process are failed, not lost silently."""
    n = 0
    for job in store.list_all_jobs(states={"running"}):
        try:
            store.update_job(job.tenant, job.job_id, expect_states={"running"}, state="failed",
                             finished_at=time.time(),
                             error={"code": "interrupted", "message": "the server stopped while this job ran"})
            n += 1
        except StoreError:
            log.warning("could not mark job %s interrupted", job.job_id)
    return n


class TrainingWorker:
    """Claims jobs from the queue and trains them, one at a time, until stopped."""

    def __init__(self, store: Store, queue: JobQueue, backbone: Backbone, *, work_dir: Path,
                 limits: IngestLimits | None = None, heartbeat_s: float = 10.0, stale_s: float = 120.0,
                 name: str | None = None, max_deliveries: int = 3, gate: PriorityGate | None = None) -> None:
        self.store, self.queue, self.backbone = store, queue, backbone
        self.work_dir, self.limits = work_dir, limits or IngestLimits()
        self.heartbeat_s, self.stale_s, self.max_deliveries = heartbeat_s, stale_s, max_deliveries
        self.name = name or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.gate = gate  # each training step passes it: serving first on a shared device
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run_forever(self) -> None:
        log.info("training worker %s started", self.name)
        last_recover = 0.0
        while not self._stop.is_set():
            try:
                claim = None
                if time.monotonic() - last_recover > min(self.stale_s / 2, 30):
                    last_recover = time.monotonic()
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
        try:
            job = self.store.get_job(claim.tenant, claim.job_id)
        except StoreError as e:
            log.warning("job %s: cannot read record (%s); dropping the delivery", claim.job_id, e)
            self.queue.ack(claim)
            return
        if job.state in TERMINAL_STATES:
            self.queue.ack(claim)
            return
        if self._already_published(job):
            self.queue.ack(claim)
            return
        if claim.deliveries > self.max_deliveries:
            self._finish(job, "failed", error={"code": "worker_lost",
                                                "message": f"the job was delivered {claim.deliveries} times"})
            self.queue.ack(claim)
            return
        try:
            job = self.store.update_job(job.tenant, job.job_id, expect_states=ACTIVE, state="running",
                                        started_at=time.time(), worker=self.name)
        except StoreConflict:  # cancelled meanwhile
            self.queue.ack(claim)
            return
        try:
            self._train(job, claim)
        finally:
            self.queue.ack(claim)

    def _already_published(self, job: JobRecord) -> bool:
        try:
            versions = self.store.list_versions(job.tenant, job.task_id)
        except StoreError:
            return False
        done = [v for v in versions if v.metadata.get("job_id") == job.job_id]
        if done:
            self._finish(job, "succeeded", version=done[-1].version)
            return True
        return False

    def _train(self, job: JobRecord, claim: Claim) -> None:
        from vpt.pipeline import train_task_from_archive

        beat = _Heartbeat(self, job, claim)
        beat.start()
        work = self.work_dir / job.tenant / job.job_id
        shutil.rmtree(work, ignore_errors=True)  # what a dead worker left of an earlier delivery
        try:
            options = TrainOptions.from_dict(job.options)
            result = train_task_from_archive(
                Path(job.dataset_path or ""), work, self.backbone, options, self.limits,
                on_progress=beat.progress, should_cancel=beat.cancelled,
                extra={"job_id": job.job_id, "task_id": job.task_id},
                step_gate=self.gate.training if self.gate is not None else None)
            beat.stop()
            if self.store.get_job(job.tenant, job.job_id).cancel_requested:  # e.g. the task was deleted
                raise TrainingCancelled("cancelled before publishing")
            blob = result.task_file
            version = self.store.put_task(job.tenant, job.task_id, blob, read_metadata(blob)).version
            self._finish(job, "succeeded", version=version, metrics=result.metrics, progress=beat.last)
            log.info("job %s: task %s/%s version %d published", job.job_id, job.tenant, job.task_id, version)
        except TrainingCancelled:
            self._finish(job, "cancelled")
        except (DatasetError, TrainingError) as e:
            self._finish(job, "failed", error={"code": e.code, "message": e.message,
                                               **({"details": e.entries} if getattr(e, "entries", None) else {})})
        except VPTError as e:
            self._finish(job, "failed", error={"code": getattr(e, "code", "training_failed"), "message": str(e)})
        except StoreError:
            raise  # the delivery stays pending and is recovered once the store is back
        except Exception as e:
            log.exception("job %s failed", job.job_id)
            self._finish(job, "failed", error={"code": "internal_error", "message": f"training failed: {e}"})
        finally:
            beat.stop()
            shutil.rmtree(work, ignore_errors=True)

    def _finish(self, job: JobRecord, state: str, **fields: Any) -> None:
        try:
            self.store.update_job(job.tenant, job.job_id, state=state, finished_at=time.time(), **fields)
        except StoreConflict:
            log.info("job %s was already terminal", job.job_id)
        if job.dataset_path and state in TERMINAL_STATES:
            shutil.rmtree(Path(job.dataset_path).parent, ignore_errors=True)


class _Heartbeat:
    """Keeps the claim alive, relays progress to the job record, and polls for cancellation."""

    def __init__(self, worker: TrainingWorker, job: JobRecord, claim: Claim) -> None:
        self.w, self.job, self.claim = worker, job, claim
        self._cancel = False
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

    def cancelled(self) -> bool:
        return self._cancel

    def progress(self, event: Any) -> None:
        data = event.to_dict() if hasattr(event, "to_dict") else dict(event)
        with self._lock:
            self._progress = data
            self.last = data

    def _run(self) -> None:
        last_beat = 0.0
        while not self._stop.wait(0.25):
            with self._lock:
                progress, self._progress = self._progress, None
            try:
                if progress is not None:
                    rec = self.w.store.update_job(self.job.tenant, self.job.job_id, progress=progress)
                else:
                    rec = self.w.store.get_job(self.job.tenant, self.job.job_id)
                self._cancel = self._cancel or rec.cancel_requested
                if time.monotonic() - last_beat > self.w.heartbeat_s:
                    last_beat = time.monotonic()
                    self.w.queue.heartbeat(self.claim)
            except StoreError as e:
                log.debug("heartbeat for %s: %s", self.job.job_id, e)
