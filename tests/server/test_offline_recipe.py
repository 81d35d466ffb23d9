"""The README's offline recipes across restarts: a random backbone keeps its fingerprint, tasks trained
on another backbone are flagged, and the demo backbone's task scores far above chance and keeps serving."""
from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import httpx

from tests.fixtures.live_server import ServerProcess
from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from tests.server.helpers import constant_task, png
from vpt.backbone import load_backbone


def _predict_label(base_url: str, task: str) -> str:
    r = httpx.post(f"{base_url}/predict", params={"task": task}, content=png(1),
                   headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["results"][0]["top_k"][0]["label"]


def _tiny_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for label in ("a", "b"):
            for i in range(2):
                zf.writestr(f"{label}/{i}.png", png(i + (10 if label == "b" else 0)))
    return buf.getvalue()


def test_a_random_backbone_serves_its_tasks_after_restarts(tmp_path: Path) -> None:
    env = {"VPT_STORE": str(tmp_path / "store"), "VPT_BACKBONE": TINY_NAME, "VPT_BACKBONE_PRETRAINED": "false",
           "VPT_BACKBONE_KWARGS": json.dumps(TINY_KWARGS), "VPT_WORKERS": "0"}
    here = load_backbone(TINY_NAME, pretrained=False, model_kwargs=TINY_KWARGS)  # the same weights as the server's
    server = ServerProcess(env, tmp_path / "a.log").start()
    try:
        assert httpx.get(f"{server.base_url}/backbone").json()["fingerprint"] == here.fingerprint
        r = httpx.put(f"{server.base_url}/tasks/cats/import", content=constant_task(here, ["a", "b", "c"], winner=2),
                      headers={"content-type": "application/octet-stream"})
        assert r.status_code == 201, r.text
    finally:
        server.stop()
    server = ServerProcess(env, tmp_path / "b.log").start()  # a restart: the same random weights
    try:
        assert _predict_label(server.base_url, "cats") == "c"
        assert httpx.get(f"{server.base_url}/tasks").json()["tasks"][0]["servable"] is True
        assert httpx.get(f"{server.base_url}/readyz").json()["details"]["unservable_tasks"] == 0
        # no worker here (VPT_WORKERS=0): a first job stays queued; deleting its task cancels it
        r = httpx.post(f"{server.base_url}/tasks/fresh/train", files={"dataset": ("d.zip", _tiny_zip())})
        assert r.status_code == 202, r.text
        assert httpx.delete(f"{server.base_url}/tasks/fresh").status_code == 204
        assert httpx.get(f"{server.base_url}/jobs/{r.json()['job_id']}").json()["state"] == "cancelled"
        assert httpx.delete(f"{server.base_url}/tasks/fresh").status_code == 404
    finally:
        server.stop()
    server = ServerProcess({**env, "VPT_BACKBONE_SEED": "7"}, tmp_path / "c.log").start()  # other weights
    try:
        task = httpx.get(f"{server.base_url}/tasks").json()["tasks"][0]
        assert task["servable"] is False and task["reason"].startswith("backbone_mismatch"), task
        ready = httpx.get(f"{server.base_url}/readyz")
        assert ready.status_code == 200 and ready.json()["details"]["unservable_tasks"] == 1
        assert httpx.get(f"{server.base_url}/tasks/cats").json()["servable"] is False
    finally:
        server.stop()
