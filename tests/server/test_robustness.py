"""Hostile and malformed requests against a real server: always a 4xx with a code, never a 5xx,
a hang or a crash, and nothing already stored is lost or made unreadable."""
from __future__ import annotations

import io
import json
import socket
import struct
import tarfile
import threading
import time
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as st_save

from tests.fixtures.digits import digit_png
from tests.fixtures.live_server import ServerProcess
from tests.server.helpers import backbone_for, constant_task, png, wait_job

MAX_IMAGE_BYTES = 64 * 1024
MAX_TASK_FILE_BYTES = 1 << 20


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_vit_env: dict[str, str]) -> Iterator[ServerProcess]:
    """A server of this module's own: requests here may leave odd records behind."""
    root = tmp_path_factory.mktemp("robust")
    proc = ServerProcess({"VPT_STORE": str(root / "store"), "VPT_MAX_WAIT_MS": "5",
                          "VPT_MAX_IMAGE_BYTES": str(MAX_IMAGE_BYTES),
                          "VPT_MAX_TASK_FILE_BYTES": str(MAX_TASK_FILE_BYTES), **tiny_vit_env},
                         root / "server.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def api(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.base_url, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def bb(tiny_vit_file: Path):
    return backbone_for(str(tiny_vit_file))


def assert_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()["error"]
    assert body["code"] == code and isinstance(body["message"], str) and body["message"], r.text


def put_task(api: httpx.Client, task: str, blob: bytes) -> dict:
    r = api.put(f"/tasks/{task}/import", content=blob, headers={"content-type": "application/octet-stream"})
    assert r.status_code == 201, r.text
    return r.json()


def predict_raw(api: httpx.Client, task: str, data: bytes, ctype: str = "image/png") -> httpx.Response:
    return api.post("/predict", params={"task": task}, content=data, headers={"content-type": ctype})


# -- multipart and content types --------------------------------------------------------------------

def _multipart(parts: list[tuple[bytes, bytes | None, bytes]], boundary: bytes = b"BOUND") -> bytes:
    out = b""
    for name, filename, data in parts:
        out += b"--" + boundary + b'\r\nContent-Disposition: form-data; name="' + name + b'"'
        out += (b'; filename="' + filename + b'"' if filename is not None else b"") + b"\r\n\r\n" + data + b"\r\n"
    return out + b"--" + boundary + b"--\r\n"


MP = "multipart/form-data; boundary=BOUND"
_IMG = [(b"image", b"a.png", png(1))]
_ZIP = [(b"dataset", b"d.zip", b"PK\x03\x04 not really a zip")]
MALFORMED = {
    "predict-no-boundary": ("/predict?task=t", "multipart/form-data", _multipart(_IMG), 400, "bad_request"),
    "predict-wrong-boundary": ("/predict?task=t", "multipart/form-data; boundary=OTHER", _multipart(_IMG), 400,
                               "bad_request"),
    "predict-truncated": ("/predict?task=t", MP, _multipart(_IMG)[:-40], 400, "bad_request"),
    "predict-many-fields": ("/predict?task=t", MP, _multipart([(b"f%d" % i, None, b"x") for i in range(500)]), 400,
                            "bad_request"),
    "predict-image-not-a-file": ("/predict?task=t", MP, _multipart([(b"image", None, b"x")]), 400, "bad_request"),
    "predict-json": ("/predict?task=t", "application/json", b"{}", 415, "unsupported_media_type"),
    "predict-no-content-type": ("/predict?task=t", "", png(1), 415, "unsupported_media_type"),
    "train-no-boundary": ("/tasks/t/train", "multipart/form-data", _multipart(_ZIP), 400, "bad_request"),
    "train-two-datasets": ("/tasks/t/train", MP, _multipart(_ZIP * 2), 400, "bad_request"),
    "train-no-dataset": ("/tasks/t/train", MP, _multipart([(b"epochs", None, b"3")]), 400, "bad_request"),
    "train-dataset-not-a-file": ("/tasks/t/train", MP, _multipart([(b"dataset", None, b"x")]), 400, "bad_request"),
    "train-non-utf8-value": ("/tasks/t/train", MP, _multipart(_ZIP + [(b"epochs", None, b"\xff\xfe")]), 400,
                             "invalid_parameter"),
    "train-non-utf8-name": ("/tasks/t/train", MP, _multipart(_ZIP + [(b"\xff\x80", None, b"1")]), 400,
                            "invalid_parameter"),
    "train-huge-field": ("/tasks/t/train", MP, _multipart(_ZIP + [(b"method", None, b"x" * 100_000)]), 400,
                         "bad_request"),
    "train-urlencoded": ("/tasks/t/train", "application/x-www-form-urlencoded", b"epochs=1", 415,
                         "unsupported_media_type"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_bodies_are_a_4xx_with_a_code(api: httpx.Client, case: str) -> None:
    path, ctype, body, status, code = MALFORMED[case]
    r = api.post(path, content=body, headers={"content-type": ctype} if ctype else {})
    assert_error(r, status, code)


# -- parameters and ids -----------------------------------------------------------------------------

def test_absurd_parameters_and_ids_are_a_4xx(api: httpx.Client, bb) -> None:
    put_task(api, "params", constant_task(bb, ["a", "b"], winner=0))
    huge = "1" + "0" * 300  # a valid int for the parser, a file name too long for the local store
    cases = [
        (api.post("/predict", params={"task": "params", "top_k": "1000000000"}, content=png(0),
                  headers={"content-type": "image/png"}), 422, "validation_error"),
        (api.post("/predict", params={"task": "params", "top_k": "-1"}, content=png(0),
                  headers={"content-type": "image/png"}), 422, "validation_error"),
        (api.post("/predict", params={"task": "params", "top_k": "1e9"}, content=png(0),
                  headers={"content-type": "image/png"}), 422, "validation_error"),
        (api.post(f"/tasks/params/versions/{huge}/activate"), 404, "version_not_found"),
        (api.get("/tasks/params/export", params={"version": huge}), 404, "version_not_found"),
        (api.post("/tasks/params/versions/0/activate"), 404, "version_not_found"),
        (api.post("/tasks/params/versions/-1/activate"), 404, "version_not_found"),
        (api.post("/tasks/params/versions/abc/activate"), 422, "validation_error"),
        (api.post("/tasks/params/versions/" + "9" * 5000 + "/activate"), 422, "validation_error"),
        (api.get("/tasks/params/export", params={"version": "0"}), 422, "validation_error"),
        (api.get("/tasks/" + "a" * 65), 400, "invalid_task_id"),
        (api.get("/tasks/%2e%2e"), 400, "invalid_task_id"),
        (api.delete("/tasks/%C3%A9t%C3%A9"), 400, "invalid_task_id"),
        (api.put("/tasks/a%00b/import", content=b"x"), 400, "invalid_task_id"),
        (api.get("/jobs", params={"task": "../../etc"}), 400, "invalid_task_id"),
        (api.get("/jobs", params={"state": "exploded"}), 400, "invalid_parameter"),
        (api.patch("/tasks/params"), 405, "method_not_allowed"),
        (api.get("/predict"), 405, "method_not_allowed"),
    ]
    for r, status, code in cases:
        assert_error(r, status, code)
    assert api.get("/tasks/params").json()["num_versions"] == 1


# -- images -----------------------------------------------------------------------------------------

def _png_header(w: int, h: int, idat: bytes = b"", depth: int = 8) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, 2, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + (chunk(b"IDAT", idat) if idat else b"") + chunk(b"IEND", b"")


def _gif_header(w: int, h: int) -> bytes:
    return (b"GIF89a" + struct.pack("<HHBBB", w, h, 0, 0, 0) + b"," + struct.pack("<HHHHB", 0, 0, w, h, 0)
            + b"\x02\x02D\x01\x00;")


def _bmp_header(w: int, h: int) -> bytes:
    return b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, 0, 0, 0, 0, 0)


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.mark.parametrize("bomb", ["png-100000^2", "png-20000^2", "gif-65535^2", "bmp-100000^2"])
def test_decompression_bomb_headers_are_413(api: httpx.Client, bb, bomb: str) -> None:
    put_task(api, "bombs", constant_task(bb, ["a", "b"], winner=0))
    data = {"png-100000^2": _png_header(100_000, 100_000), "png-20000^2": _png_header(20_000, 20_000),
            "gif-65535^2": _gif_header(65535, 65535), "bmp-100000^2": _bmp_header(100_000, 100_000)}[bomb]
    assert_error(predict_raw(api, "bombs", data), 413, "payload_too_large")
    r = api.post("/predict", params={"task": "bombs"}, files=[("image", ("ok.png", png(0), "image/png")),
                                                              ("image", ("bomb.png", data, "image/png"))])
    assert_error(r, 413, "payload_too_large")
    assert "bomb.png" in r.json()["error"]["message"]


@pytest.mark.parametrize("shape", [(100_000, 1), (1, 100_000)])
def test_extreme_aspect_ratios_are_refused_not_blown_up(api: httpx.Client, bb, shape: tuple[int, int]) -> None:
    """A 1 x 100000 PNG is a few hundred bytes, but resizing its short side to the model's input
    size would allocate gigabytes: it is refused."""
    put_task(api, "sliver", constant_task(bb, ["a", "b"], winner=0))
    w, h = shape
    data = _png_header(w, h, zlib.compress((b"\x00" + b"\x80" * (3 * w)) * h, 9))
    assert len(data) < 2000
    r = predict_raw(api, "sliver", data)
    assert_error(r, 400, "image_invalid")
    assert "aspect" in r.json()["error"]["message"]
    assert predict_raw(api, "sliver", _encode(Image.new("RGB", (60, 2)), "PNG")).status_code == 200  # 30:1 is fine


def test_exotic_image_modes_decode(api: httpx.Client, bb) -> None:
    put_task(api, "modes", constant_task(bb, ["a", "b"], winner=1))
    rng = np.random.default_rng(0)
    frames = [Image.new("RGB", (12, 12), (40 * i, 0, 0)) for i in range(4)]
    images = {
        "grey16.png": _encode(Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)), "PNG"),
        "rgb48.png": _png_header(4, 4, zlib.compress((b"\x00" + b"\x12\x34" * 12) * 4), depth=16),
        "palette-trns.png": _encode(Image.new("P", (10, 10)), "PNG", transparency=0),
        "la.png": _encode(Image.new("LA", (10, 10)), "PNG"),
        "bilevel.png": _encode(Image.new("1", (10, 10)), "PNG"),
        "cmyk.jpg": _encode(Image.new("CMYK", (10, 10)), "JPEG"),
        "one-pixel.png": _encode(Image.new("RGB", (1, 1)), "PNG"),
        "float.tif": _encode(Image.fromarray(rng.random((10, 10)).astype(np.float32)), "TIFF"),
        "anim.gif": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
        "pic.webp": _encode(Image.new("RGB", (10, 10)), "WEBP"),
    }
    r = api.post("/predict", params={"task": "modes", "top_k": 1},
                 files=[("image", (name, data, "application/octet-stream")) for name, data in images.items()])
    assert r.status_code == 200, r.text
    assert [res["top_k"][0]["label"] for res in r.json()["results"]] == ["b"] * len(images)


