"""The HTTP protocol's own `/predict` path (server/frontend/fasthttp.py) over real sockets: a real uvicorn
server in this process with a real engine state, so each test can count which requests the protocol took.
Keep-alive, large bodies (flow control), pipelining, limits, timeouts, a client gone mid-body, and the
requests it must leave to uvicorn's ordinary path."""
from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from PIL import Image

from server.frontend.app import create_app
from server.frontend.fasthttp import protocol_for
from server.settings import Settings
from server.state import AppState
from tests.server.helpers import backbone_for, constant_task, png

MAX_IMAGE_BYTES = 1 << 20
MAX_IMAGES = 32  # the request limit: 32 images' bytes and 1 MiB


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, tiny_vit_env, tiny_vit_file):
    """(base url, the calls the fast path served so far) of a server on a free loopback port."""
    tmp = tmp_path_factory.mktemp("fasthttp")
    env = {k.removeprefix("VPT_").lower(): v for k, v in tiny_vit_env.items()}
    settings = Settings(**env, store=str(tmp / "store"), workers=0, max_image_bytes=MAX_IMAGE_BYTES,
                        max_images_per_request=MAX_IMAGES, body_idle_timeout_s=1.0)
    state = AppState.start(settings)
    app = create_app(settings, state=state)
    taken: list[str] = []

    class Counting(protocol_for(app)):
        async def _serve(self, cycle, scope, context, headers, params) -> None:
            taken.append(params[0])
            await super()._serve(cycle, scope, context, headers, params)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=Counting, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    bb = backbone_for(str(tiny_vit_file))
    httpx.put(url + "/tasks/t/import", content=constant_task(bb, ["a", "b"], winner=1)).raise_for_status()
    yield url, taken
    server.should_exit = True
    thread.join(30)
    state.close()


