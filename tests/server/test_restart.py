"""A restart keeps tasks and job history; queued jobs survive; a killed server's running job is
recovered once its worker heartbeat is stale (re-queued and run again), never failed at startup."""
from __future__ import annotations

import os
import time

import httpx

from tests.fixtures.digits import make_digits_zip
from tests.server.helpers import backbone_for, constant_task, png, running, wait_job


def test_restart_keeps_tasks_jobs_and_queue(start_server, tmp_path, tiny_vit_file) -> None:
    bb = backbone_for(str(tiny_vit_file))
    archive = make_digits_zip(tmp_path / "d.zip", classes=range(3), per_class=6).read_bytes()
    first = start_server(env={"VPT_WORKERS": "1"})
    with httpx.Client(base_url=first.base_url, timeout=60) as c:
        assert c.put("/tasks/keep/import", content=constant_task(bb, ["a", "b"], winner=1)).status_code == 201
        # a long job: killed while running
        r = c.post("/tasks/long/train", files={"dataset": ("d.zip", archive)},
                   data={"epochs": "500", "method": "vpt-deep", "num_prompts": "2", "batch_size": "4"})
        long_id = r.json()["job_id"]
        wait_job(c, long_id, running)
        # queued behind it (one worker)
        r = c.post("/tasks/later/train", files={"dataset": ("d.zip", archive)},
                   data={"epochs": "1", "method": "linear", "batch_size": "8"})
        queued_id = r.json()["job_id"]
        assert c.get(f"/jobs/{queued_id}").json()["state"] == "queued"
    first.kill()  # no graceful shutdown: as a crash would
    # what other kills leave: a spool cut mid-upload, a temp file cut mid-write, an orphan dataset
    store = tmp_path / "store"
    leftovers = [store / "uploads" / "incoming" / "upload-killed", store / "tenants" / "default" / "jobs" / "~tmp~killed",
                 store / "uploads" / "default" / "job-gone" / "dataset.zip"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * 1000)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
    os.utime(leftovers[2].parent, (time.time() - 3600, time.time() - 3600))

    second = start_server(env={"VPT_WORKERS": "1", "VPT_JOB_STALE_S": "2"}, port=first.port)
    with httpx.Client(base_url=second.base_url, timeout=60) as c:
        assert c.get("/tasks/keep").json()["current_version"] == 1
        r = c.post("/predict", params={"task": "keep"}, content=png(0), headers={"content-type": "image/png"})
        assert r.json()["results"][0]["top_k"][0]["label"] == "b"
        wait_job(c, long_id, running)  # recovered by heartbeat and running again under the new worker
        assert c.post(f"/jobs/{long_id}/cancel").status_code == 200
        assert wait_job(c, long_id)["state"] == "cancelled"
        done = wait_job(c, queued_id)
        assert done["state"] == "succeeded", done
        assert c.get("/tasks/later").json()["current_version"] == done["version"] == 1
        assert {j["job_id"] for j in c.get("/jobs").json()["jobs"]} == {long_id, queued_id}
        assert c.get("/tasks/long").status_code == 404  # nothing half-published by the killed job
    assert not any(p.exists() for p in leftovers), [p for p in leftovers if p.exists()]
    for job_id in (long_id, queued_id):  # both ended: their datasets and work folders went with them
        assert not (store / "uploads" / "default" / job_id).exists()
        assert not (store / "work" / "default" / job_id).exists()
