"""The job queue: claims on job records across processes, fencing tokens, heartbeats, recovery by
heartbeat, the reaper, round-robin across tenants, restart survival, cancellation."""
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
    ClaimLost,
    JobFinished,
    JobQueue,
    JobRecord,
    LocalStore,
    RedisStore,
    open_queue,
    request_cancel,
)
from tests.prompt_store import _procs
from tests.prompt_store.conftest import Backend


def _job(tenant: str, job_id: str, now: float | None = None) -> JobRecord:
    return JobRecord.new(tenant, "task", job_id=job_id, now=now)


@pytest.fixture
def queue(store) -> Iterator[JobQueue]:
    q = open_queue(store)
    yield q
    q.close()


def test_claims_are_fifo_per_tenant_and_make_the_job_running(queue: JobQueue) -> None:
    for i in range(3):
        queue.submit(_job("t1", f"job-{i}", now=100.0 + i))
    assert queue.stats() == {"waiting": 3, "claimed": 0}
    claims = [queue.claim("w1", timeout_s=1) for _ in range(3)]
    assert [c.job_id for c in claims] == ["job-0", "job-1", "job-2"]
    assert all(c.worker == "w1" and c.token == 1 and c.tenant == "t1" for c in claims)
    job = queue.store.get_job("t1", "job-0")
    assert (job.state, job.worker, job.claim_token) == ("running", "w1", 1) and job.heartbeat_at is not None
    assert queue.stats() == {"waiting": 0, "claimed": 3}
    assert queue.claim("w1", timeout_s=0.1) is None
    for c in claims:
        queue.store.finish_job("t1", c.job_id, c.token, "succeeded")
        assert queue.ack(c)


def _claim_while_submitting(queue: JobQueue, submitter: JobQueue, wait_s: float, timeout_s: float):
    """What a blocking claim on `queue` gets when `submitter` submits a job `wait_s` after it started."""
    got = []
    t = threading.Thread(target=lambda: got.append(queue.claim("w1", timeout_s=timeout_s)))
    t.start()
    time.sleep(wait_s)
    submitter.submit(_job("t1", "job-late"))
    t.join(timeout=timeout_s)
    return got[0] if got else None


def test_blocking_claim_wakes_on_submit(queue: JobQueue) -> None:
    claim = _claim_while_submitting(queue, queue, wait_s=0.2, timeout_s=10)
    assert claim is not None and claim.job_id == "job-late"


def test_round_robin_across_tenants(queue: JobQueue) -> None:
    """One tenant's 5 queued jobs do not make another tenant's later job wait behind them all."""
    for i in range(5):
        queue.submit(_job("hog", f"hog-{i}", now=100.0 + i))
    queue.submit(_job("small", "small-0", now=200.0))
    queue.submit(_job("small", "small-1", now=201.0))
    order = [queue.claim("w1", timeout_s=1).job_id for _ in range(7)]
    assert order.index("small-0") <= 1 and order.index("small-1") <= 3
    assert [j for j in order if j.startswith("hog")] == [f"hog-{i}" for i in range(5)]


def test_a_stale_claim_is_recovered_and_fenced(queue: JobQueue) -> None:
    queue.submit(_job("t1", "job-1"))
    lost = queue.claim("stalled-worker", timeout_s=1)
    assert lost is not None
    assert queue.recover_stale(idle_ms=60_000, worker="w2") == []  # not stale yet
    time.sleep(0.3)
    recovered = queue.recover_stale(idle_ms=200, worker="w2")
    assert [(c.job_id, c.worker, c.token) for c in recovered] == [("job-1", "w2", 2)]
    with pytest.raises(ClaimLost):
        queue.heartbeat(lost)  # the old owner learns it lost the job
    with pytest.raises(ClaimLost):  # and can neither finish it...
        queue.store.finish_job("t1", "job-1", lost.token, "failed")
    with pytest.raises(ClaimLost):  # ...nor publish
        queue.store.publish_job("t1", "job-1", lost.token, b"blob", {"job_id": "job-1"})
    queue.heartbeat(recovered[0])
    assert queue.recover_stale(idle_ms=2000, worker="w3") == []  # the heartbeat made it fresh
    queue.store.finish_job("t1", "job-1", recovered[0].token, "succeeded")
    assert queue.ack(recovered[0])
    assert queue.stats() == {"waiting": 0, "claimed": 0}


