"""The store contract, run against the local directory store and the Redis store alike."""
from __future__ import annotations

import hashlib
import threading

import pytest

from prompt_store import (
    InvalidId,
    JobFinished,
    JobNotFound,
    JobRecord,
    StoreConflict,
    TaskNotFound,
    VersionNotFound,
)
from tests.prompt_store.conftest import Backend, make_blob, meta_for


def test_put_creates_numbered_versions_and_flips_current(store) -> None:
    b1, b2 = make_blob(1), make_blob(2, 9000)
    v1 = store.put_task("acme", "cats", b1, meta_for(b1))
    v2 = store.put_task("acme", "cats", b2, meta_for(b2, method="vpt-deep"))
    assert (v1.version, v2.version) == (1, 2)
    assert v2.size_bytes == 9000 and v2.sha256 == hashlib.sha256(b2).hexdigest()
    assert store.current_version("acme", "cats") == 2
    record, blob = store.get_task("acme", "cats")
    assert record == v2 and blob == b2 and record.metadata["method"] == "vpt-deep"
    old, old_blob = store.get_task("acme", "cats", version=1)
    assert old == v1 and old_blob == b1


def test_info_and_listings(store) -> None:
    for i, task in enumerate(["b-task", "a.task", "b-task"]):
        store.put_task("acme", task, make_blob(i), {"n": str(i)})
    store.put_task("other", "zzz", make_blob(9), {})
    info = store.get_info("acme", "b-task")
    assert (info.current_version, info.num_versions) == (2, 2)
    assert info.current.metadata == {"n": "2"} and info.created_at <= info.updated_at
    assert [t.task_id for t in store.list_tasks("acme")] == ["a.task", "b-task"]
    assert [t.task_id for t in store.list_tasks("other")] == ["zzz"]
    assert store.list_tasks("nobody") == []
    assert [v.version for v in store.list_versions("acme", "b-task")] == [1, 2]


def test_activate_rolls_back_and_forward(store) -> None:
    blobs = [make_blob(i) for i in range(3)]
    for b in blobs:
        store.put_task("t1", "task", b, meta_for(b))
    assert store.activate("t1", "task", 1).version == 1
    assert store.get_task("t1", "task")[1] == blobs[0]
    assert store.get_info("t1", "task").current_version == 1
    store.activate("t1", "task", 3)
    assert store.current_version("t1", "task") == 3
    with pytest.raises(VersionNotFound):
        store.activate("t1", "task", 7)
    with pytest.raises(VersionNotFound):
        store.get_task("t1", "task", version=0)
    with pytest.raises(TaskNotFound):
        store.activate("t1", "missing", 1)


def test_missing_things_raise_typed_errors(store) -> None:
    with pytest.raises(TaskNotFound):
        store.get_task("t1", "nope")
    with pytest.raises(TaskNotFound):
        store.get_info("t1", "nope")
    with pytest.raises(TaskNotFound):
        store.list_versions("t1", "nope")
    with pytest.raises(TaskNotFound):
        store.delete_task("t1", "nope")
    store.put_task("t1", "x", b"abc", {})
    with pytest.raises(VersionNotFound):
        store.get_task("t1", "x", version=2)
    with pytest.raises(JobNotFound):
        store.get_job("t1", "job-none")


@pytest.mark.parametrize("bad", ["", ".", "..", "a/b", "a:b", "x" * 65, "sp ace", "é", "a\nb", "../etc"])
def test_bad_ids_are_refused_everywhere(store, bad: str) -> None:
    with pytest.raises(InvalidId):
        store.put_task("t1", bad, b"x", {})
    with pytest.raises(InvalidId):
        store.put_task(bad, "task", b"x", {})
    with pytest.raises(InvalidId):
        store.get_task("t1", bad)
    with pytest.raises(InvalidId):
        store.get_job(bad, "job-1")


def test_tenants_are_isolated(store) -> None:
    store.put_task("alice", "shared-name", b"alice's", {})
    with pytest.raises(TaskNotFound):
        store.get_task("bob", "shared-name")
    store.create_job(JobRecord.new("alice", "shared-name", job_id="job-a"))
    with pytest.raises(JobNotFound):
        store.get_job("bob", "job-a")
    assert store.list_jobs("bob") == []


