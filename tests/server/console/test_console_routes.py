"""`/console` files and headers, the version route with its feature map, and a keyless console."""
from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest
import torch

from server.console.routes import STATIC
from tests.server.helpers import backbone_for
from vpt.task import TaskParams, TaskSpec, save_task_file

FEATURE_MAP = {"method": "tsne", "classes": ["a", "b"], "labels": [0, 1, 0],
               "linear": {"xy": [[0, 1], [1, 0], [-1, 0]], "silhouette": 0.1},
               "task": {"xy": [[0, 1], [1, 0], [-1, 0]], "silhouette": 0.5}}


@pytest.fixture(scope="module")
def api(live_server) -> httpx.Client:
    with httpx.Client(base_url=live_server.base_url, timeout=60) as c:
        yield c


def test_console_page_and_files_carry_a_strict_csp(api: httpx.Client) -> None:
    for path in ("/console", "/console/", "/console/static/js/app.js", "/console/static/style.css"):
        r = api.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp and "unsafe-inline" not in csp
        assert r.headers["x-content-type-options"] == "nosniff"
    assert api.get("/console/static/js/app.js").headers["content-type"].startswith("text/javascript")
    assert '<script type="module" src="/console/static/js/app.js">' in api.get("/console").text


def test_console_files_outside_the_folder_or_unknown_are_404(api: httpx.Client) -> None:
    for path in ("/console/static/nope.js", "/console/static/../routes.py", "/console/static/%2e%2e/routes.py",
                 "/console/static/js", "/console/static/..%2f..%2fapp.py"):
        r = api.get(path)
        assert r.status_code == 404 and r.json()["error"]["code"] in ("not_found",), path


def test_static_files_are_package_data() -> None:
    """Every file the console loads is matched by pyproject's package-data globs (non-editable installs)."""
    text = (Path(__file__).resolve().parents[3] / "pyproject.toml").read_text()
    shipped = [p for p in STATIC.rglob("*") if p.is_file()]
    assert shipped and all(f'"static/{p.parent.relative_to(STATIC).as_posix() + "/" if p.parent != STATIC else ""}*{p.suffix}"'
                           in text for p in shipped), shipped


def test_version_route_returns_the_feature_map_listings_do_not(api: httpx.Client, tiny_vit_file: Path) -> None:
    bb = backbone_for(str(tiny_vit_file))
    params = TaskParams.new(TaskSpec("linear", 0, ("a", "b")), bb, generator=torch.Generator().manual_seed(0))
    blob = save_task_file(params, bb, extra={"metrics": {"val_accuracy": 0.5, "feature_map": FEATURE_MAP},
                                             "training": {"options": {"epochs": 3}}})
    r = api.put("/tasks/fm/import", content=blob, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    v = api.get("/tasks/fm/versions/1").json()
    assert v["version"] == 1 and v["current"] and v["metrics"]["feature_map"] == FEATURE_MAP
    assert v["training"] == {"options": {"epochs": 3}}
    assert "feature_map" not in api.get("/tasks/fm/versions").json()["versions"][0]["metrics"]
    assert api.get("/tasks/fm").json()["metrics"] == {"val_accuracy": 0.5}
    for bad, code in (("/tasks/fm/versions/2", 404), ("/tasks/nope/versions/1", 404),
                      ("/tasks/fm/versions/99999999999999999999999", 404), ("/tasks/fm/versions/x", 422)):
        assert api.get(bad).status_code == code, bad


def test_keyless_loopback_console_opens_without_login(live_server) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"{live_server.base_url}/console")
        page.wait_for_selector("h1:text('Tasks')")
        assert page.locator("#api-key").count() == 0 and page.locator("#logout").is_hidden()
        browser.close()
    assert not errors