def test_raw_image_body_over_the_limit_is_refused_before_it_is_all_sent(server: ServerProcess) -> None:
    """The server answers 413 once the body passes the per-image limit, without reading the rest."""
    declared = 40 * MAX_IMAGE_BYTES
    head = (f"POST /predict?task=whatever HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            f"Content-Length: {declared}\r\nConnection: close\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port), timeout=20) as s:
        s.sendall(head + b"\0" * (2 * MAX_IMAGE_BYTES))  # then nothing: a server reading it all would wait
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = s.recv(4096)
            assert chunk, answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


# -- task files -------------------------------------------------------------------------------------

def test_chunked_import_over_the_limit_is_413_and_stores_nothing(api: httpx.Client, bb) -> None:
    put_task(api, "chunked", constant_task(bb, ["a", "b"], winner=0))

    def chunks() -> Iterator[bytes]:  # no Content-Length: only counting what arrives can stop it
        for _ in range(3):
            yield b"\0" * MAX_TASK_FILE_BYTES

    assert_error(api.put("/tasks/chunked/import", content=chunks()), 413, "payload_too_large")
    assert api.get("/tasks/chunked").json()["num_versions"] == 1


def _task_file(bb, classes: str | None = None, dtype: torch.dtype = torch.float32, **meta: str) -> bytes:
    d, depth = bb.embed_dim, bb.depth
    tensors = {"head.weight": torch.zeros(2, d).to(dtype), "head.bias": torch.zeros(2).to(dtype),
               "prompts": torch.zeros(depth, 2, d).to(dtype)}
    metadata = {"format": "vpt-task/1", "method": "vpt-deep", "num_prompts": "2",
                "classes": classes if classes is not None else json.dumps(["a", "b"]), "prompt_dropout": "0.0",
                "backbone": bb.name, "backbone_fingerprint": bb.fingerprint, **meta}
    return st_save(tensors, metadata=metadata)


