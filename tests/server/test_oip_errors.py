"""Every bad Open Inference Protocol request gets a 4xx in the protocol's own shape, never a 500."""
from __future__ import annotations

import base64
import gzip
import json
import socket
import struct
import zlib

import httpx
import numpy as np
import pytest

from tests.server.conftest import OIP_KEY_A, OIP_MAX_IMAGE_BYTES, OIP_MAX_IMAGES, OipServer
from tests.server.helpers import png

INFER = "/v2/models/rand/infer"
PIXELS = np.zeros((1, 3, 32, 32), np.float32)


def fp32(shape: list[int] | None = None, data: object = None, **extra: object) -> dict:
    inp = {"name": "images", "datatype": "FP32", "shape": shape or [1, 3, 32, 32],
           "data": PIXELS.ravel().tolist() if data is None else data}
    return {"inputs": [{**inp, **extra}]}


def binary(doc: dict, payload: bytes, header_length: int | str | None = None) -> tuple[bytes, dict]:
    head = json.dumps(doc).encode()
    length = len(head) if header_length is None else header_length
    return head + payload, {"Inference-Header-Content-Length": str(length),
                            "content-type": "application/octet-stream"}


def raw_input(payload_size: int, **overrides: object) -> dict:
    inp = {"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32],
           "parameters": {"binary_data_size": payload_size}}
    return {"inputs": [{**inp, **overrides}]}


def encoded(data: list | None = None, shape: list[int] | None = None, **extra: object) -> dict:
    """A request with an `image_bytes` input (JSON `data` unless `extra` says otherwise)."""
    inp = {"name": "image_bytes", "datatype": "BYTES", "shape": shape or [1], **extra}
    return {"inputs": [inp if data is None else {**inp, "data": data}]}


def b64(blob: bytes) -> str:
    return base64.b64encode(blob).decode()


def with_outputs(*outputs: dict, **params: object) -> dict:
    """A good `images` input with these outputs requested, or else these request parameters."""
    return {**fp32(), "outputs": list(outputs)} if outputs else {**fp32(), "parameters": params}


def out(name: str, **params: object) -> dict:
    return {"name": name, "parameters": params}


