"""docker-compose.yml for real: Redis, two servers, two workers and the proxy on the CPU.

One scenario on one stack (starting it is the expensive part): train through one replica and watch
its server-sent events through the proxy, predict from the other, hot-swap and roll back and see
both replicas follow, kill the worker running a job (recovered, published once), kill Redis
(acknowledged versions survive: append-only, fsync always), `down` then `up` (tasks kept), and
refuse calls without the API key and Redis clients without the password.
"""
from __future__ import annotations

import json

import httpx
import pytest

from tests.deploy.stack import Stack, docker, wait_for
from tests.fixtures.digits import digit_png, make_digits_zip

# the first build downloads torch into the image; starting the stack takes minutes on a busy host
pytestmark = [pytest.mark.docker, pytest.mark.timeout(5400)]

TRAIN = {"method": "vpt-deep", "num_prompts": "4", "batch_size": "8", "augmentation": "none", "base_lr": "10",
         "weight_decay": "0"}


def _predict(c: httpx.Client, task: str) -> dict:
    r = c.post("/predict", params={"task": task}, content=digit_png(1, index=150),
               headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    return r.json()


def _serves(c: httpx.Client, task: str, version: int) -> bool:
    return _predict(c, task)["version"] == version


def _events(c: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """The job's server-sent events until `end`."""
    events, name = [], ""
    with c.stream("GET", f"/jobs/{job_id}/events", timeout=600) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
                if name == "end":
                    break
    return events


def _train(c: httpx.Client, task: str, archive: bytes, epochs: int) -> str:
    r = c.post(f"/tasks/{task}/train", files={"dataset": ("d.zip", archive)}, data={**TRAIN, "epochs": str(epochs)})
    assert r.status_code == 202, r.text
    return r.json()["job_id"]


def _check_auth(stack: Stack, a_url: str) -> None:
    for c in (stack.client(key=None), stack.client(a_url, key=None), stack.client(key="not-a-key")):
        r = c.get("/tasks")
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
    (redis,) = stack.containers("redis")
    refused = docker("exec", redis, "redis-cli", "get", "anything", check=False)
    assert "NOAUTH" in refused, refused  # the password is enforced, not only configured


def _train_swap_and_roll_back(stack: Stack, a: httpx.Client, b: httpx.Client, archive: bytes) -> None:
    job_id = _train(a, "digits", archive, epochs=3)
    events = _events(stack.client(), job_id)               # through the proxy, unbuffered
    progress = [e for name, e in events if name == "progress"]
    assert events[-1][0] == "end" and progress[-1]["state"] == "succeeded", progress[-1]
    assert any(e["state"] == "running" for e in progress)   # seen while it ran, not only at the end
    assert _predict(b, "digits")["version"] == 1            # trained through A, served by B

    # hot swap: version 2 imported through A is served by both; rolling back through B reaches both
    exported = a.get("/tasks/digits/export")
    assert exported.status_code == 200
    r = a.put("/tasks/digits/import", content=exported.content)
    assert r.status_code == 201 and r.json()["current_version"] == 2, r.text
    for c in (a, b):
        wait_for("version 2 served", lambda c=c: _serves(c, "digits", 2), timeout=60, every=0.1)
    r = b.post("/tasks/digits/versions/1/activate")
    assert r.status_code == 200 and r.json()["current_version"] == 1, r.text
    for c in (a, b):
        wait_for("rolled back to version 1", lambda c=c: _serves(c, "digits", 1), timeout=60, every=0.1)


def _kill_a_worker_mid_job(stack: Stack, a: httpx.Client, b: httpx.Client, archive: bytes) -> None:
    workers = stack.containers("worker")
    assert len(workers) == 2
    job_id = _train(a, "recovered", archive, epochs=30)
    job = wait_for("the job running", lambda: (j := b.get(f"/jobs/{job_id}").json())["state"] == "running"
                   and j["progress"].get("step", 0) > 0 and j, timeout=600, every=0.2)
    victim = next(w for w in workers if job["worker"].startswith(w[:12]))   # hostname = short container id
    docker("kill", victim)
    done = wait_for("the job recovered", lambda: (j := a.get(f"/jobs/{job_id}").json())["state"]
                    in ("succeeded", "failed", "cancelled") and j, timeout=900, every=1)
    assert done["state"] == "succeeded", done
    assert not done["worker"].startswith(victim[:12])
    versions = b.get("/tasks/recovered/versions").json()["versions"]
    assert [v["version"] for v in versions] == [1]         # published exactly once


def _kill_redis(stack: Stack, a: httpx.Client, b: httpx.Client) -> None:
    (redis,) = stack.containers("redis")
    docker("kill", redis)                                   # SIGKILL: no shutdown save, only the AOF
    docker("start", redis)
    for c in (a, b):
        wait_for("serving after Redis restarted", lambda c=c: _serves(c, "digits", 1), timeout=120)
    assert [v["version"] for v in a.get("/tasks/digits/versions").json()["versions"]] == [1, 2]
    assert [v["version"] for v in b.get("/tasks/recovered/versions").json()["versions"]] == [1]


def test_compose_stack(stack: Stack, tmp_path) -> None:
    stack.up()
    a_url, b_url = stack.server_urls()
    a, b = stack.client(a_url), stack.client(b_url)
    assert a.get("/backbone").json()["fingerprint"] == b.get("/backbone").json()["fingerprint"]
    _check_auth(stack, a_url)
    archive = make_digits_zip(tmp_path / "d.zip", classes=range(4), per_class=10).read_bytes()

    _train_swap_and_roll_back(stack, a, b, archive)
    _kill_a_worker_mid_job(stack, a, b, archive)
    _kill_redis(stack, a, b)

    # down (containers and network gone, volumes kept) and up again: the tasks are still there
    stack.run("down", "--timeout", "10")
    assert stack.containers("server") == []
    stack.up()
    a_url, b_url = stack.server_urls()
    a, b = stack.client(a_url), stack.client(b_url)
    assert {t["task_id"] for t in stack.client().get("/tasks").json()["tasks"]} == {"digits", "recovered"}
    for c in (a, b):
        assert _predict(c, "digits")["version"] == 1 and _predict(c, "recovered")["version"] == 1
