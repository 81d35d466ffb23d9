"""The sweep keeps what live jobs need and removes everything else a kill or a failure left behind."""
from __future__ import annotations

import os
import time
from pathlib import Path

from prompt_store import JobRecord, LocalStore, open_queue
from server.cleanup import sweep


def _make(path: Path, old: bool = True, folder: bool = False) -> Path:
    if folder:
        path.mkdir(parents=True, exist_ok=True)
        (path / "f").write_bytes(b"x")
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    if old:
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    return path


def test_sweep_removes_only_what_no_live_job_needs(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "store")
    data, work = tmp_path / "data", tmp_path / "work"
    queue = open_queue(store)
    for i, job_id in enumerate(("job-live", "job-ended")):
        queue.submit(JobRecord.new("t1", "task", job_id=job_id, now=100.0 + i))
    claim = queue.claim("w1", timeout_s=1)
    running = queue.claim("w1", timeout_s=1)
    assert (claim.job_id, running.job_id) == ("job-live", "job-ended")
    store.finish_job("t1", running.job_id, running.token, "failed")
    keep = [
        _make(data / "t1" / "job-live", folder=True),                 # its job is running
        _make(data / "t1" / "job-new", old=False, folder=True),          # a submit in progress
        _make(data / "incoming" / "upload-fresh", old=False),            # an upload being copied
        _make(work / "t1" / "job-live" / str(claim.token), folder=True),  # the current delivery
        _make(store.root / "tenants" / "t1" / "jobs" / "~tmp~fresh", old=False),
    ]
    gone = [
        _make(data / "t1" / running.job_id, folder=True),                # its job ended
        _make(data / "t1" / "job-unknown", folder=True),                 # no such job, and old
        _make(data / "incoming" / "upload-dead"),                        # a spool a kill left
        _make(work / "t1" / "job-live" / "0", folder=True),             # an earlier delivery's folder
        _make(work / "t1" / running.job_id / "1", folder=True),          # an ended job's work
        _make(store.root / "tenants" / "t1" / "jobs" / "~tmp~dead"),    # a write cut by a kill
    ]
    assert sweep(store, data, work) >= len(gone)
    assert all(p.exists() for p in keep), [p for p in keep if not p.exists()]
    assert not any(p.exists() for p in gone), [p for p in gone if p.exists()]
    store.close()


def test_a_submit_whose_delivery_fails_leaves_no_job_and_no_dataset(redis_url: str, tmp_path: Path) -> None:
    """Before: the record was created, then the enqueue failed, and the job stayed queued forever."""
    import uuid

    import pytest

    from prompt_store import RedisStore, StoreError
    from server.jobs import JobService
    from vpt.train import TrainOptions

    store = RedisStore(redis_url, prefix="s" + uuid.uuid4().hex[:10])
    store.client.set(store.keys.tenant_queue("t1"), "not a stream")  # every XADD to it fails
    service = JobService(store, open_queue(store), tmp_path / "uploads", tmp_path / "work")
    spool = _make(tmp_path / "spool", old=False)
    with pytest.raises(StoreError):
        service.submit("t1", "task", spool, ".zip", TrainOptions(epochs=1))
    assert store.list_jobs("t1") == []
    assert list((tmp_path / "uploads" / "t1").iterdir()) == []
    store.close()