def test_heartbeats_keep_a_job_from_being_recovered(queue: JobQueue) -> None:
    queue.submit(_job("t1", "job-1"))
    claim = queue.claim("w1", timeout_s=1)
    for _ in range(3):
        time.sleep(0.25)  # longer than idle_ms: without the heartbeat the job would be stale
        queue.heartbeat(claim, {"step": 1})
        assert queue.recover_stale(idle_ms=200, worker="w2") == []
    assert queue.store.get_job("t1", "job-1").progress == {"step": 1}


def test_a_requeued_job_is_claimed_again_under_a_new_token(queue: JobQueue) -> None:
    """What a worker does on shutdown: hand the job back; the old claim is fenced."""
    queue.submit(_job("t1", "job-1"))
    first = queue.claim("w1", timeout_s=1)
    assert queue.requeue(first).state == "queued"
    assert queue.stats() == {"waiting": 1, "claimed": 0}
    second = queue.claim("w2", timeout_s=1)
    assert (second.job_id, second.token) == ("job-1", 2)
    with pytest.raises(ClaimLost):
        queue.heartbeat(first)


def test_publish_is_fenced_atomic_and_idempotent(queue: JobQueue) -> None:
    store = queue.store
    queue.submit(_job("t1", "job-1"))
    claim = queue.claim("w1", timeout_s=1)
    job, version = store.publish_job("t1", "job-1", claim.token, b"v1", {"job_id": "job-1"}, metrics={"a": 1})
    assert (job.state, job.version, job.metrics) == ("succeeded", version.version, {"a": 1})
    again, same = store.publish_job("t1", "job-1", claim.token, b"v1", {"job_id": "job-1"})  # a retried publish
    assert (again.version, same.version) == (job.version, version.version)
    assert [v.version for v in store.list_versions("t1", "task")] == [version.version]  # one version
    with pytest.raises(JobFinished):  # the terminal state is written once
        store.finish_job("t1", "job-1", claim.token, "failed")
    with pytest.raises(JobFinished):
        store.update_job("t1", "job-1", state="succeeded", version=99)


def test_delete_fences_an_in_flight_publish(queue: JobQueue) -> None:
    from prompt_store.errors import TaskFenced

    store = queue.store
    store.put_task("t1", "task", b"v1", {})
    queue.submit(_job("t1", "job-1"))
    claim = queue.claim("w1", timeout_s=1)
    store.delete_task("t1", "task")  # between the worker's last cancel check and its publish
    with pytest.raises(TaskFenced):
        store.publish_job("t1", "job-1", claim.token, b"v2", {"job_id": "job-1"})
    with pytest.raises(Exception, match="not found"):
        store.get_info("t1", "task")  # the deleted task did not reappear
    queue.submit(_job("t1", "job-2"))  # a job created after the delete may create the task again
    claim2 = queue.claim("w1", timeout_s=1)
    assert claim2.job_id == "job-2"
    assert store.publish_job("t1", "job-2", claim2.token, b"v3", {})[1].version == 2


def test_the_reaper_requeues_then_fails_a_job_whose_worker_is_gone(backend: Backend) -> None:
    store = backend.open()
    queue = open_queue(store, stale_s=0.2, max_claims=2)
    queue.submit(_job("t1", "job-1"))
    first = queue.claim("w1", timeout_s=1)
    if backend.kind == "redis":
        queue.ack(first)  # a delivery acknowledged without an outcome (what used to leave jobs stuck)
    time.sleep(0.3)
    assert [(j.job_id, j.state) for j in queue.reap()] == [("job-1", "queued")]
    second = queue.claim("w2", timeout_s=1)
    assert (second.job_id, second.token) == ("job-1", 2)
    if backend.kind == "redis":
        queue.ack(second)
    time.sleep(0.3)
    failed = queue.reap()
    assert [(j.state, j.error["code"]) for j in failed] == [("failed", "worker_lost")]
    assert queue.claim("w3", timeout_s=0.2) is None


def test_cancel_ends_a_job_whose_worker_is_gone(store) -> None:
    queue = open_queue(store)
    queue.submit(_job("t1", "job-1"))
    queue.claim("w1", timeout_s=1)
    live = request_cancel(store, "t1", "job-1", stale_s=60)
    assert (live.state, live.cancel_requested) == ("running", True)  # a live worker is asked
    time.sleep(0.2)
    gone = request_cancel(store, "t1", "job-1", stale_s=0.1)
    assert gone.state == "cancelled"  # nobody would ever answer the request


