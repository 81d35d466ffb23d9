"""Tenancy: API keys map to tenants; every route is scoped; another tenant's task looks missing."""
from __future__ import annotations

import hashlib

import httpx
import pytest

from server.frontend.auth import AuthConfigError, KeyRing, hash_key, load_keyring, parse_keys
from tests.fixtures.digits import make_digits_zip
from tests.server.helpers import backbone_for, constant_task, png

KEY_A, KEY_B = "alpha-secret-key", "bravo-secret-key"


def test_keyring_parsing_and_lookup(tmp_path) -> None:
    ring = KeyRing(tuple(parse_keys(f"a:{KEY_A}, b:{hash_key(KEY_B)}\n# comment\n")))
    assert ring.enabled and ring.tenant_for(KEY_A) == "a" and ring.tenant_for(KEY_B) == "b"
    assert ring.tenant_for("nope-nope") is None and ring.tenant_for(KEY_A + "x") is None
    assert hash_key(KEY_B) == "sha256:" + hashlib.sha256(KEY_B.encode()).hexdigest()
    f = tmp_path / "keys"
    f.write_text(f"c:{KEY_A}\n")
    assert load_keyring(None, f).tenant_for(KEY_A) == "c"
    assert not load_keyring(None, None).enabled
    for bad in ["nocolon", "t:short", "../x:longenoughkey", "t:sha256:zz"]:
        with pytest.raises(AuthConfigError):
            parse_keys(bad)


@pytest.fixture(scope="module")
def two_tenants(tmp_path_factory, tiny_vit_env, tiny_vit_file):
    from tests.fixtures.live_server import ServerProcess

    root = tmp_path_factory.mktemp("auth")
    env = {**tiny_vit_env, "VPT_STORE": str(root / "store"), "VPT_WORKERS": "0",
           "VPT_API_KEYS": f"alpha:{KEY_A},bravo:{hash_key(KEY_B)}"}
    proc = ServerProcess(env, root / "server.log").start()
    bb = backbone_for(str(tiny_vit_file))
    a = httpx.Client(base_url=proc.base_url, headers={"Authorization": f"Bearer {KEY_A}"}, timeout=60)
    b = httpx.Client(base_url=proc.base_url, headers={"X-API-Key": KEY_B}, timeout=60)
    r = a.put("/tasks/secret/import", content=constant_task(bb, ["x", "y"], winner=1))
    assert r.status_code == 201, r.text
    r = a.post("/tasks/secret/train", files={"dataset": ("d.zip", make_digits_zip(root / "d.zip", classes=range(2),
                                                                                  per_class=3).read_bytes())},
               data={"epochs": "1"})
    assert r.status_code == 202, r.text
    yield proc, a, b, r.json()["job_id"]
    a.close()
    b.close()
    proc.stop()


def test_missing_or_wrong_key_is_401(two_tenants) -> None:
    proc, *_ = two_tenants
    for headers in ({}, {"Authorization": "Bearer wrong-key-123"}, {"Authorization": "Basic xyz"}):
        r = httpx.get(proc.base_url + "/tasks", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert httpx.get(proc.base_url + "/healthz").status_code == 200  # probes need no key


def test_tenant_isolation_matrix(two_tenants) -> None:
    _, a, b, job_id = two_tenants
    image = {"content": png(0), "headers": {"content-type": "image/png"}}
    routes = [
        ("GET", "/tasks/secret", {}), ("DELETE", "/tasks/secret", {}), ("GET", "/tasks/secret/versions", {}),
        ("POST", "/tasks/secret/versions/1/activate", {}), ("GET", "/tasks/secret/export", {}),
        ("POST", "/predict?task=secret", image), ("GET", f"/jobs/{job_id}", {}),
        ("POST", f"/jobs/{job_id}/cancel", {}), ("GET", f"/jobs/{job_id}/events", {}),
    ]
    for method, path, kw in routes:
        r = b.request(method, path, **kw)
        assert r.status_code == 404, (method, path, r.status_code, r.text)
        assert r.json()["error"]["code"] in ("task_not_found", "job_not_found"), (method, path)
    assert b.get("/tasks").json()["tasks"] == [] and b.get("/jobs").json()["jobs"] == []
    # bravo's import of the same id is its own task, alpha's is untouched
    bb_blob = a.get("/tasks/secret/export").content
    assert b.put("/tasks/secret/import", content=bb_blob).status_code == 201
    assert a.get("/tasks/secret").json()["num_versions"] == 1
    assert b.get("/tasks/secret").json()["num_versions"] == 1
    assert a.post("/predict?task=secret", **image).status_code == 200
    assert [t["task_id"] for t in a.get("/tasks").json()["tasks"]] == ["secret"]
    assert len(a.get("/jobs").json()["jobs"]) == 1


def test_unauthenticated_server_refuses_a_public_bind(tmp_path, tiny_vit_env) -> None:
    from tests.fixtures.live_server import ServerProcess

    proc = ServerProcess({**tiny_vit_env, "VPT_STORE": str(tmp_path / "s"), "VPT_HOST": "0.0.0.0"},
                         tmp_path / "log")
    proc.env["VPT_HOST"] = "0.0.0.0"
    proc.start(wait=False)
    assert proc.proc.wait(60) == 2
    assert "refusing to bind" in proc.log()


def test_metrics_needs_its_token_when_one_is_set(start_server) -> None:
    proc = start_server(env={"VPT_WORKERS": "0", "VPT_METRICS_TOKEN": "scrape-token-123"})
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = httpx.get(proc.base_url + "/metrics", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text
        assert r.headers["www-authenticate"] == "Bearer"
    r = httpx.get(proc.base_url + "/metrics", headers={"Authorization": "Bearer scrape-token-123"})
    assert r.status_code == 200 and "vpt_http_requests_total" in r.text
