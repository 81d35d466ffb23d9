"""Distributed mode on a real redis-server: two API replicas, two `vpt-serve worker` processes."""
from __future__ import annotations

import time

import httpx

from tests.fixtures.digits import make_digits_zip
from tests.server.helpers import backbone_for, constant_task, png, running, wait_job


def test_replicas_workers_and_a_killed_worker(start_server, private_redis, tmp_path, tiny_vit_file) -> None:
    env = {"VPT_STORE": private_redis.url, "VPT_DATA_DIR": str(tmp_path / "shared"), "VPT_WORKERS": "0",
           "VPT_JOB_HEARTBEAT_S": "0.5", "VPT_JOB_STALE_S": "3"}
    a = start_server(env=env)
    b = start_server(env=env)
    workers = [start_server(env=env, command="worker", wait=False) for _ in range(2)]
    bb = backbone_for(str(tiny_vit_file))
    ca, cb = httpx.Client(base_url=a.base_url, timeout=60), httpx.Client(base_url=b.base_url, timeout=60)
    image = {"content": png(1), "headers": {"content-type": "image/png"}}

    # a version published through replica A is served by replica B, and so is the next one
    assert ca.put("/tasks/shared/import", content=constant_task(bb, ["x", "y"], winner=0)).status_code == 201
    assert cb.post("/predict", params={"task": "shared"}, **image).json()["results"][0]["top_k"][0]["label"] == "x"
    ca.put("/tasks/shared/import", content=constant_task(bb, ["x", "y"], winner=1)).raise_for_status()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        body = cb.post("/predict", params={"task": "shared"}, **image).json()
        if body["version"] == 2:
            break
        time.sleep(0.02)
    assert body["version"] == 2 and body["results"][0]["top_k"][0]["label"] == "y"

    # a training job claimed by a worker that is then killed is recovered by the other worker (the kill
    # comes within one 0.2 s poll of the first step, long before 300 steps end; the survivor then trains
    # them all again, so the job stays short enough for a loaded machine)
    archive = make_digits_zip(tmp_path / "d.zip", classes=range(4), per_class=10).read_bytes()
    r = ca.post("/tasks/digits/train", files={"dataset": ("d.zip", archive)},
                data={"method": "vpt-deep", "num_prompts": "4", "epochs": "60", "batch_size": "8",
                      "augmentation": "none", "base_lr": "10", "weight_decay": "0"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    job_running = wait_job(cb, job_id, running)
    victim = next(w for w in workers if f"-{w.proc.pid}-" in job_running["worker"])
    survivor = next(w for w in workers if w is not victim)
    victim.kill()
    done = wait_job(ca, job_id)
    assert done["state"] == "succeeded", (done["error"], done["worker"])
    assert f"-{survivor.proc.pid}-" in done["worker"]
    versions = cb.get("/tasks/digits/versions").json()["versions"]
    assert [v["version"] for v in versions] == [1]          # published exactly once
    r = cb.post("/predict", params={"task": "digits"}, **image)
    assert r.status_code == 200 and r.json()["version"] == 1
    # one training per task at a time, across replicas
    r1 = ca.post("/tasks/busy/train", files={"dataset": ("d.zip", archive)}, data={"epochs": "30"})
    r2 = cb.post("/tasks/busy/train", files={"dataset": ("d.zip", archive)}, data={"epochs": "30"})
    assert r1.status_code == 202 and r2.status_code == 409
    assert cb.post(f"/jobs/{r1.json()['job_id']}/cancel").status_code == 200
    ca.close()
    cb.close()
