"""The console in a real headless Chromium against a live `vpt-serve` with API keys: the tour.

Log in, train a digits task from the Train page (a folder zipped in the browser), watch the job
page update live until it finishes, read the task page (curves, confusion matrix, feature map with
the class names), try an image, roll back a version, and check another tenant sees none of it.
Screenshots of each page land in the test's tmp folder (`screens/`).
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.fixtures.digits import digit_png, make_digits_tree, make_digits_zip
from tests.server.helpers import backbone_for, constant_task, wait_job

if os.environ.get("CI"):  # CI installs both: a skip there would hide the console's tour
    from playwright import sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ALICE, BOB = "alice-key-0001", "bob-key-00002"
NAMES = {0: "zero", 1: "one", 2: "two", 3: "three"}
PER_CLASS, VAL_PER_CLASS = 16, 4


@pytest.fixture(scope="module")
def browser() -> Iterator:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed (.ci/run installs it)")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


class Tab:
    """A page of the console plus what it logged: page errors and CSP refusals fail the test."""

    def __init__(self, browser, base: str, shots: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.base, self.shots, self.problems = base, shots, []
        self.page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        self.page.on("console", lambda m: self.problems.append(m.text) if m.type == "error" and "401" not in m.text
                     and "404" not in m.text else None)

    def go(self, fragment: str) -> None:
        self.page.goto(f"{self.base}/console#{fragment}")

    def shot(self, name: str) -> None:
        self.page.screenshot(path=str(self.shots / f"{name}.png"), full_page=True)

    def text(self, selector: str) -> str:
        return self.page.locator(selector).inner_text()


def login(tab: Tab, key: str) -> None:
    tab.page.fill("#api-key", key)
    tab.page.click("form.login button[type=submit]")
    tab.page.wait_for_selector("h1:text('Tasks')")


def test_console_tour(browser, start_server, tmp_path: Path, tiny_vit_file: Path) -> None:
    shots = tmp_path / "screens"
    shots.mkdir()
    tab = Tab(browser, start_server(env={"VPT_API_KEYS": f"alice:{ALICE},bob:{BOB}"}).base_url, shots)
    try:
        tour(tab, tmp_path, tiny_vit_file)
    except Exception:
        tab.shot("failure")  # what the page showed when the tour broke
        raise


def tour(tab: Tab, tmp_path: Path, tiny_vit_file: Path) -> None:
    api = httpx.Client(base_url=tab.base, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
    log_in(tab)
    job_id = train_and_watch(tab, api, tmp_path)
    task_page(tab, tmp_path)
    bb = backbone_for(str(tiny_vit_file))
    roll_back(tab, api, bb)
    other_pages(tab, api, bb, job_id)
    other_tenant(tab, job_id)
    assert not [p for p in tab.problems if "Refused" in p or "page error" in p], tab.problems


def log_in(tab: Tab) -> None:
    # log in: a wrong key shows the server's message; the right one lands on the (empty) task list
    tab.go("/tasks")
    tab.page.wait_for_selector("#api-key")
    tab.page.fill("#api-key", "not-a-key-at-all")
    tab.page.click("form.login button[type=submit]")
    tab.page.wait_for_selector("form.login .error:text('unknown API key')")
    tab.shot("login")
    login(tab, ALICE)
    assert "No tasks yet" in tab.text("main")
    assert tab.page.evaluate("document.cookie") == "" and ALICE not in tab.page.url


def train_and_watch(tab: Tab, api: httpx.Client, tmp_path: Path) -> str:
    folder = make_digits_tree(tmp_path / "digits", classes=range(4), per_class=PER_CLASS, layout="split",
                              val_per_class=VAL_PER_CLASS, names=NAMES)
    # a long job of another task keeps the worker busy, so the console's job is seen queued, then live
    blocker = api.post("/tasks/blocker/train", files={"dataset": ("d.zip", make_digits_zip(
        tmp_path / "b.zip", classes=range(2), per_class=8).read_bytes())},
        data={"epochs": "10000", "batch_size": "1"}).json()  # 140,000 steps: it is cancelled long before
    wait_job(api, blocker["job_id"], lambda j: j["state"] == "running")

    fill_train_form(tab, folder)
    tab.page.click("#train-form button[type=submit]")
    tab.page.wait_for_url("**/console#/job/*")
    job_id = tab.page.url.rsplit("/", 1)[1]
    tab.page.wait_for_selector("#job-state:has-text('queued')")
    tab.page.evaluate("""() => { window.seen = [];
        new MutationObserver(() => window.seen.push([document.querySelector('#job-state').innerText,
            document.querySelector('#job-epoch').innerText]))
          .observe(document.querySelector('#job-facts'), {subtree: true, childList: true, characterData: true}); }""")
    assert api.post(f"/jobs/{blocker['job_id']}/cancel").status_code == 200
    tab.page.wait_for_selector("#job-state:has-text('running')", timeout=120_000)
    tab.shot("job")
    tab.page.wait_for_selector("#job-outcome:has-text('Finished')", timeout=300_000)
    seen = tab.page.evaluate("window.seen")
    assert ["succeeded", "6 / 6"] in seen and any(s == "running" for s, _ in seen)  # updated live, no reload
    assert tab.text("#job-live") == "finished" and tab.page.url.endswith(job_id)
    return job_id


def fill_train_form(tab: Tab, folder: Path) -> None:
    """The Train page: a folder, zipped in the browser; options from the server's schema."""
    tab.go("/train")
    tab.page.wait_for_selector("#opt-epochs")
    choices = tab.page.locator("#opt-method-choices option")  # method is free text (combinations) with choices
    assert [choices.nth(i).get_attribute("value") for i in range(3)] == ["linear", "vpt-shallow", "vpt-deep"]
    tab.page.fill("#task-id", "digits")
    tab.page.set_input_files("#dataset-folder", str(folder))
    tab.page.wait_for_selector("#dataset-picked:text('files')")
    tab.page.fill("#opt-epochs", "6")
    tab.page.fill("#opt-batch_size", "16")
    tab.page.fill("#opt-num_prompts", "4")
    tab.shot("train")


