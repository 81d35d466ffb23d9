"""Answers about tasks that a newcomer meets: a typo'd task id, a task whose first version is still
training, the image-count limit of `/predict`, datasets refused at submit, and the paged listings.
A real server with no training worker (`VPT_WORKERS=0`, so a first job stays queued), in one
process (`VPT_FRONTEND_WORKERS=0`)."""
from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator

import httpx
import pytest

from tests.server.helpers import constant_task, png


def digits_zip(classes: tuple[str, ...] = ("a", "b"), per_class: int = 2) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for c, label in enumerate(classes):
            for i in range(per_class):
                zf.writestr(f"{label}/{i}.png", png(i + 10 * c))
    return buf.getvalue()


@pytest.fixture(scope="module")
def idle(tmp_path_factory: pytest.TempPathFactory, tiny_vit_env: dict[str, str]) -> Iterator[httpx.Client]:
    from tests.fixtures.live_server import ServerProcess

    root = tmp_path_factory.mktemp("idle")
    server = ServerProcess({"VPT_STORE": str(root / "store"), "VPT_WORKERS": "0", "VPT_FRONTEND_WORKERS": "0",
                            "VPT_MAX_WAIT_MS": "5", **tiny_vit_env}, root / "server.log").start()
    try:
        with httpx.Client(base_url=server.base_url, timeout=60) as c:
            yield c
    finally:
        server.stop()


def _error(r: httpx.Response) -> dict:
    return r.json()["error"]


def test_a_typo_in_a_task_id_suggests_the_closest_task(idle: httpx.Client, tiny_backbone) -> None:
    r = idle.put("/tasks/flowers/import", content=constant_task(tiny_backbone, ["a", "b"], winner=0))
    assert r.status_code == 201, r.text
    image = {"content": png(0), "headers": {"content-type": "image/png"}}
    for r in (idle.post("/predict", params={"task": "flowrs"}, **image), idle.get("/tasks/flowrs"),
              idle.get("/tasks/Flowers/versions"), idle.get("/tasks/flowerz/export")):
        assert r.status_code == 404, r.text
        err = _error(r)
        assert err["code"] == "task_not_found"
        assert "did you mean 'flowers'?" in err["message"] and err["details"] == {"did_you_mean": "flowers"}
    r = idle.get("/tasks/zebra")  # nothing close: no suggestion
    assert r.status_code == 404 and "did you mean" not in _error(r)["message"], r.text
    assert idle.post("/predict", params={"task": "flowers"}, **image).status_code == 200


def test_predicting_a_task_whose_first_job_is_queued_names_the_job(idle: httpx.Client) -> None:
    r = idle.post("/tasks/pending/train", files={"dataset": ("d.zip", digits_zip())})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    r = idle.post("/predict", params={"task": "pending"}, content=png(0), headers={"content-type": "image/png"})
    assert r.status_code == 409, r.text
    err = _error(r)
    assert err["code"] == "task_training" and job_id in err["message"] and "queued" in err["message"]
    assert err["details"]["job_id"] == job_id
    r = idle.get("/tasks/pending")  # no version to show: still a 404, naming the job
    assert r.status_code == 404 and _error(r)["details"]["job_id"] == job_id
    assert idle.delete("/tasks/pending").status_code == 204  # cancels the job
    r = idle.post("/predict", params={"task": "pending"}, content=png(0), headers={"content-type": "image/png"})
    assert r.status_code == 404 and _error(r)["code"] == "task_not_found", r.text


@pytest.mark.parametrize("count", [65, 66, 80])
def test_every_image_count_past_the_limit_is_the_same_413(idle: httpx.Client, count: int) -> None:
    files = [("image", (f"{i}.png", png(i, size=8), "image/png")) for i in range(count)]
    r = idle.post("/predict", params={"task": "flowers"}, files=files)
    assert r.status_code == 413, r.text
    err = _error(r)
    assert (err["code"], err["message"]) == ("payload_too_large", "more than 64 files; at most 64 per request")


