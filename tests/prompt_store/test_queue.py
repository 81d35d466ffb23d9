"""The job queue: claims, acks, recovery of a dead worker's job, restart survival, cancellation."""
from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import pytest

from prompt_store import (
    JobFinished,
    JobQueue,
    JobRecord,
    LocalJobQueue,
    LocalStore,
    RedisStore,
    StoreConflict,
    open_queue,
    request_cancel,
)
from tests.prompt_store import _procs
from tests.prompt_store.conftest import Backend


@pytest.fixture
def queue(store) -> Iterator[JobQueue]:
    q = open_queue(store)
    yield q
    q.close()


def test_fifo_claim_and_ack(queue: JobQueue) -> None:
    ids = [queue.enqueue("t1", f"job-{i}") for i in range(3)]
    assert len(set(ids)) == 3
    assert queue.stats() == {"waiting": 3, "claimed": 0}
    claims = [queue.claim("w1", timeout_s=1) for _ in range(3)]
    assert [c.job_id for c in claims] == ["job-0", "job-1", "job-2"]
    assert all(c.worker == "w1" and c.deliveries == 1 and c.tenant == "t1" for c in claims)
    assert queue.stats() == {"waiting": 0, "claimed": 3}
    assert queue.claim("w1", timeout_s=0.1) is None
    assert all(queue.ack(c) for c in claims)
    assert not queue.ack(claims[0])
    assert queue.stats() == {"waiting": 0, "claimed": 0}


def test_blocking_claim_wakes_on_enqueue(queue: JobQueue) -> None:
    got = []
    t = threading.Thread(target=lambda: got.append(queue.claim("w1", timeout_s=10)))
    t.start()
    time.sleep(0.2)
    queue.enqueue("t1", "job-late")
    t.join(timeout=10)
    assert got and got[0] is not None and got[0].job_id == "job-late"


def test_dead_workers_job_is_recovered_by_another(queue: JobQueue) -> None:
    queue.enqueue("t1", "job-1")
    lost = queue.claim("dead-worker", timeout_s=1)
    assert lost is not None
    assert queue.recover_stale(idle_ms=60_000, worker="w2") == []  # not stale yet
    time.sleep(0.15)
    recovered = queue.recover_stale(idle_ms=100, worker="w2")
    assert [(c.job_id, c.worker, c.deliveries) for c in recovered] == [("job-1", "w2", 2)]
    with pytest.raises(StoreConflict):
        queue.heartbeat(lost)  # the old owner learns it lost the job
    queue.heartbeat(recovered[0])
    assert queue.recover_stale(idle_ms=2000, worker="w3") == []  # the heartbeat made it fresh
    assert queue.ack(recovered[0])
    assert queue.stats() == {"waiting": 0, "claimed": 0}


def test_heartbeats_keep_a_job_from_being_recovered(queue: JobQueue) -> None:
    queue.enqueue("t1", "job-1")
    claim = queue.claim("w1", timeout_s=1)
    for _ in range(3):
        time.sleep(0.2)  # longer than idle_ms: without the heartbeat the job would be stale
        queue.heartbeat(claim)
        assert queue.recover_stale(idle_ms=150, worker="w2") == []
    assert queue.ack(claim)


def test_a_crashed_worker_process_job_is_recovered(redis_url: str) -> None:
    """A real worker process claims a job and dies without acking; another worker recovers it.
    (Redis only: the local queue is in-process, so a crash takes the queue with it.)"""
    options = {"prefix": "crash" + uuid.uuid4().hex[:8]}
    store = RedisStore(redis_url, **options)
    queue = open_queue(store)
    queue.enqueue("t1", "job-crash")
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        future = pool.submit(_procs.claim_and_die, redis_url, options, "w-crash")
        with pytest.raises(BrokenProcessPool):  # the child exits without answering
            future.result(timeout=60)
    assert queue.claim("w2", timeout_s=0.1) is None  # not waiting: pending for the dead worker
    time.sleep(0.1)
    recovered = queue.recover_stale(idle_ms=50, worker="w2")
    assert [(c.job_id, c.deliveries) for c in recovered] == [("job-crash", 2)]
    assert queue.ack(recovered[0])
    store.close()


def test_queued_jobs_survive_a_restart(backend: Backend) -> None:
    store = backend.open()
    for i, state in enumerate(["queued", "running", "queued", "succeeded"]):
        store.create_job(JobRecord.new("t1", "task", job_id=f"job-{i}", now=100.0 + i))
        if state != "queued":
            store.update_job("t1", f"job-{i}", state=state)
    if backend.kind == "redis":
        open_queue(store).enqueue("t1", "job-0")
        open_queue(store).enqueue("t1", "job-2")
    store.close()
    restarted = open_queue(backend.open())  # a new process: a new store client and queue
    claims = [restarted.claim("w1", timeout_s=0.5) for _ in range(3)]
    assert [c.job_id if c else None for c in claims] == ["job-0", "job-2", None]


def test_local_queue_enqueue_is_idempotent(tmp_path) -> None:
    store = LocalStore(tmp_path)
    store.create_job(JobRecord.new("t1", "task", job_id="job-1"))
    queue = LocalJobQueue(store)
    queue.enqueue("t1", "job-1")  # the server enqueueing what the restart already re-enqueued
    assert queue.stats()["waiting"] == 1
    store.close()


def test_task_lock_through_the_queue(backend: Backend) -> None:
    q1, q2 = open_queue(backend.open()), open_queue(backend.open())
    assert q1.try_lock_task("t1", "task", "job-1", ttl_s=30)
    assert not q2.try_lock_task("t1", "task", "job-2", ttl_s=30)
    assert q1.refresh_task_lock("t1", "task", "job-1", ttl_s=30)
    assert not q2.refresh_task_lock("t1", "task", "job-2", ttl_s=30)
    assert q1.release_task_lock("t1", "task", "job-1")
    assert q2.try_lock_task("t1", "task", "job-2", ttl_s=30)


def test_concurrent_lock_attempts_have_one_winner(backend: Backend) -> None:
    stores = [backend.open() for _ in range(4)]
    results: list[bool] = []
    barrier = threading.Barrier(len(stores))

    def attempt(i: int) -> None:
        barrier.wait()
        results.append(stores[i].try_lock_task("t1", "contested", f"job-{i}", ttl_s=30))

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(len(stores))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]


def test_request_cancel(store) -> None:
    for i in range(3):
        store.create_job(JobRecord.new("t1", "task", job_id=f"job-{i}"))
    queued = request_cancel(store, "t1", "job-0")
    assert queued.state == "cancelled" and queued.finished_at is not None
    store.update_job("t1", "job-1", state="running")
    running = request_cancel(store, "t1", "job-1")
    assert running.state == "running" and running.cancel_requested
    store.update_job("t1", "job-2", state="succeeded")
    with pytest.raises(JobFinished):
        request_cancel(store, "t1", "job-2")


def test_runner_flow_runs_a_job_at_most_once(store) -> None:
    """Two queues over one store both hold the job (e.g. after a restart); the record decides."""
    store.create_job(JobRecord.new("t1", "task", job_id="job-1"))
    q1, q2 = LocalJobQueue(store), LocalJobQueue(store)
    c1, c2 = q1.claim("w1", timeout_s=1), q2.claim("w2", timeout_s=1)
    assert c1 is not None and c2 is not None
    store.update_job("t1", "job-1", expect_states={"queued"}, state="running", worker=c1.worker)
    with pytest.raises(StoreConflict):
        store.update_job("t1", "job-1", expect_states={"queued"}, state="running", worker=c2.worker)
    assert store.get_job("t1", "job-1").worker == "w1"