def task_page(tab: Tab, tmp_path: Path) -> None:
    # the task page: curves, confusion matrix and feature map, with the class names
    tab.page.click("#job-outcome a")
    tab.page.wait_for_selector("#feature-map svg")
    assert tab.page.locator("#curves figure").count() == 3
    assert tab.page.locator("#curves figure").first.locator("circle").count() >= 6  # one point per epoch
    heat = tab.page.locator("figure.heatmap")
    assert heat.locator("text.cls-row").all_text_contents() == sorted(NAMES.values())
    assert heat.locator("rect.cell").count() == 16
    n_val = len(NAMES) * VAL_PER_CLASS
    maps = tab.page.locator("#feature-map figure")
    assert maps.count() == 2 and all(maps.nth(i).locator("circle").count() == n_val for i in range(2))
    assert "silhouette" in maps.nth(0).inner_text() and "silhouette" in maps.nth(1).inner_text()
    assert [t.strip() for t in tab.page.locator("ul.legend li").all_inner_texts()] == sorted(NAMES.values())

    # try an image: top-k bars and the version that answered
    img = tmp_path / "two.png"
    img.write_bytes(digit_png(2, index=PER_CLASS + 3))
    tab.page.set_input_files("#try-file", str(img))
    tab.page.wait_for_selector("#prediction:has-text('answered by version 1')")
    bars = tab.page.locator("#prediction figure text.tick:not(.value)").all_text_contents()
    assert len(bars) == 4 and set(bars) == set(NAMES.values())
    tab.shot("task")