def test_a_crashed_worker_process_job_is_recovered(backend: Backend) -> None:
    """A real worker process claims a job and dies without an outcome; another worker recovers it."""
    store = backend.open()
    queue = open_queue(store)
    queue.submit(_job("t1", "job-crash"))
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        future = pool.submit(_procs.claim_and_die, backend.url, backend.options, "w-crash")
        with pytest.raises(BrokenProcessPool):  # the child exits without answering
            future.result(timeout=60)
    assert queue.claim("w2", timeout_s=0.1) is None  # not waiting: running under the dead worker
    time.sleep(0.2)
    recovered = queue.recover_stale(idle_ms=100, worker="w2")
    assert [(c.job_id, c.token) for c in recovered] == [("job-crash", 2)]


def test_jobs_submitted_in_one_process_are_claimed_exactly_once_by_others(backend: Backend) -> None:
    """A front-end process submits; three worker processes claim concurrently; each job once."""
    ids = [f"job-{i:02d}" for i in range(12)]
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=4, mp_context=ctx) as pool:
        workers = [pool.submit(_procs.claim_all, backend.url, backend.options, f"w{i}", 3.0) for i in range(3)]
        assert pool.submit(_procs.submit_jobs, backend.url, backend.options, "t1", ids).result(60) == ids
        claimed = [c for w in workers for c in w.result(120)]
    assert sorted(j for j, _ in claimed) == ids
    assert all(token == 1 for _, token in claimed)
    store = backend.open()
    assert {store.get_job("t1", j).state for j in ids} == {"running"}


def test_queued_jobs_survive_a_restart(backend: Backend) -> None:
    store = backend.open()
    queue = open_queue(store)
    for i, state in enumerate(["queued", "running", "queued", "succeeded"]):
        queue.submit(_job("t1", f"job-{i}", now=100.0 + i))
        if state != "queued":
            store.update_job("t1", f"job-{i}", state=state)
    store.close()
    restarted = open_queue(backend.open())  # a new process: a new store client and queue
    claims = [restarted.claim("w1", timeout_s=0.5) for _ in range(3)]
    assert [c.job_id if c else None for c in claims] == ["job-0", "job-2", None]


def test_a_local_queue_needs_a_local_store(redis_url: str) -> None:
    from prompt_store import LocalJobQueue

    with pytest.raises(TypeError):
        LocalJobQueue(RedisStore(redis_url, prefix="x" + uuid.uuid4().hex[:8]))


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
    store.claim_job("t1", "job-1", "w1", stale_s=60)
    running = request_cancel(store, "t1", "job-1")
    assert running.state == "running" and running.cancel_requested
    store.update_job("t1", "job-2", state="succeeded")
    with pytest.raises(JobFinished):
        request_cancel(store, "t1", "job-2")


def test_a_store_written_before_the_active_index_keeps_its_queue(tmp_path) -> None:
    store = LocalStore(tmp_path / "store")
    store.create_job(_job("t1", "job-old"))
    store.paths.active("t1", "job-old").unlink()  # as a store from before the index has it
    claim = open_queue(store).claim("w1", timeout_s=1)
    assert claim is not None and claim.job_id == "job-old"
    store.close()


def _script_calls(client) -> int:
    stats = client.info("commandstats")
    return sum(stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("evalsha", "eval"))


def test_an_idle_redis_worker_blocks_instead_of_polling(redis_url: str) -> None:
    """An idle claim waits on the wake-up list: over 3 s it reads the streams a handful of times (it
    polled 30 times before), and a submit from another client still wakes it at once."""
    store = RedisStore(redis_url, prefix="w" + uuid.uuid4().hex[:10])
    other = RedisStore(redis_url, prefix=store.keys.prefix)
    queue, submitter = open_queue(store), open_queue(other)
    try:
        queue.submit(_job("t1", "job-first"))  # the tenant's stream and group exist from here on
        first = queue.claim("w1", timeout_s=1)
        assert first is not None
        store.client.delete(store.keys.queue_wake())
        before = _script_calls(store.client)
        assert queue.claim("w1", timeout_s=3) is None
        assert _script_calls(store.client) - before <= 6
        claim = _claim_while_submitting(queue, submitter, wait_s=0.3, timeout_s=30)
        assert claim is not None and claim.job_id == "job-late"
    finally:
        queue.close()
        submitter.close()
        store.close()
        other.close()