def bytes_elems(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


GOOD_RAW = PIXELS.tobytes()
JSON_CASES = {
    "not json": (b"{nope", 400, "not valid JSON"),
    "nan literal": (b'{"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [NaN]}]}', 400,
                    "not valid JSON"),
    "not utf-8": (b"\xff\xfe\xfa", 400, "not valid JSON"),
    "deep nesting": (b"[" * 100000 + b"]" * 100000, 400, "not valid JSON"),
    "array body": (b"[]", 400, "JSON object"),
    "no inputs": ({}, 400, "'inputs'"),
    "empty inputs": ({"inputs": []}, 400, "'inputs'"),
    "input not an object": ({"inputs": [3]}, 400, "inputs[0]"),
    "unknown input": ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}]}, 400,
                      "unexpected input"),
    "id not a string": ({**fp32(), "id": 5}, 400, "'id'"),
    "parameters not an object": ({**fp32(), "parameters": [1]}, 400, "'parameters'"),
    "datatype missing": (fp32(datatype=None), 400, "datatype"),
    "wrong datatype": (fp32(datatype="INT32"), 400, "expected FP32, FP16 or UINT8"),
    "wrong image size": (fp32([1, 3, 16, 16], [0.0] * 768), 400, "expected [N,3,32,32]"),
    "wrong rank": (fp32([3, 32, 32], [0.0] * 3072), 400, "expected [N,3,32,32]"),
    "shape not ints": (fp32(["1", 3, 32, 32]), 400, "'shape'"),
    "negative shape": (fp32([-1, 3, 32, 32]), 400, "'shape'"),
    "no images": (fp32([0, 3, 32, 32], []), 400, "at least one image"),
    "too many images": (fp32([OIP_MAX_IMAGES + 1, 3, 32, 32], []), 413, "at most"),
    "absurd batch": (fp32([10**18, 3, 32, 32], []), 413, "at most"),
    "element count": (fp32(data=[0.0] * 10), 400, "has 10 elements"),
    "strings as numbers": (fp32(data=["0.5"] * 3072), 400, "FP32 numbers"),
    "booleans as numbers": (fp32(data=[True] * 3072), 400, "FP32 numbers"),
    "ragged data": (fp32(data=[[0.0] * 3, [0.0]]), 400, "regular"),
    "data not a list": (fp32(data="abc"), 400, "list of numbers"),
    "huge integers": (fp32(data=[10**40] * 3072), 400, "FP32 numbers"),
    "overflowing fp16": ({"inputs": [{"name": "images", "datatype": "FP16", "shape": [1, 3, 32, 32],
                                      "data": [1e6] * 3072}]}, 400, "NaN or infinite"),
    "uint8 out of range": ({"inputs": [{"name": "images", "datatype": "UINT8", "shape": [1, 3, 32, 32],
                                        "data": [256] * 3072}]}, 400, "0..255"),
    "no data": ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, 3, 32, 32]}]}, 400,
                "no 'data'"),
    "input twice": ({"inputs": fp32()["inputs"] * 2}, 400, "twice"),
    "both inputs": ({"inputs": fp32()["inputs"] + encoded([b64(png(1))])["inputs"]}, 400, "not both"),
    "bytes wrong datatype": (encoded([1], datatype="FP32"), 400, "expected BYTES"),
    "bytes wrong shape": (encoded(["a", "b"], [1, 2]), 400, "[N] or [N,1]"),
    "bad base64": (encoded(["@@@"]), 400, "not valid base64"),
    "base64 not a string": (encoded([7]), 400, "base64 string"),
    "bytes count": (encoded([b64(png(1))], [2]), 400, "holds 1 elements"),
    "not an image": (encoded([b64(b"hello")]), 400, "not a decodable image"),
    "top_k zero": (with_outputs(top_k=0), 400, "top_k"),
    "top_k text": (with_outputs(top_k="3"), 400, "top_k"),
    "top_k bool": (with_outputs(top_k=True), 400, "top_k"),
    "top_k huge": (with_outputs(top_k=10**6), 400, "top_k"),
    "binary_data_output text": (with_outputs(binary_data_output="yes"), 400, "binary_data_output"),
    "outputs not a list": ({**fp32(), "outputs": {"name": "scores"}}, 400, "'outputs'"),
    "unknown output": (with_outputs({"name": "logits"}), 400, "unknown output"),
    "output twice": (with_outputs({"name": "scores"}, {"name": "scores"}), 400, "twice"),
    "classification on labels": (with_outputs(out("labels", classification=2)), 400,
                                 "classification applies"),
    "negative classification": (with_outputs(out("scores", classification=-1)), 400,
                                "classification"),
    "binary_data text": (with_outputs(out("scores", binary_data=1)), 400, "binary_data"),
    "shared memory input": (fp32(parameters={"shared_memory_region": "r"}), 400, "shared-memory"),
    "shared memory output": (with_outputs(out("scores", shared_memory_region="r")), 400, "shared-memory"),
}
BINARY_CASES = {
    "header length past the body": (binary(raw_input(len(GOOD_RAW)), GOOD_RAW, 10**9), 400,
                                    "the request body has"),
    "header length negative": (binary(raw_input(len(GOOD_RAW)), GOOD_RAW, -1), 400, "the request body has"),
    "header length not a number": (binary(raw_input(len(GOOD_RAW)), GOOD_RAW, "ten"), 400, "number of bytes"),
    "header length cuts the json": (binary(raw_input(len(GOOD_RAW)), GOOD_RAW, 5), 400, "not valid JSON"),
    "size past the data": (binary(raw_input(len(GOOD_RAW) + 4), GOOD_RAW), 400,
                           "remain after the JSON header"),
    "size mismatch with shape": (binary(raw_input(8), GOOD_RAW[:8]), 400, "takes 12288"),
    "size negative": (binary(raw_input(-4), GOOD_RAW), 400, "binary_data_size"),
    "size not a number": (binary(raw_input("12288"), GOOD_RAW), 400, "binary_data_size"),
    "left over bytes": (binary(raw_input(len(GOOD_RAW)), GOOD_RAW + b"xx"), 400, "belong to no input"),
    "binary and data": (binary(raw_input(len(GOOD_RAW), data=[1.0]), GOOD_RAW), 400, "both 'data'"),
    "nan pixels": (binary(raw_input(len(GOOD_RAW)), np.full_like(PIXELS, np.nan).tobytes()), 400, "NaN"),
    "bytes length cut": (binary(encoded(parameters={"binary_data_size": 2}), b"\x05\x00"), 400, "4-byte"),
    "bytes element past the data": (binary(encoded(parameters={"binary_data_size": 6}),
                                           struct.pack("<I", 50) + b"ab"), 400, "declares 50 bytes"),
    "bytes element too large": (binary(encoded(parameters={"binary_data_size": 6}),
                                       struct.pack("<I", 2**31) + b"ab"), 413, "exceeds"),
    "bytes count mismatch": (binary(encoded(shape=[3], parameters={"binary_data_size": 14}),
                                    bytes_elems(b"abcde", b"f")), 400, "holds 2 elements"),
}


def assert_protocol_error(r: httpx.Response, status: int, text: str) -> None:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    assert text in body["error"], body


@pytest.mark.parametrize("case", JSON_CASES)
def test_bad_json_requests(oip_server: OipServer, case: str) -> None:
    doc, status, text = JSON_CASES[case]
    content = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    assert_protocol_error(oip_server.alpha.post(INFER, content=content), status, text)


