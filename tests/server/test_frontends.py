"""Front-end processes over real uvicorn processes: keep-alive connections spread over the front ends,
a crashed front end is replaced, metrics merge across front ends, SIGTERM stops everything with status
0, a SIGKILLed server's ring file is swept at the next start with its work folder, a front end loads no
model stack; the single-process mode still serves."""
from __future__ import annotations

import http.client
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.vit import TINY_KWARGS, TINY_NAME
from tests.server.helpers import backbone_for, constant_task, png, supervisor_leftovers
from vpt.backbone import load_backbone
from vpt.task import load_task_file


def children(pid: int) -> dict[str, list[int]]:
    kids = [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    out: dict[str, list[int]] = {"engine": [], "frontend": []}
    for k in kids:
        try:
            cmd = Path(f"/proc/{k}/cmdline").read_bytes()
        except OSError:
            continue
        if b"server.engine.main" in cmd:
            out["engine"].append(k)
        elif b"server.frontend.main" in cmd:
            out["frontend"].append(k)
    return out


def held_connections(pid: int, port: int) -> int:
    """Established TCP connections to local `port` whose socket `pid` holds (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            link = os.readlink(fd)
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    held = 0
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            held += int(f[1].rsplit(":", 1)[1], 16) == port and f[3] == "01" and f[9] in inodes
    return held


def predict(url: str, task: str, seed: int = 0) -> httpx.Response:
    return httpx.post(url + "/predict", params={"task": task}, content=png(seed),
                      headers={"content-type": "image/png"}, timeout=60)


def counter(text: str, prefix: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix))


def test_crashed_front_end_is_replaced_metrics_merge_and_sigterm_exits_0(start_server, tiny_vit_file) -> None:
    owner, stale, stale_dir = supervisor_leftovers(Path(__file__).resolve().parents[2])
    owner.send_signal(signal.SIGKILL)  # a server killed with -9 leaves its ring file and work folder behind
    owner.wait(30)
    assert stale.exists() and (stale_dir / "engine.sock").exists()
    proc = start_server(env={"VPT_FRONTEND_WORKERS": "2", "VPT_WORKERS": "0"})
    assert not stale.exists() and not stale_dir.exists()  # the next server's supervisor swept them
    mine = [p for p in stale_dir.parent.glob(f"vpt-serve-{proc.proc.pid}-*")]
    assert len(mine) == 1 and (mine[0] / "engine.sock").exists()  # its own is locked: kept
    kids = children(proc.proc.pid)
    assert len(kids["engine"]) == 1 and len(kids["frontend"]) == 2
    for i in range(4):  # decoded by the front ends, answered by the engine: the whole path of a prediction
        assert predict(proc.base_url, "missing", i).status_code == 404
    for pid in kids["frontend"]:  # the model stack stays in the engine (libraries show in the process's map)
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert "libtorch" not in maps and "torchvision" not in maps and "/triton/" not in maps
    engine_maps = Path(f"/proc/{kids['engine'][0]}/maps").read_text()
    assert "libtorch" in engine_maps and "/triton/" in engine_maps  # the check can tell
    bb = backbone_for(str(tiny_vit_file))
    httpx.put(proc.base_url + "/tasks/t/import", content=constant_task(bb, ["a", "b"], winner=1)).raise_for_status()

    for i in range(12):  # a fresh connection each: the two front ends share them
        r = predict(proc.base_url, "t", i)
        assert r.status_code == 200 and r.json()["results"][0]["top_k"][0]["label"] == "b"
    for pid in kids["frontend"]:  # the upload was checked by the engine: still no torch in a front end
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()
    text = httpx.get(proc.base_url + "/metrics").text
    assert counter(text, 'vpt_http_requests_total{method="POST",route="/predict",status="200"}') == 12
    assert counter(text, "vpt_batch_images_count") >= 1  # the engine's own metrics come along
    assert text.count("# TYPE vpt_http_requests_total") == 1
    assert counter(text, "vpt_decoded_images_total") == 16  # the 404s too: decoded before the engine looked
    assert counter(text, "vpt_decode_cpu_seconds_total") > 0

    # keep-alive connections opened together spread over both front ends (one listening socket each,
    # SO_REUSEPORT): with one shared socket, one process often accepted them all
    port = proc.port
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=60) for _ in range(24)]
    try:
        for c in conns:
            c.connect()
        for c in conns:
            c.request("GET", "/healthz")
            r = c.getresponse()
            assert r.status == 200 and r.read()
        held = [held_connections(pid, port) for pid in kids["frontend"]]
        assert sum(held) == 24 and min(held) > 0, held
    finally:
        for c in conns:
            c.close()

    victim = kids["frontend"][0]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = children(proc.proc.pid)["frontend"]
        if len(now) == 2 and victim not in now:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the killed front end was not replaced")
    proc.wait_ready()
    ok = 0
    for i in range(12):
        try:
            ok += predict(proc.base_url, "t", i).status_code == 200
        except httpx.HTTPError:
            pass  # a connection the dying front end had accepted
    assert ok >= 10 and predict(proc.base_url, "t").status_code == 200

    proc.proc.send_signal(signal.SIGTERM)
    assert proc.proc.wait(60) == 0
    assert not Path(f"/proc/{kids['engine'][0]}").exists()


@pytest.mark.parametrize("workers", ["1", "0"])
def test_task_files_of_every_method_import_and_activate(start_server, tiny_vit_file, workers: str) -> None:
    """An uploaded or re-activated task file is checked against the backbone where it lives (the engine,
    for a front end), whatever its method: bias and partial-1 read the backbone's own parameters."""
    proc = start_server(env={"VPT_FRONTEND_WORKERS": workers, "VPT_WORKERS": "0"})
    bb = backbone_for(str(tiny_vit_file))
    for method in ("bias", "partial-1", "vpt-deep+bias", "adapter"):
        name = method.replace("+", "-")
        blob = constant_task(bb, ["a", "b"], winner=1, method=method)
        r = httpx.put(f"{proc.base_url}/tasks/{name}/import", content=blob, timeout=60)
        assert r.status_code == 201, r.text
        expected = load_task_file(blob, bb).params.num_trainable()["total"]
        assert r.json()["method"] == method and r.json()["trainable_parameters"] == expected
        assert predict(proc.base_url, name).json()["results"][0]["top_k"][0]["label"] == "b"
    blob = constant_task(bb, ["a", "b"], winner=0, method="bias")
    assert httpx.put(f"{proc.base_url}/tasks/bias/import", content=blob, timeout=60).status_code == 201
    assert predict(proc.base_url, "bias").json()["results"][0]["top_k"][0]["label"] == "a"
    r = httpx.post(f"{proc.base_url}/tasks/bias/versions/1/activate", timeout=60)  # roll back
    assert r.status_code == 200 and r.json()["current_version"] == 1, r.text
    assert predict(proc.base_url, "bias").json()["results"][0]["top_k"][0]["label"] == "b"
    foreign = load_backbone(TINY_NAME, pretrained=False, model_kwargs={**TINY_KWARGS, "depth": 3})
    r = httpx.put(f"{proc.base_url}/tasks/other/import", content=constant_task(foreign, ["a", "b"], 1, "bias"),
                  timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"] == "backbone_mismatch", r.text
    r = httpx.put(f"{proc.base_url}/tasks/other/import", content=blob[:-7], timeout=60)
    assert r.status_code == 422 and r.json()["error"]["code"].startswith("task_file"), r.text
    for pid in children(proc.proc.pid)["frontend"]:
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text()


def test_single_process_mode_still_serves(start_server, tiny_vit_file) -> None:
    proc = start_server(env={"VPT_FRONTEND_WORKERS": "0", "VPT_WORKERS": "0"})
    assert children(proc.proc.pid) == {"engine": [], "frontend": []}
    bb = backbone_for(str(tiny_vit_file))
    httpx.put(proc.base_url + "/tasks/t/import", content=constant_task(bb, ["a", "b"], winner=0)).raise_for_status()
    r = predict(proc.base_url, "t")
    assert r.status_code == 200 and r.json()["results"][0]["top_k"][0]["label"] == "a"
    assert counter(httpx.get(proc.base_url + "/metrics").text, "vpt_batch_images_count") >= 1


def test_a_front_end_imports_no_model_stack() -> None:
    """What a front-end process imports (server/frontend/main.py) loads neither torch, timm, torchvision,
    Triton nor the engine's state, bank or batcher: they cost seconds of startup and memory in every front
    end. (Uploaded task files are checked by the engine: see the test above.)"""
    code = ("import sys\n"
            "import server.cli, server.frontend.app, server.frontend.fasthttp, server.frontend.state\n"
            "import server.frontend.main\n"
            "heavy = ('torch', 'safetensors', 'timm', 'torchvision', 'triton', 'server.state', 'server.engine.batcher',"
            " 'prompt_store.bank', 'vpt.backbone', 'vpt.engine', 'vpt.task', 'vpt.methods', 'kernels.dispatch')\n"
            "print(sorted(m for m in heavy if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[2], capture_output=True,
                         text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
