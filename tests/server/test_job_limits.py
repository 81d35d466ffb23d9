"""Limits at the door and per tenant, against one real server: per-part size while the body streams,
slow bodies, bounded SSE streams with keep-alives, tenant caps on jobs and pending uploads, a full
disk (a small tmpfs), and /readyz details only for loopback or authenticated callers."""
from __future__ import annotations

import io
import select
import socket
import subprocess
import time
import uuid
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.fixtures.digits import digit_png, make_digits_zip
from tests.fixtures.live_server import ServerProcess

KEYS = {"a": "key-a-" + "x" * 20, "b": "key-b-" + "y" * 20}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_vit_env: dict[str, str]):
    root = tmp_path_factory.mktemp("limits")
    env = {"VPT_STORE": str(root / "store"), "VPT_WORKERS": "0", **tiny_vit_env,
           "VPT_API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
           "VPT_MAX_IMAGE_BYTES": str(1 << 20), "VPT_BODY_IDLE_TIMEOUT_S": "1",
           "VPT_SSE_KEEPALIVE_S": "0.5", "VPT_SSE_MAX_S": "3",
           "VPT_MAX_ACTIVE_JOBS_PER_TENANT": "2", "VPT_MAX_PENDING_BYTES_PER_TENANT": str(3 << 20)}
    proc = ServerProcess(env, root / "server.log").start()
    yield proc
    proc.stop()


def _client(server: ServerProcess, tenant: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, timeout=60, headers={"Authorization": f"Bearer {KEYS[tenant]}"})


def _dataset(size: int = 0) -> bytes:
    """A small valid digits zip, padded with a stored (incompressible) blob up to about `size` bytes."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for label in range(2):
            for i in range(3):
                zf.writestr(f"{label}/{i}.png", digit_png(label, i))
        if size:
            zf.writestr("padding.bin", uuid.uuid4().bytes * (size // 16))
    return buf.getvalue()


def test_an_oversized_part_is_refused_after_about_the_limit(server: ServerProcess) -> None:
    """50 MiB in one image part with a 1 MiB limit: the answer comes before the body is sent."""
    boundary = "b" + uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode()
    total = len(head) + (50 << 20)
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    sock.sendall((f"POST /predict?task=x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['a']}\r\n"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total}\r\n\r\n").encode()
                 + head)
    sent, chunk = 0, b"\0" * (64 << 10)
    try:
        while sent < (50 << 20):
            if select.select([sock], [], [], 0)[0]:
                break  # the server answered
            sock.sendall(chunk)
            sent += len(chunk)
    except (BrokenPipeError, ConnectionResetError, TimeoutError):
        pass  # the server stopped reading (and closed)
    answer = _read_answer(sock)
    sock.close()
    assert " 413 " in answer.split("\r\n")[0] and "payload_too_large" in answer
    assert sent < (16 << 20), f"{sent} bytes went in before the refusal"  # 50 MiB on today's main


def _read_answer(sock: socket.socket) -> str:
    """One HTTP answer: its head, then as many body bytes as its content-length (the head and the body
    may arrive in separate segments), or what came before the peer closed."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")[1:]
                           if line.lower().startswith(b"content-length:")), 0)
            if len(body) >= length:
                return data.decode(errors="replace")
        try:
            chunk = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            chunk = b""
        if not chunk:
            return data.decode(errors="replace")
        data += chunk


def test_a_slow_body_times_out(server: ServerProcess) -> None:
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall((f"POST /predict?task=x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEYS['a']}\r\n"
                  "Content-Type: image/png\r\nContent-Length: 1000\r\n\r\n").encode() + b"\x89P")
    sock.settimeout(60)
    answer = _read_answer(sock)  # nothing more is sent: the body stalls
    sock.close()
    assert " 408 " in answer.split("\r\n")[0] and "request_timeout" in answer