BAD_TASK_FILES = {
    "classes-nested-deeply": lambda bb: _task_file(bb, classes="[" * 100_000 + "]" * 100_000),
    "classes-lone-surrogate": lambda bb: _task_file(bb, classes='["\\ud800", "b"]'),
    "metrics-nested-deeply": lambda bb: _task_file(bb, metrics='{"a":' * 5000 + "1" + "}" * 5000),
    "float8-tensors": lambda bb: _task_file(bb, dtype=torch.float8_e4m3fn),
}


@pytest.mark.parametrize("case", list(BAD_TASK_FILES))
def test_task_files_that_cannot_be_served_or_shown_are_refused(api: httpx.Client, bb, case: str) -> None:
    put_task(api, "guarded", constant_task(bb, ["x", "y"], winner=1))
    before = api.get("/tasks/guarded").json()["num_versions"]
    assert_error(api.put("/tasks/guarded/import", content=BAD_TASK_FILES[case](bb)), 422, "task_file_invalid")
    for url in ("/tasks", "/tasks/guarded", "/tasks/guarded/versions"):
        assert api.get(url).status_code == 200, url
    assert api.get("/tasks/guarded").json()["num_versions"] == before
    r = predict_raw(api, "guarded", png(0))
    assert r.status_code == 200 and r.json()["results"][0]["top_k"][0]["label"] == "y"