@pytest.mark.parametrize("case", BINARY_CASES)
def test_bad_binary_requests(oip_server: OipServer, case: str) -> None:
    (content, headers), status, text = BINARY_CASES[case]
    assert_protocol_error(oip_server.alpha.post(INFER, content=content, headers=headers), status, text)


def test_route_auth_and_tenancy_errors(oip_server: OipServer) -> None:
    a, base = oip_server.alpha, oip_server.proc.base_url
    ok = json.dumps(fp32()).encode()
    assert a.post(INFER, content=ok).status_code == 200
    assert_protocol_error(httpx.post(base + INFER, content=ok), 401, "API key")
    wrong = {"x-api-key": "wrong-key-1"}
    assert_protocol_error(httpx.get(base + "/v2/models/rand", headers=wrong), 401, "unknown")
    assert_protocol_error(a.post("/v2/models/missing/infer", content=ok), 404, "not found")
    assert_protocol_error(a.post("/v2/models/theirs/infer", content=ok), 404, "not found")
    assert_protocol_error(a.get("/v2/models/theirs"), 404, "not found")
    assert_protocol_error(a.get("/v2/models/theirs/ready"), 404, "not found")
    assert_protocol_error(a.post("/v2/models/bad%20id/infer", content=ok), 400, "")
    assert_protocol_error(a.post("/v2/models/rand/versions/x/infer", content=ok), 400, "positive integer")
    assert_protocol_error(a.post("/v2/models/rand/versions/0/infer", content=ok), 400, "positive integer")
    assert_protocol_error(a.get("/v2/models/rand/versions/%C2%B2/ready"), 400, "positive integer")  # a digit
    assert_protocol_error(a.get("/v2/models/rand/versions/99"), 404, "no version 99")
    assert_protocol_error(a.get("/v2/models/rand/nothing"), 404, "")
    assert_protocol_error(a.get(INFER), 405, "")
    gz, br, deflate = ({"content-encoding": e} for e in ("gzip", "br", "deflate"))
    assert_protocol_error(a.post(INFER, content=ok, headers=br), 415, "'br'")
    assert_protocol_error(a.post(INFER, content=ok, headers=gz), 400, "decompressed")
    assert_protocol_error(a.post(INFER, content=gzip.compress(ok)[:-12], headers=gz), 400, "truncated")
    assert a.post(INFER, content=gzip.compress(ok), headers=gz).status_code == 200
    limit = OIP_MAX_IMAGES * OIP_MAX_IMAGE_BYTES + (1 << 20)
    bomb = zlib.compress(ok + b" " * limit)  # valid JSON once inflated, but past the body limit
    assert_protocol_error(a.post(INFER, content=bomb, headers=deflate), 413, "decompressed")
    # the rest of the API keeps its own error shape
    assert a.get("/tasks/theirs").json()["error"]["code"] == "task_not_found"


def test_busy_is_503_with_retry_after(oip_server: OipServer) -> None:
    n = OIP_MAX_IMAGES  # past the queue limit (40), within the request limit (48)
    r = oip_server.alpha.post(INFER, content=binary(raw_input(n * len(GOOD_RAW), shape=[n, 3, 32, 32]),
                                                    GOOD_RAW * n)[0],
                              headers={"Inference-Header-Content-Length": str(len(json.dumps(
                                  raw_input(n * len(GOOD_RAW), shape=[n, 3, 32, 32]))))})
    assert_protocol_error(r, 503, "queue is full")
    assert r.headers["retry-after"] == "1"


def test_declared_body_past_the_limit_is_refused_unread(oip_server: OipServer) -> None:
    with socket.create_connection(("127.0.0.1", oip_server.proc.port), timeout=30) as s:
        s.sendall(f"POST {INFER} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {OIP_KEY_A}\r\n"
                  f"Content-Length: {10**12}\r\n\r\n".encode())
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413")
    assert set(json.loads(body)) == {"error"} and "exceeds" in json.loads(body)["error"]


def test_health_routes_need_no_key(oip_server: OipServer) -> None:
    base = oip_server.proc.base_url
    assert httpx.get(base + "/v2/health/live").json() == {"live": True}
    assert httpx.get(base + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(base + "/v2").json()["name"] == "vpt-serve"


def test_timeout_is_504(start_server) -> None:
    """The batcher waits 200 ms for a batch to fill; the request gives up after 1 ms."""
    srv = start_server(env={"VPT_REQUEST_TIMEOUT_S": "0.001", "VPT_MAX_WAIT_MS": "200", "VPT_WORKERS": "0"})
    with httpx.Client(base_url=srv.base_url, timeout=60) as c:
        assert c.get("/v2/health/ready").status_code == 200
        r = c.post("/v2/models/anything/infer", content=json.dumps(fp32()).encode())
    assert_protocol_error(r, 504, "no answer within")
