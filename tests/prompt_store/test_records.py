"""Records round-trip through JSON; job updates follow one set of rules; damage is RecordCorrupt."""
from __future__ import annotations

import json

import pytest

from prompt_store import (
    ChangeEvent,
    JobFinished,
    JobRecord,
    RecordCorrupt,
    StoreConflict,
    TaskInfo,
    TaskVersion,
    apply_job_update,
)

V = TaskVersion("t", "task", 2, 10.0, 5, "a" * 64, {"method": "vpt-deep"})


def test_records_round_trip_through_json() -> None:
    info = TaskInfo("t", "task", 2, 3, 1.0, 2.0, V)
    assert TaskVersion.from_dict(json.loads(json.dumps(V.to_dict()))) == V
    assert TaskInfo.from_dict(json.loads(json.dumps(info.to_dict()))) == info
    job = JobRecord.new("t", "task", options={"epochs": 3}, dataset_path="/tmp/d.zip")
    assert JobRecord.from_json(job.to_json()) == job
    assert job.state == "queued" and job.created_at == job.updated_at and not job.cancel_requested
    event = ChangeEvent("t", "task", 3, "put")
    assert ChangeEvent.from_dict(json.loads(event.to_json())) == event


BAD_JOBS = [b"not json", b"[1, 2]", b'{"job_id": "j"}',
            b'{"job_id": "j", "tenant": "t", "task_id": "x", "state": "exploded"}']


@pytest.mark.parametrize("bad", BAD_JOBS)
def test_damaged_job_records_are_record_corrupt(bad: bytes) -> None:
    with pytest.raises(RecordCorrupt):
        JobRecord.from_json(bad)


def test_damaged_versions_and_events_are_record_corrupt() -> None:
    with pytest.raises(RecordCorrupt):
        TaskVersion.from_dict({**V.to_dict(), "sha256": "short"})
    with pytest.raises(RecordCorrupt):
        TaskVersion.from_dict({**V.to_dict(), "metadata": {"n": 1}})
    with pytest.raises(RecordCorrupt):
        TaskInfo.from_dict({"tenant": "t"})
    with pytest.raises(RecordCorrupt):
        ChangeEvent.from_dict({"tenant": "t", "task_id": "x", "version": 1, "kind": "explode"})


def test_job_update_rules() -> None:
    job = JobRecord.new("t", "task", now=100.0)
    running = apply_job_update(job, {"state": "running", "worker": "w"}, now=101.0)
    assert (running.started_at, running.updated_at, running.finished_at) == (101.0, 101.0, None)
    failed = apply_job_update(running, {"state": "failed", "error": {"code": "x", "message": "y"}}, now=102.0)
    assert failed.finished_at == 102.0 and failed.started_at == 101.0 and failed.terminal
    assert apply_job_update(failed, {"progress": {"a": 1}}).progress == {"a": 1}
    with pytest.raises(JobFinished):  # a terminal state is written once
        apply_job_update(failed, {"state": "failed", "progress": {"a": 1}})
    with pytest.raises(JobFinished):
        apply_job_update(failed, {"state": "running"})
    with pytest.raises(JobFinished):
        apply_job_update(failed, {"cancel_requested": True}, expect_states={"queued", "running"})
    with pytest.raises(StoreConflict):
        apply_job_update(job, {"state": "running"}, expect_states={"running"})
    with pytest.raises(TypeError, match="unknown"):
        apply_job_update(job, {"colour": "red"})
    with pytest.raises(TypeError, match="cannot be changed"):
        apply_job_update(job, {"job_id": "other"})
    with pytest.raises(ValueError):
        apply_job_update(job, {"state": "exploded"})