@pytest.mark.parametrize("name,body,code,details", [
    ("notes.zip", b"just some text, not an archive\n" * 10, "dataset_archive_invalid", ["notes.zip"]),
    ("photo.zip", png(1), "dataset_archive_invalid", ["photo.zip"]),
    ("flat.zip", None, "dataset_layout", ["0.png", "1.png", "2.png"]),
])
def test_a_dataset_that_cannot_train_is_refused_before_any_job(idle: httpx.Client, name: str, body: bytes | None,
                                                               code: str, details: list[str]) -> None:
    if body is None:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w") as zf:
            for i in range(3):
                zf.writestr(f"{i}.png", png(i))
        body = buf.getvalue()
    r = idle.post("/tasks/refused/train", files={"dataset": (name, body)})
    assert r.status_code == 400, r.text
    err = _error(r)
    assert (err["code"], err["details"]) == (code, details)
    if name == "photo.zip":
        assert "the dataset is a PNG image, not a zip or tar archive" in err["message"]
    assert idle.get("/jobs", params={"task": "refused"}).json()["jobs"] == []


def _follow(c: httpx.Client, url: str, key: str, limit: int, **params: str) -> tuple[list[dict], int]:
    items, cursor, pages = [], None, 0
    while True:
        r = c.get(url, params={**params, "limit": limit, **({"cursor": cursor} if cursor else {})})
        assert r.status_code == 200, r.text
        items += r.json()[key]
        pages += 1
        cursor = r.json()["next_cursor"]
        if cursor is None:
            return items, pages


def test_the_task_listing_is_slim_and_paged(idle: httpx.Client, tiny_backbone) -> None:
    for i in range(5):
        r = idle.put(f"/tasks/page-{i}/import", content=constant_task(tiny_backbone, ["a", "b", "c"][: 2 + i % 2], 0))
        assert r.status_code == 201, r.text
    whole = idle.get("/tasks").json()
    assert whole["next_cursor"] is None
    listed = {t["task_id"]: t for t in whole["tasks"]}
    assert {f"page-{i}" for i in range(5)} <= set(listed)
    one = listed["page-1"]
    assert "metrics" not in one and "classes" not in one, one  # details stay on GET /tasks/{id}
    assert (one["num_classes"], one["servable"], one["method"]) == (3, True, "vpt-deep") and one["size_bytes"] > 0
    assert idle.get("/tasks/page-1").json()["classes"] == ["a", "b", "c"]
    paged, pages = _follow(idle, "/tasks", "tasks", limit=2)
    assert [t["task_id"] for t in paged] == sorted(listed) and pages == -(-len(listed) // 2)
    for params, status in (({"cursor": "not-a-cursor"}, 400), ({"limit": "0"}, 422), ({"limit": "1001"}, 422)):
        r = idle.get("/tasks", params=params)
        assert r.status_code == status, r.text
    assert _error(idle.get("/tasks", params={"cursor": "x"}))["code"] == "invalid_parameter"


def test_the_job_listing_is_paged_newest_first(idle: httpx.Client) -> None:
    ids = []
    for i in range(3):
        r = idle.post(f"/tasks/jobs-{i}/train", files={"dataset": ("d.zip", digits_zip())})
        assert r.status_code == 202, r.text
        ids.append(r.json()["job_id"])
    whole = idle.get("/jobs").json()
    assert whole["next_cursor"] is None
    paged, _ = _follow(idle, "/jobs", "jobs", limit=1)
    assert [j["job_id"] for j in paged] == [j["job_id"] for j in whole["jobs"]]
    assert [j["job_id"] for j in paged if j["job_id"] in ids] == ids[::-1]  # newest first
    queued, _ = _follow(idle, "/jobs", "jobs", limit=1, state="queued")
    assert {j["job_id"] for j in queued} >= set(ids)
    for i in range(3):
        assert idle.delete(f"/tasks/jobs-{i}").status_code == 204