def test_tenant_caps_on_jobs_and_pending_uploads(server: ServerProcess) -> None:
    small = _dataset()
    with _client(server, "a") as a, _client(server, "b") as b:
        for task in ("cap1", "cap2"):
            assert a.post(f"/tasks/{task}/train", files={"dataset": ("d.zip", small)}).status_code == 202
        r = a.post("/tasks/cap3/train", files={"dataset": ("d.zip", small)})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_many_jobs"
        assert int(r.headers["retry-after"]) > 0
        big = _dataset(2 << 20)
        assert b.post("/tasks/big1/train", files={"dataset": ("d.zip", big)}).status_code == 202  # another tenant
        r = b.post("/tasks/big2/train", files={"dataset": ("d.zip", big)})
        assert r.status_code == 429 and r.json()["error"]["code"] == "too_much_pending_data"
        for job in a.get("/jobs").json()["jobs"] + b.get("/jobs").json()["jobs"]:
            client = a if job["task_id"].startswith("cap") else b
            assert client.post(f"/jobs/{job['job_id']}/cancel").status_code == 200
        r = a.post("/tasks/cap3/train", files={"dataset": ("d.zip", small)})
        assert r.status_code == 202
        a.post(f"/jobs/{r.json()['job_id']}/cancel")


def test_sse_sends_keepalives_and_closes_after_its_maximum(server: ServerProcess) -> None:
    with _client(server, "a") as a:
        r = a.post("/tasks/sse/train", files={"dataset": ("d.zip", _dataset())})
        job_id = r.json()["job_id"]  # no worker: it stays queued, so only the maximum ends the stream
        try:
            with a.stream("GET", f"/jobs/{job_id}/events") as stream:
                lines = [line for line in stream.iter_lines()]
        finally:
            a.post(f"/jobs/{job_id}/cancel")
    assert ": keep-alive" in lines
    assert lines.count("event: progress") == 1 and "event: timeout" in lines and "event: end" not in lines


def test_readyz_reports_low_disk_and_hides_details_from_strangers(tmp_path: Path, tiny_vit_env) -> None:
    from starlette.testclient import TestClient

    from server.frontend.app import create_app
    from server.settings import Settings
    from server.state import AppState

    env = {k.removeprefix("VPT_").lower(): v for k, v in tiny_vit_env.items()}
    settings = Settings(**env, store=str(tmp_path / "store"), workers=0, min_free_bytes=1 << 62,
                        api_keys=f"a:{KEYS['a']}")
    state = AppState.start(settings)
    app = create_app(settings, state=state)
    app.state.vpt = state
    try:
        def readyz(client: str, headers: dict | None = None) -> httpx.Response:
            return TestClient(app, client=(client, 40000)).get("/readyz", headers=headers)

        stranger = readyz("203.0.113.7")
        assert stranger.status_code == 503 and stranger.json()["error"]["details"]["disk"] == "low"
        assert str(tmp_path) not in stranger.text
        for shown in (readyz("127.0.0.1"), readyz("203.0.113.7", {"Authorization": f"Bearer {KEYS['a']}"})):
            assert shown.status_code == 503 and str(tmp_path) in shown.json()["error"]["details"]["disk"]
    finally:
        state.close()


@pytest.fixture
def tiny_fs(tmp_path: Path):
    """A 4 MiB tmpfs (needs root); unmounted afterwards."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_answers_507_and_leaves_nothing(tiny_fs: Path, tmp_path: Path, tiny_vit_env) -> None:
    proc = ServerProcess({"VPT_STORE": str(tiny_fs / "store"), "VPT_WORKERS": "0", "VPT_MIN_FREE_BYTES": "0",
                          **tiny_vit_env},
                         tmp_path / "full.log").start()
    try:
        archive = make_digits_zip(tmp_path / "d.zip", classes=range(2), per_class=3).read_bytes()
        padded = _dataset(6 << 20)  # more than the disk holds
        with httpx.Client(base_url=proc.base_url, timeout=60) as c:
            r = c.post("/tasks/full/train", files={"dataset": ("d.zip", padded)})
            assert r.status_code == 507 and r.json()["error"]["code"] == "insufficient_storage", r.text
            incoming = tiny_fs / "store" / "uploads" / "incoming"
            assert not incoming.exists() or list(incoming.iterdir()) == []  # no half-written spool
            ok = c.post("/tasks/fits/train", files={"dataset": ("d.zip", archive)})
            assert ok.status_code == 202, ok.text  # space came back: training requests work again
            time.sleep(0.1)
    finally:
        proc.stop()
