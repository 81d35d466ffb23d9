"""The HTTP surface against a real uvicorn process: tasks, predict, errors, limits, metrics."""
from __future__ import annotations

import concurrent.futures as cf

import httpx
import pytest

from tests.server.helpers import backbone_for, constant_task, png
from vpt.task import TaskParams, TaskSpec, save_task_file


@pytest.fixture(scope="module")
def api(live_server) -> httpx.Client:
    with httpx.Client(base_url=live_server.base_url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def bb(tiny_vit_file):
    return backbone_for(str(tiny_vit_file))


def put_task(api: httpx.Client, task: str, blob: bytes) -> dict:
    r = api.put(f"/tasks/{task}/import", content=blob, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return r.json()


def error_code(r: httpx.Response) -> str:
    return r.json()["error"]["code"]


def test_import_predict_versions_export_activate_delete(api: httpx.Client, bb) -> None:
    t = put_task(api, "lifecycle", constant_task(bb, ["cat", "dog", "owl"], winner=1))
    assert t["current_version"] == 1 and t["classes"] == ["cat", "dog", "owl"] and t["method"] == "vpt-deep"
    r = api.post("/predict", params={"task": "lifecycle", "top_k": 2}, files=[("image", ("a.png", png(1), "image/png")),
                                                                               ("image", ("b.png", png(2), "image/png"))])
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["version"] == 1 and len(body["results"]) == 2
    assert [res["top_k"][0]["label"] for res in body["results"]] == ["dog", "dog"]
    assert body["results"][0]["filename"] == "a.png" and len(body["results"][0]["top_k"]) == 2
    assert abs(sum(x["score"] for x in body["results"][0]["top_k"]) - 1.0) < 0.01  # 2 of 3 classes, one dominant
    # raw body predict
    r = api.post("/predict", params={"task": "lifecycle"}, content=png(3), headers={"content-type": "image/png"})
    assert r.status_code == 200 and r.json()["results"][0]["top_k"][0]["label"] == "dog"
    assert len(r.json()["results"][0]["top_k"]) == 3  # top_k 5 capped at the class count
    # a second version, then rollback
    put_task(api, "lifecycle", constant_task(bb, ["cat", "dog", "owl"], winner=2))
    assert api.post("/predict", params={"task": "lifecycle"}, content=png(3),
                    headers={"content-type": "image/png"}).json()["results"][0]["top_k"][0]["label"] == "owl"
    versions = api.get("/tasks/lifecycle/versions").json()["versions"]
    assert [(v["version"], v["current"]) for v in versions] == [(1, False), (2, True)]
    r = api.post("/tasks/lifecycle/versions/1/activate")
    assert r.status_code == 200 and r.json()["current_version"] == 1
    r = api.post("/predict", params={"task": "lifecycle"}, content=png(3), headers={"content-type": "image/png"})
    assert r.json()["version"] == 1 and r.json()["results"][0]["top_k"][0]["label"] == "dog"
    # export -> import elsewhere gives the same predictions
    exported = api.get("/tasks/lifecycle/export", params={"version": 2})
    assert exported.status_code == 200 and exported.headers["x-task-version"] == "2"
    put_task(api, "copy", exported.content)
    r = api.post("/predict", params={"task": "copy"}, content=png(4), headers={"content-type": "image/png"})
    assert r.json()["results"][0]["top_k"][0]["label"] == "owl"
    assert {t["task_id"] for t in api.get("/tasks").json()["tasks"]} >= {"lifecycle", "copy"}
    assert api.delete("/tasks/copy").status_code == 204
    assert error_code(api.get("/tasks/copy")) == "task_not_found"
    r = api.post("/predict", params={"task": "copy"}, content=png(4), headers={"content-type": "image/png"})
    assert r.status_code == 404 and error_code(r) == "task_not_found"


def test_concurrent_mixed_predictions_get_their_own_labels(api: httpx.Client, bb) -> None:
    tasks = {f"mix{i}": (constant_task(bb, [f"t{i}-a", f"t{i}-b", f"t{i}-c", f"t{i}-d"][: 2 + i % 3], winner=i % 2,
                                       method=m, p=3 + i, seed=i), f"t{i}-{'ab'[i % 2]}")
             for i, m in enumerate(["vpt-deep", "vpt-shallow", "linear", "vpt-deep", "vpt-shallow", "linear"])}
    for name, (blob, _) in tasks.items():
        put_task(api, name, blob)
    names = list(tasks) * 8

    def call(i: int) -> tuple[str, str]:
        name = names[i]
        r = api.post("/predict", params={"task": name}, content=png(i), headers={"content-type": "image/png"})
        assert r.status_code == 200, r.text
        return name, r.json()["results"][0]["top_k"][0]["label"]

    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(call, range(len(names))))
    assert all(label == tasks[name][1] for name, label in results)
    metrics = api.get("/metrics").text
    assert "vpt_batch_images_count" in metrics and 'vpt_predictions_total{task="mix0",tenant="default"}' in metrics
    decoded = next(float(line.split()[1]) for line in metrics.splitlines() if line.startswith("vpt_decoded_images_total"))
    assert decoded >= len(names)  # the single process counts its decoding too (earlier tests' images included)


@pytest.mark.parametrize("case", ["corrupt", "empty", "text", "wrong_type", "no_image_field", "bad_topk",
                                  "invalid_id", "unknown_task", "missing_task_param", "too_many",
                                  "far_too_many"])
def test_bad_predict_requests_are_4xx_with_a_code(api: httpx.Client, bb, case: str) -> None:
    if case == "corrupt":
        put_task(api, "target", constant_task(bb, ["x", "y"], winner=0))
    params = {"task": "target"}
    kw: dict = {"content": png(0), "headers": {"content-type": "image/png"}}
    expected = {"corrupt": (400, "image_invalid"), "empty": (400, "image_invalid"), "text": (400, "image_invalid"),
                "wrong_type": (415, "unsupported_media_type"), "no_image_field": (400, "bad_request"),
                "bad_topk": (422, "validation_error"), "invalid_id": (400, "invalid_task_id"),
                "unknown_task": (404, "task_not_found"), "missing_task_param": (422, "validation_error"),
                "too_many": (413, "payload_too_large"), "far_too_many": (413, "payload_too_large")}[case]
    if case == "corrupt":
        kw["content"] = png(0)[:40]
    elif case == "empty":
        kw["content"] = b""
    elif case == "text":
        kw = {"files": [("image", ("notes.txt", b"hello, world", "text/plain"))]}
    elif case == "wrong_type":
        kw["headers"] = {"content-type": "application/json"}
    elif case == "no_image_field":
        kw = {"files": [("picture", ("a.png", png(0), "image/png"))]}
    elif case == "bad_topk":
        params["top_k"] = "0"
    elif case == "invalid_id":
        params["task"] = "no/such"
    elif case == "unknown_task":
        params["task"] = "never-created"
    elif case == "missing_task_param":
        params = {}
    elif case in ("too_many", "far_too_many"):  # one past the limit (64) or many past it: the same answer
        kw = {"files": [("image", (f"{i}.png", png(i), "image/png")) for i in range(65 if case == "too_many" else 70)]}
    r = api.post("/predict", params=params, **kw)
    assert (r.status_code, error_code(r)) == expected, r.text
    if case.endswith("too_many"):
        assert r.json()["error"]["message"] == "more than 64 files; at most 64 per request"
    assert api.get("/healthz").status_code == 200


def test_bad_imports_are_refused_and_nothing_is_stored(api: httpx.Client, bb, tiny_vit_file) -> None:
    good = constant_task(bb, ["a", "b"], winner=0)
    put_task(api, "guarded", good)
    for blob, code in [(b"garbage" * 10, "task_file_invalid"), (good[:-100], "task_file_invalid")]:
        r = api.put("/tasks/guarded/import", content=blob)
        assert r.status_code == 422 and error_code(r) == code
    from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
    from vpt.backbone import load_backbone

    other = load_backbone(TINY_NAME, pretrained=False, model_kwargs=TINY_KWARGS)
    foreign = save_task_file(TaskParams.new(TaskSpec("vpt-deep", 2, ("a", "b")), other), other)
    r = api.put("/tasks/guarded/import", content=foreign)
    assert r.status_code == 422 and error_code(r) == "backbone_mismatch"
    r = api.put("/tasks/guarded/import", content=b"")
    assert r.status_code == 400
    assert api.get("/tasks/guarded").json()["num_versions"] == 1  # nothing stored by the refused imports


def test_routes_404_and_validation(api: httpx.Client) -> None:
    assert error_code(api.get("/tasks/nope")) == "task_not_found"
    assert error_code(api.get("/tasks/nope/versions")) == "task_not_found"
    assert error_code(api.post("/tasks/nope/versions/1/activate")) == "task_not_found"
    assert error_code(api.get("/tasks/nope/export")) == "task_not_found"
    assert error_code(api.get("/jobs/nope")) == "job_not_found"
    assert error_code(api.post("/jobs/nope/cancel")) == "job_not_found"
    assert error_code(api.get("/jobs/nope/events")) == "job_not_found"
    assert api.get("/jobs", params={"state": "exploded"}).status_code == 400
    assert api.post("/tasks/lifecycle/versions/99/activate").status_code == 404
    assert api.get("/no/such/route").json()["error"]["code"] == "not_found"
    r = api.get("/backbone")
    assert r.status_code == 200 and r.json()["input_size"] == [3, 32, 32]
    assert api.get("/readyz").json()["status"] == "ready"
    assert api.get("/openapi.json").json()["paths"]["/predict"]["post"]


def test_request_ids_are_echoed(api: httpx.Client) -> None:
    r = api.get("/tasks/nope", headers={"x-request-id": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123" and r.json()["error"]["request_id"] == "abc-123"