def test_delete_removes_all_versions_and_numbers_never_repeat(store) -> None:
    store.put_task("t1", "task", make_blob(1), {})
    store.put_task("t1", "task", make_blob(2), {})
    store.delete_task("t1", "task")
    with pytest.raises(TaskNotFound):
        store.get_task("t1", "task")
    with pytest.raises(TaskNotFound):
        store.get_task("t1", "task", version=1)
    assert store.list_tasks("t1") == []
    again = store.put_task("t1", "task", make_blob(3), {})
    assert again.version == 3  # a cached (t1, task, 1|2) can never name the new content
    assert [v.version for v in store.list_versions("t1", "task")] == [3]
    assert store.get_info("t1", "task").num_versions == 1


def test_two_clients_share_data(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    a.put_task("t1", "task", b"one", {"k": "v"})
    assert b.get_task("t1", "task")[1] == b"one"
    b.activate("t1", "task", 1)
    assert a.current_version("t1", "task") == 1


def test_job_crud_and_listing_order(store) -> None:
    jobs = [JobRecord.new("t1", task, options={"epochs": 2}, now=1000.0 + i, job_id=f"job-{i}")
            for i, task in enumerate(["a", "b", "a"])]
    for job in jobs:
        assert store.create_job(job) == job
    with pytest.raises(StoreConflict):
        store.create_job(jobs[0])
    assert [j.job_id for j in store.list_jobs("t1")] == ["job-2", "job-1", "job-0"]
    assert [j.job_id for j in store.list_jobs("t1", task_id="a")] == ["job-2", "job-0"]
    running = store.update_job("t1", "job-1", state="running", worker="w1", progress={"step": 3})
    assert running.started_at is not None and running.worker == "w1" and running.progress == {"step": 3}
    assert store.get_job("t1", "job-1") == running
    assert [j.job_id for j in store.list_jobs("t1", state="running")] == ["job-1"]
    done = store.update_job("t1", "job-1", state="succeeded", version=4, metrics={"acc": 0.9})
    assert done.finished_at is not None and done.version == 4
    with pytest.raises(JobFinished):
        store.update_job("t1", "job-1", state="running")
    with pytest.raises(StoreConflict):
        store.update_job("t1", "job-0", expect_states={"running"}, state="failed")
    with pytest.raises(JobNotFound):
        store.update_job("t1", "job-x", state="running")
    with pytest.raises(TypeError):
        store.update_job("t1", "job-0", tenant="mallory")
    store.create_job(JobRecord.new("t2", "z", job_id="job-z", now=999.0))
    everything = store.list_all_jobs()
    assert [j.job_id for j in everything] == ["job-z", "job-0", "job-1", "job-2"]
    assert {j.job_id for j in store.list_all_jobs({"queued"})} == {"job-z", "job-0", "job-2"}


def test_concurrent_job_updates_lose_no_field(store) -> None:
    """Each thread owns one field; a non-atomic read-modify-write would put back a stale value."""
    store.create_job(JobRecord.new("t1", "task", job_id="job-c"))
    fields = {"progress": lambda i: {"step": i}, "metrics": lambda i: {"acc": i},
              "worker": lambda i: f"w{i}", "options": lambda i: {"epochs": i}}

    def writer(name: str) -> None:
        for i in range(15):
            store.update_job("t1", "job-c", **{name: fields[name](i)})

    threads = [threading.Thread(target=writer, args=(name,)) for name in fields]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    job = store.get_job("t1", "job-c")
    assert job.progress == {"step": 14} and job.metrics == {"acc": 14}
    assert job.worker == "w14" and job.options == {"epochs": 14} and job.state == "queued"


def test_task_lock_is_exclusive_refreshable_and_releasable(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    assert a.try_lock_task("t1", "task", "job-1", ttl_s=30)
    assert not b.try_lock_task("t1", "task", "job-2", ttl_s=30)
    assert b.task_lock_holder("t1", "task") == "job-1"
    assert a.try_lock_task("t1", "task", "job-1", ttl_s=30)  # refresh by the holder
    assert b.try_lock_task("t1", "other-task", "job-2", ttl_s=30)  # per task
    assert not b.release_task_lock("t1", "task", "job-2")
    assert a.release_task_lock("t1", "task", "job-1")
    assert b.try_lock_task("t1", "task", "job-2", ttl_s=30)


def test_task_lock_expires(store) -> None:
    assert store.try_lock_task("t1", "task", "job-1", ttl_s=0.05)
    deadline = threading.Event()
    deadline.wait(0.15)
    assert store.task_lock_holder("t1", "task") is None
    assert store.try_lock_task("t1", "task", "job-2", ttl_s=30)


def test_ping_and_metadata_type_checks(store) -> None:
    store.ping()
    with pytest.raises(TypeError):
        store.put_task("t1", "task", "not bytes", {})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        store.put_task("t1", "task", b"x", {"n": 3})  # type: ignore[dict-item]