def _raw(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _head(task: str, length: int, extra: str = "", version: str = "1.1") -> bytes:
    return (f"POST /predict?task={task}&top_k=1 HTTP/{version}\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {length}\r\n{extra}\r\n").encode()


def _closed(sock: socket.socket) -> bool:
    """The server closed the connection (a reset, when it closed with our bytes unread)."""
    try:
        return sock.recv(10) == b""
    except ConnectionResetError:
        return True


def _answers(sock: socket.socket, n: int) -> list[bytes]:
    """`n` whole HTTP answers (heads with content-length bodies) read from `sock`."""
    data, out = b"", []
    while len(out) < n:
        head_end = data.find(b"\r\n\r\n")
        if head_end >= 0:
            head = data[:head_end].decode("latin-1").lower()
            length = int(head.split("content-length: ")[1].split("\r\n")[0])
            if len(data) >= head_end + 4 + length:
                out.append(data[:head_end + 4 + length])
                data = data[head_end + 4 + length:]
                continue
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return out


def test_plain_predictions_take_the_fast_path_and_keep_the_connection(served) -> None:
    url, taken = served
    before = len(taken)
    with httpx.Client(base_url=url, timeout=60) as c:
        for i in range(4):
            r = c.post("/predict?task=t&top_k=1", content=png(i), headers={"content-type": "image/png"})
            assert r.status_code == 200 and r.json()["results"][0]["top_k"][0]["label"] == "b"
            assert len(r.headers["x-request-id"]) == 32 and r.headers["content-type"] == "application/json"
            assert "date" in r.headers and "server" in r.headers  # the server's own headers, as uvicorn sends them
        assert c.get("/healthz").status_code == 200  # the same connection, through the app
        r = c.post("/predict?task=t&via=app", content=png(9), headers={"content-type": "image/png"})
        assert r.status_code == 200  # a query the fast path does not take: the app answers
        r = c.post("/predict?task=t", files=[("image", ("a.png", png(1), "image/png"))])
        assert r.status_code == 200  # multipart: the app
        r = c.post("/predict?task=never-made", content=png(1), headers={"content-type": "image/png"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "task_not_found"
        assert r.json()["error"]["request_id"] == r.headers["x-request-id"]
    assert taken[before:] == ["t"] * 4 + ["never-made"]


def test_a_body_larger_than_the_read_buffer_and_pipelined_requests(served) -> None:
    url, taken = served
    before = len(taken)
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(buf, "PNG")
    big = buf.getvalue()
    assert 200_000 < len(big) < MAX_IMAGE_BYTES  # well past the 64 KiB at which the protocol pauses reading
    r = httpx.post(url + "/predict?task=t&top_k=1", content=big, headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200 and r.json()["results"][0]["top_k"][0]["label"] == "b"
    small = png(3)
    with _raw(url) as s:  # three requests in one write: answered in order on the one connection
        s.sendall(_head("t", len(small)) + small + _head("never-made", len(small)) + small
                  + b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = _answers(s, 3)
    assert [a.split(b" ", 2)[1] for a in answers] == [b"200", b"404", b"200"]
    assert taken[before] == "t" and len(taken) - before in (2, 3)  # the second may queue behind the first


def test_limits_timeouts_and_a_client_gone_mid_body(served) -> None:
    url, taken = served
    before = len(taken)
    with _raw(url) as s:  # declared beyond the route's limit: 413 at once, connection closed
        s.sendall(_head("t", MAX_IMAGES * MAX_IMAGE_BYTES + (2 << 20)))
        (answer,) = _answers(s, 1)
        assert answer.startswith(b"HTTP/1.1 413") and b"connection: close" in answer.lower()
        assert _closed(s)
    with _raw(url) as s:  # within the request's limit, beyond the image's: the route's own 413 before the rest
        s.sendall(_head("t", 20 * MAX_IMAGE_BYTES) + b"\x89PNG" + b"\0" * (2 * MAX_IMAGE_BYTES))  # then nothing
        (answer,) = _answers(s, 1)
        assert answer.startswith(b"HTTP/1.1 413") and b"the image exceeds" in answer
        assert _closed(s)  # the rest of that body is never read
    with _raw(url) as s:  # a stalled body: 408 after the idle timeout, connection closed
        s.sendall(_head("t", 1000) + b"\x89PNG")
        t0 = time.monotonic()
        (answer,) = _answers(s, 1)
        assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer and time.monotonic() - t0 >= 0.9
        assert _closed(s)
    with _raw(url) as s:  # gone mid-body: nothing to answer, the server carries on
        s.sendall(_head("t", 5000) + b"\x89PNG" * 10)
        time.sleep(0.2)
    r = httpx.post(url + "/predict?task=t", content=png(1), headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 200
    assert len(taken) - before == 5  # all of them on the protocol's path
    metrics = httpx.get(url + "/metrics", timeout=60).text
    assert 'vpt_http_requests_total{method="POST",route="/predict",status="408"}' in metrics


@pytest.mark.parametrize("case", ["proxy", "http10", "expect"])
def test_requests_it_must_not_take_go_through_the_app(served, case: str) -> None:
    url, taken = served
    before = len(taken)
    body = png(4)
    extra = {"proxy": "X-Forwarded-For: 198.51.100.7\r\n", "expect": "Expect: 100-continue\r\n"}.get(case, "")
    with _raw(url) as s:
        s.sendall(_head("t", len(body), extra, "1.0" if case == "http10" else "1.1"))
        if case == "expect":
            assert s.recv(100).startswith(b"HTTP/1.1 100")  # uvicorn's own interim answer
        s.sendall(body)
        (answer,) = _answers(s, 1)
    # a forwarded client is no longer on loopback: this keyless server refuses it, as the app decides
    assert answer.split(b" ", 2)[1] == (b"403" if case == "proxy" else b"200")
    assert len(taken) == before


def test_the_engine_state_is_real(served, tiny_vit_file: Path) -> None:
    """Sanity: the fixture serves the tiny ViT the other tests' tasks were made for."""
    url, _ = served
    assert httpx.get(url + "/backbone", timeout=60).json()["fingerprint"] == backbone_for(str(tiny_vit_file)).fingerprint