# -- what training leaves behind --------------------------------------------------------------------

def _jsonl_dataset(labels: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        rows = []
        for cls, label in enumerate(labels):
            for i in range(4):
                zf.writestr(f"img{cls}_{i}.png", digit_png(cls, index=i))
                rows.append(json.dumps({"file_name": f"img{cls}_{i}.png", "label": label}))
        zf.writestr("manifest.jsonl", "\n".join(rows))
    return buf.getvalue()


def _tar_dataset(folders: list[str]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", encoding="utf-8", errors="surrogateescape") as tf:
        for cls, folder in enumerate(folders):
            for i in range(4):
                data = digit_png(cls, index=i)
                info = tarfile.TarInfo(f"{folder}/{i}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_undecodable_names_in_datasets_never_break_listings(start_server) -> None:
    """A manifest label or a member name that is not valid Unicode must not make listings fail."""
    srv = start_server()
    with httpx.Client(base_url=srv.base_url, timeout=120) as c:
        for task, files in (("label", {"dataset": ("d.zip", _jsonl_dataset(["zero", "\ud800"]))}),
                            ("folder", {"dataset": ("d.tar", _tar_dataset(["zero", "one\udcff"]))})):
            r = c.post(f"/tasks/{task}/train", files=files, data={"method": "linear", "epochs": "1",
                                                                 "batch_size": "4"})
            if r.status_code == 400:  # refused at submit (a name that is no valid UTF-8): named, escaped
                err = r.json()["error"]
                assert err["code"].startswith("dataset_") and "\\udcff" in err["details"][0], err
                assert c.get("/tasks").status_code == 200 and c.get("/jobs").status_code == 200
                continue
            assert r.status_code == 202, r.text
            job = wait_job(c, r.json()["job_id"])
            for url in ("/jobs", f"/jobs/{job['job_id']}", "/tasks"):
                assert c.get(url).status_code == 200, url
            if job["state"] == "succeeded":
                assert c.get(f"/tasks/{task}").status_code == 200
                assert c.get(f"/tasks/{task}/versions").status_code == 200
                assert predict_raw(c, task, digit_png(0, index=9)).status_code == 200
            else:
                assert job["state"] == "failed" and job["error"]["code"].startswith("dataset_"), job


# -- disconnects and concurrency --------------------------------------------------------------------

def _server_errors(api: httpx.Client) -> list[str]:
    return [line for line in api.get("/metrics").text.splitlines()
            if line.startswith("vpt_http_requests_total") and 'status="500"' in line]


def test_clients_leaving_mid_body_are_not_server_errors(api: httpx.Client, server: ServerProcess) -> None:
    for method, path, ctype in (("PUT", "/tasks/gone/import", "application/octet-stream"),
                                ("POST", "/predict?task=gone", MP), ("POST", "/tasks/gone/train", MP)):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                      f"Content-Length: 100000\r\n\r\n".encode() + b"--BOUND\r\n" + b"x" * 1000)
    deadline = time.monotonic() + 30
    seen: set[str] = set()
    while time.monotonic() < deadline and len(seen) < 3:  # until the server has finished all three requests
        metrics = api.get("/metrics").text
        seen = {route for route in ("/tasks/{task_id}/import", "/predict", "/tasks/{task_id}/train")
                if any(line.startswith("vpt_http_requests_total") and f'route="{route}"' in line
                       and 'status="4' in line for line in metrics.splitlines())}
        time.sleep(0.1)
    assert len(seen) == 3, seen
    assert _server_errors(api) == []


def test_concurrent_delete_import_activate_and_predict(api: httpx.Client, bb) -> None:
    blob = constant_task(bb, ["a", "b", "c"], winner=2)
    put_task(api, "churn", blob)
    stop = threading.Event()
    codes: Counter = Counter()
    labels: list[str] = []

    def predictor() -> None:
        with httpx.Client(base_url=str(api.base_url), timeout=60) as c:
            while not stop.is_set():
                r = c.post("/predict", params={"task": "churn"}, files=[("image", ("a.png", png(1), "image/png"))])
                codes[("predict", r.status_code)] += 1
                if r.status_code == 200:
                    labels.append(r.json()["results"][0]["top_k"][0]["label"])

    threads = [threading.Thread(target=predictor) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for _ in range(15):
            codes[("delete", api.delete("/tasks/churn").status_code)] += 1
            version = put_task(api, "churn", blob)["current_version"]
            codes[("activate", api.post(f"/tasks/churn/versions/{version}/activate").status_code)] += 1
            codes[("old", api.post(f"/tasks/churn/versions/{version - 1}/activate").status_code)] += 1  # deleted
            codes[("list", api.get("/tasks").status_code)] += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert {status for _, status in codes} <= {200, 204, 404}, codes
    assert codes[("delete", 204)] == codes[("activate", 200)] == codes[("old", 404)] == codes[("list", 200)] == 15
    assert labels and set(labels) == {"c"}

    def imp(i: int) -> int:
        return api.put("/tasks/many/import", content=constant_task(bb, ["a", "b"], winner=i % 2, seed=i)).status_code

    with ThreadPoolExecutor(6) as pool:
        assert set(pool.map(imp, range(12))) == {201}
    versions = api.get("/tasks/many/versions").json()["versions"]
    assert sorted(v["version"] for v in versions) == list(range(1, 13))
    assert sum(v["current"] for v in versions) == 1


def test_event_streams_dropped_mid_way_leave_the_server_healthy(api: httpx.Client, server: ServerProcess) -> None:
    r = api.post("/tasks/streamed/train", files={"dataset": ("d.zip", _jsonl_dataset(["zero", "one"]))},
                 data={"method": "vpt-shallow", "epochs": "5", "batch_size": "2"})
    assert r.status_code == 202, r.text
    job_id = r.json()["job_id"]
    for _ in range(3):
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as s:
            s.sendall(f"GET /jobs/{job_id}/events HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            assert s.recv(64).startswith(b"HTTP/1.1 200")
    assert wait_job(api, job_id)["state"] == "succeeded"
    assert api.get("/healthz").status_code == 200 and server.alive()


def test_nothing_in_this_module_was_a_server_error(api: httpx.Client, server: ServerProcess) -> None:
    assert server.alive()
    assert _server_errors(api) == []