def roll_back(tab: Tab, api: httpx.Client, bb) -> None:
    # roll back: a second version arrives, the console activates version 1 again after a confirmation
    r = api.put("/tasks/digits/import", content=constant_task(bb, list(NAMES.values()), winner=3),
                headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201 and r.json()["current_version"] == 2
    tab.page.reload()
    tab.page.wait_for_selector("#versions-table")
    tab.page.click("button:text('Activate v1')")
    tab.page.wait_for_selector("dialog.confirm")
    tab.page.click("dialog.confirm button[value=ok]")
    tab.page.wait_for_selector("#task-status:has-text('Version 1 is now current')")
    assert api.get("/tasks/digits").json()["current_version"] == 1


def other_pages(tab: Tab, api: httpx.Client, bb, job_id: str) -> None:
    # the other pages (the cancelled blocker published nothing; one more task to search among)
    r = api.put("/tasks/pets/import", content=constant_task(bb, ["cat", "dog"], winner=0),
                headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201
    tab.go("/tasks")
    tab.page.wait_for_selector("#tasks-table")
    assert tab.page.locator("#tasks-table tbody tr").count() == 2
    tab.page.fill("#task-search", "dog")  # a class name
    assert tab.page.locator("#tasks-table tbody tr").all_inner_texts()[0].startswith("pets")
    assert tab.page.locator("#tasks-table tbody tr").count() == 1
    tab.page.fill("#task-search", "")
    tab.shot("tasks")
    tab.go("/jobs")
    tab.page.wait_for_selector(f"#jobs-table a:text('{job_id}')")
    tab.shot("jobs")
    # method auto with a candidate this backbone (64 wide) cannot take: its row says why, the others train
    auto = api.post("/tasks/picked/train", files={"dataset": ("a.zip", make_digits_zip(
        Path(tab.shots) / "a.zip", classes=range(2), per_class=6, layout="split", val_per_class=3).read_bytes())},
        data={"method": "auto", "auto_methods": "adapter,linear", "adapter_reduction": "3", "epochs": "1",
              "batch_size": "4"}).json()
    wait_job(api, auto["job_id"], lambda j: j["state"] == "succeeded")
    tab.go(f"/job/{auto['job_id']}")
    tab.page.wait_for_selector("#job-leaderboard tbody tr >> nth=1")
    heads = tab.page.locator("#job-leaderboard thead th").all_inner_texts()
    assert {"method", "val accuracy", "trainable parameters", "skipped"} <= set(heads), heads
    rows = tab.page.locator("#job-leaderboard tbody tr").all_inner_texts()
    assert rows[0].startswith("adapter") and "must divide the embedding width 64" in rows[0]
    assert rows[1].startswith("linear") and "must divide" not in rows[1]
    tab.shot("job-auto")
    tab.go("/server")
    tab.page.wait_for_selector("#bank-facts")  # the browser is a loopback caller: /metrics answers
    assert "vit_tiny" in tab.text("#backbone-facts")
    assert tab.page.locator("#server-metrics figure.bars").count() == 1
    tab.shot("server")


def other_tenant(tab: Tab, job_id: str) -> None:
    # another tenant sees none of it
    tab.page.click("#logout")
    tab.page.wait_for_selector("#api-key")
    login(tab, BOB)
    assert "No tasks yet" in tab.text("main")
    tab.go("/task/digits")
    tab.page.wait_for_selector("main .error")
    assert "task_not_found" in tab.text("main .error")
    tab.go(f"/job/{job_id}")
    tab.page.wait_for_selector("main .error:text('job_not_found')")
    tab.go("/jobs")
    tab.page.wait_for_selector("#jobs-table")
    tab.page.wait_for_selector("text=No jobs yet.")


@pytest.mark.slow
def test_console_cancel_export_delete(browser, start_server, tmp_path: Path, tiny_vit_file: Path) -> None:
    """Cancel a running job, export a version and delete a task from the console."""
    shots = tmp_path / "screens"
    shots.mkdir()
    tab = Tab(browser, start_server(env={"VPT_API_KEYS": f"alice:{ALICE}"}).base_url, shots)
    api = httpx.Client(base_url=tab.base, headers={"Authorization": f"Bearer {ALICE}"}, timeout=60)
    job = api.post("/tasks/long/train", files={"dataset": ("d.zip", make_digits_zip(
        tmp_path / "b.zip", classes=range(2), per_class=8).read_bytes())},
        data={"epochs": "10000", "batch_size": "1"}).json()
    bb = backbone_for(str(tiny_vit_file))
    assert api.put("/tasks/pets/import", content=constant_task(bb, ["cat", "dog"], winner=0),
                   headers={"content-type": "application/octet-stream"}).status_code == 201
    tab.go("/tasks")
    login(tab, ALICE)
    tab.go(f"/job/{job['job_id']}")
    tab.page.wait_for_selector("#job-state:has-text('running')", timeout=120_000)
    tab.page.click("#job-cancel")
    tab.page.click("dialog.confirm button[value=ok]")
    tab.page.wait_for_selector("#job-outcome:has-text('cancelled')", timeout=120_000)
    assert api.get(f"/jobs/{job['job_id']}").json()["state"] == "cancelled"

    tab.go("/task/pets")
    tab.page.wait_for_selector("#versions-table")
    with tab.page.expect_download() as download:
        tab.page.click("button:text('Export current')")
    saved = tmp_path / "pets.safetensors"
    download.value.save_as(saved)
    assert download.value.suggested_filename == "pets-v1.safetensors"
    assert saved.read_bytes() == api.get("/tasks/pets/export").content
    tab.page.click("button:text('Delete task')")
    tab.page.click("dialog.confirm button[value=cancel]")  # changing one's mind deletes nothing
    assert api.get("/tasks/pets").status_code == 200
    tab.page.click("button:text('Delete task')")
    tab.page.click("dialog.confirm button[value=ok]")
    tab.page.wait_for_selector("text=No tasks yet")
    assert api.get("/tasks/pets").status_code == 404
    assert not [p for p in tab.problems if "Refused" in p or "page error" in p], tab.problems
