"""Answers parse into the typed models, extra fields kept; each resource hits its documented route."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest
from vpt_client import AsyncClient, Backbone, Client, Job, Prediction, Task, Version

from tests.client import samples
from tests.client.fake_server import FakeServer, error, reply


def test_task_version_backbone_models(server: FakeServer, client: Client) -> None:
    server.on("GET", "/tasks", reply(200, {"tasks": [samples.TASK, {"task_id": "bare"}]}))
    server.on("GET", "/tasks/digits", reply(200, samples.TASK))
    server.on("GET", "/tasks/digits/versions", reply(200, {"versions": [samples.VERSION]}))
    server.on("GET", "/backbone", reply(200, samples.BACKBONE))
    tasks = client.tasks.list()
    assert [t.task_id for t in tasks] == ["digits", "bare"]
    task = client.tasks.get("digits")
    assert isinstance(task, Task) and task == tasks[0]
    assert task.created_at == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert (task.current_version, task.num_prompts, task.classes) == (2, 10, ["0", "1", "2"])
    assert task.metrics == {"val_acc": 0.97}
    assert task.model_extra == {"tenant_note": "extra"}
    assert tasks[1].classes == [] and tasks[1].current_version is None
    (version,) = client.tasks.versions("digits")
    assert isinstance(version, Version) and version.version == 1 and version.current is False
    assert version.metrics is None and version.model_extra == {"sha": "x"}
    backbone = client.backbone()
    assert isinstance(backbone, Backbone) and backbone.input_size == [3, 32, 32]
    assert backbone.model_extra == {"params": 12345}
    assert {r.headers["authorization"] for r in server.requests} == {"Bearer k-test"}


def test_job_and_prediction_models(server: FakeServer, client: Client) -> None:
    server.on("GET", "/jobs", reply(200, {"jobs": [samples.job("queued", epoch=None), samples.job("running")]}))
    server.on("POST", "/jobs/j-1/cancel", reply(200, samples.job("cancelled")))
    server.on("POST", "/predict", reply(200, samples.PREDICTION))
    queued, running = client.jobs.list(task="digits", state="running")
    assert server.requests[0].query == {"task": ["digits"], "state": ["running"]}
    assert queued.progress is None and not queued.done and queued.started_at is None
    assert running.progress is not None and running.progress.epoch == 1 and running.progress.fraction == 0.25
    assert running.model_extra == {"worker": "w-1"}
    cancelled = client.jobs.cancel("j-1")
    assert isinstance(cancelled, Job) and cancelled.done and not cancelled.succeeded
    pred = client.predict("digits", b"\x89PNG\r\n\x1a\n")
    assert isinstance(pred, Prediction)
    assert pred.labels == ["7", "3"]
    assert pred.results[0].score == 0.9 and pred.results[1].filename is None
    assert pred.results[0].top_k[1].index == 1
    assert pred.timings_ms is not None and pred.timings_ms.total == 5.1


def test_failed_job_error_object(server: FakeServer, client: Client) -> None:
    server.on("GET", "/jobs/j-2", reply(200, samples.job("failed", error={"code": "dataset_empty_class",
                                                                         "message": "class 3 is empty"})))
    job = client.jobs.get("j-2")
    assert job.error is not None and job.error.code == "dataset_empty_class"
    assert job.done and not job.succeeded


def test_health_and_readiness(server: FakeServer, client: Client) -> None:
    server.on("GET", "/healthz", reply(200, {"status": "ok"}))
    server.on("GET", "/readyz", reply(200, {"status": "ready", "checks": {"store": "ok", "backbone": "ok"}}),
              error(503, "not_ready", "backbone loading", {"backbone": "loading"}))
    assert client.health().status == "ok"
    ready = client.ready()
    assert ready.ready and ready.checks == {"store": "ok", "backbone": "ok"}
    not_ready = client.ready()
    assert not not_ready.ready and not_ready.status == "not_ready"
    assert not_ready.checks == {"backbone": "loading"} and not_ready.message == "backbone loading"
    assert len(server.calls("GET", "/readyz")) == 2  # the 503 was not retried


def test_routes_and_path_quoting(server: FakeServer, client: Client) -> None:
    server.on("DELETE", "/tasks/a b/c", reply(204))
    server.on("POST", "/tasks/digits/versions/1/activate", reply(200, samples.TASK))
    client.tasks.delete("a b/c")
    assert server.requests[0].raw_path == b"/tasks/a%20b%2Fc"
    assert client.tasks.activate("digits", 1).task_id == "digits"
    assert server.requests[1].method == "POST"


async def test_async_resources_parse_the_same(server: FakeServer, aclient: AsyncClient) -> None:
    server.on("GET", "/tasks", reply(200, {"tasks": [samples.TASK]}))
    server.on("GET", "/tasks/digits/versions", reply(200, {"versions": [samples.VERSION]}))
    server.on("GET", "/jobs/j-1", reply(200, samples.job("succeeded", version=3)))
    server.on("GET", "/backbone", reply(200, samples.BACKBONE))
    server.on("POST", "/predict", reply(200, samples.PREDICTION))
    server.on("GET", "/healthz", reply(200, {"status": "ok"}))
    server.on("GET", "/readyz", error(503, "not_ready", "loading"))
    assert (await aclient.tasks.list())[0].model_extra == {"tenant_note": "extra"}
    assert (await aclient.tasks.versions("digits"))[0].version == 1
    job = await aclient.jobs.get("j-1")
    assert job.succeeded and job.version == 3 and job.metrics == {"val_acc": 0.93}
    assert (await aclient.backbone()).embed_dim == 64
    assert (await aclient.predict("digits", b"x", top_k=2)).labels == ["7", "3"]
    assert (await aclient.health()).status == "ok"
    assert not (await aclient.ready()).ready


def test_env_vars_give_base_url_and_key(server: FakeServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VPT_BASE_URL", server.url + "/")
    monkeypatch.setenv("VPT_API_KEY", "from-env")
    server.on("GET", "/healthz", reply(200, {"status": "ok"}))
    with Client() as client:
        assert client.base_url == server.url
        client.health()
    with Client(api_key="explicit") as client:
        client.health()
    monkeypatch.delenv("VPT_BASE_URL")
    monkeypatch.delenv("VPT_API_KEY")
    with Client() as client:
        assert client.base_url == "http://127.0.0.1:8000" and client.api_key is None
    assert [r.headers["authorization"] for r in server.requests] == ["Bearer from-env", "Bearer explicit"]
    assert server.requests[0].headers["user-agent"].startswith("vpt-client/")
