"""Jobs across real `vpt-serve serve` processes on one local store: a second server leaves the first
one's jobs alone, a server that cannot bind its port touches nothing, SIGINT hands the running job
back and exits 0, and a SIGSTOPped worker whose job was recovered publishes nothing."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx

from prompt_store import LocalStore
from tests.fixtures.digits import make_digits_zip
from tests.server.helpers import running, wait_job

LONG = {"epochs": "1000", "batch_size": "4", "method": "vpt-shallow", "num_prompts": "2"}
FAST_BEATS = {"VPT_WORKERS": "1", "VPT_JOB_HEARTBEAT_S": "0.3", "VPT_JOB_STALE_S": "3"}
SLOW_STALE = {**FAST_BEATS, "VPT_JOB_STALE_S": "8"}  # generous on a loaded machine: nothing here is stale


def _store_job(root: Path, job_id: str):
    store = LocalStore(root)
    try:
        return store.get_job("default", job_id)
    finally:
        store.close()


def _wait(pred, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError("condition not met in time")


def test_two_servers_share_a_store_and_sigint_hands_the_job_back(start_server, tmp_path: Path) -> None:
    root = tmp_path / "store"
    archive = make_digits_zip(tmp_path / "d.zip", classes=range(3), per_class=6).read_bytes()
    first = start_server(env=SLOW_STALE)
    with httpx.Client(base_url=first.base_url, timeout=60) as c:
        job_id = c.post("/tasks/long/train", files={"dataset": ("d.zip", archive)}, data=LONG).json()["job_id"]
        wait_job(c, job_id, running)
    owner = _store_job(root, job_id).worker

    # the same store, started twice by mistake: the live job is left alone (no "interrupted" at start)
    second = start_server(env=SLOW_STALE)
    # and a third on the first one's port cannot start: it exits before touching any job or file
    third = start_server(env=SLOW_STALE, port=first.port, wait=False)
    assert third.proc.wait(120) == 2
    assert "address_unavailable" in third.log()
    time.sleep(9)  # longer than VPT_JOB_STALE_S: a heartbeat-based recovery must not steal a live job
    job = _store_job(root, job_id)
    assert (job.state, job.worker, job.claim_token) == ("running", owner, 1), job
    assert Path(job.dataset_path).exists()  # the second server's sweep left the live job's dataset

    # Ctrl-C: the first server stops its training at the next step, hands the job back, exits 0
    first.proc.send_signal(signal.SIGINT)
    assert first.proc.wait(60) == 0, first.log()
    # the second server (its worker was idle) picks the job up: a new claim, running again
    _wait(lambda: _store_job(root, job_id).claim_token == 2)
    with httpx.Client(base_url=second.base_url, timeout=60) as c:
        wait_job(c, job_id, running)
        assert c.post(f"/jobs/{job_id}/cancel").status_code == 200
        assert wait_job(c, job_id)["state"] == "cancelled"
    assert not Path(job.dataset_path).parent.exists()  # the dataset went with the job


def test_a_stalled_worker_publishes_nothing_after_recovery(start_server, tmp_path: Path) -> None:
    """SIGSTOP the server whose worker trains; another server recovers the job and publishes it;
    SIGCONT: the stalled worker finds its claim lost, stops, and the task has exactly one version."""
    root = tmp_path / "store"
    archive = make_digits_zip(tmp_path / "d.zip", classes=range(3), per_class=6).read_bytes()
    stalled = start_server(env=FAST_BEATS)
    with httpx.Client(base_url=stalled.base_url, timeout=60) as c:
        r = c.post("/tasks/once/train", files={"dataset": ("d.zip", archive)},
                   data={"epochs": "40", "batch_size": "4", "method": "vpt-shallow", "num_prompts": "2"})
        job_id = r.json()["job_id"]
        wait_job(c, job_id, running)
    os.killpg(stalled.proc.pid, signal.SIGSTOP)
    try:
        rescuer = start_server(env=FAST_BEATS)
        with httpx.Client(base_url=rescuer.base_url, timeout=60) as c:
            done = wait_job(c, job_id, timeout=600)
    finally:
        os.killpg(stalled.proc.pid, signal.SIGCONT)
    assert done["state"] == "succeeded", done
    _wait(lambda: "lost" in stalled.log(), timeout=60)  # the resumed worker learnt it lost the job
    time.sleep(2)
    store = LocalStore(root)
    try:
        assert [v.version for v in store.list_versions("default", "once")] == [1]
        job = store.get_job("default", job_id)
        assert (job.state, job.version, job.claim_token) == ("succeeded", 1, 2)
    finally:
        store.close()
    assert stalled.alive()
    stalled.proc.send_signal(signal.SIGTERM)
    assert stalled.proc.wait(60) == 0
