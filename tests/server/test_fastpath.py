"""The raw-image `/predict` fast path answers exactly as the routed path does (a real keyed server):
same results, same errors and request ids, same metrics; queries it does not take go through the app."""
from __future__ import annotations

import httpx
import pytest

from server.frontend.app import create_app
from server.frontend.fastpath import FastPredict, plain_query
from tests.server.conftest import OIP_MAX_IMAGE_BYTES
from tests.server.helpers import png


@pytest.mark.parametrize(("query", "taken"), [
    (b"task=t", ("t", 5)), (b"task=t&top_k=3", ("t", 3)), (b"top_k=100&task=a%2Fb", ("a/b", 100)),
    (b"task=t&top_k=0", None), (b"task=t&top_k=101", None), (b"task=t&top_k=x", None), (b"top_k=2", None),
    (b"task=t&task=u", None), (b"task=t&other=1", None), (b"", None), (b"task=", None), (b"task=t&top_k=1&top_k=2", None)])
def test_only_plainly_valid_queries_take_the_fast_path(query: bytes, taken: tuple[str, int] | None) -> None:
    assert plain_query(query) == taken


def test_the_fast_path_finds_its_route_and_takes_a_plain_request() -> None:
    """The answers below are alike whichever path ran: this checks the fast one is really taken."""
    app = create_app()
    fast = FastPredict(app)
    assert fast.route.path == "/predict" and "POST" in fast.route.methods
    scope = {"path": "/predict", "method": "POST", "query_string": b"task=t&top_k=2"}
    assert fast.accepts(scope, {b"content-type": b"image/jpeg"}) is None  # not started: no state yet
    app.state.vpt = object()
    assert fast.accepts(scope, {b"content-type": b"image/jpeg"}) == ("t", 2)
    assert fast.accepts(scope, {b"content-type": b"multipart/form-data; boundary=x"}) is None
    assert fast.accepts({**scope, "path": "/predict/"}, {b"content-type": b"image/jpeg"}) is None


def _post(client: httpx.Client, query: str, body: bytes, slow: bool, **headers: str) -> httpx.Response:
    """`slow`: an extra query parameter the fast path does not take (the route ignores it)."""
    return client.post(f"/predict?{query}{'&via=app' if slow else ''}", content=body,
                       headers={"content-type": "image/png", **headers})


def _comparable(r: httpx.Response) -> tuple[int, dict]:
    """Status and body, less what differs between any two requests (timings, generated request ids)."""
    body = r.json()
    body.pop("timings_ms", None)
    if isinstance(body.get("error"), dict) and r.headers["x-request-id"] != "fast-1":
        assert body["error"].pop("request_id") == r.headers["x-request-id"]
    return r.status_code, body


@pytest.mark.parametrize("case", ["ok", "top_k", "unknown_task", "near_task", "invalid_id", "no_key", "bad_key", "corrupt",
                                  "empty", "too_large", "request_id"])
def test_fast_and_routed_paths_answer_alike(oip_server, case: str) -> None:
    query, body, headers, client = "task=rand", png(5), {}, oip_server.alpha
    if case == "top_k":
        query = "task=rand&top_k=2"
    elif case == "unknown_task":
        query = "task=never-made"
    elif case == "near_task":
        query = "task=rnad"  # 404 naming the closest task, as the routed path's TaskRoute answers
    elif case == "invalid_id":
        query = "task=no%2Fsuch"
    elif case in ("no_key", "bad_key"):
        client = httpx.Client(base_url=oip_server.proc.base_url, timeout=60,
                              headers={"Authorization": "Bearer wrong-key-123"} if case == "bad_key" else {})
    elif case == "corrupt":
        body = png(5)[:40]
    elif case == "empty":
        body = b""
    elif case == "too_large":
        body = b"\xff" * (OIP_MAX_IMAGE_BYTES + 1)
    elif case == "request_id":
        headers = {"x-request-id": "fast-1"}
    fast, slow = _post(client, query, body, False, **headers), _post(client, query, body, True, **headers)
    assert _comparable(fast) == _comparable(slow)
    assert fast.headers.get("www-authenticate") == slow.headers.get("www-authenticate")
    if case in ("ok", "top_k"):
        assert fast.status_code == 200 and len(fast.json()["results"][0]["top_k"]) == (5 if case == "ok" else 2)
        assert len(fast.headers["x-request-id"]) == 32
    elif case == "request_id":
        assert fast.status_code == 200 and fast.headers["x-request-id"] == "fast-1"
    else:
        assert fast.status_code >= 400 and fast.json()["error"]["request_id"] == fast.headers["x-request-id"]
    if case == "near_task":
        assert fast.status_code == 404 and fast.json()["error"]["details"]["did_you_mean"] == "rand"


def test_fast_path_requests_are_counted_under_the_route(oip_server) -> None:
    def count() -> float:
        text = oip_server.alpha.get("/metrics").text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith('vpt_http_requests_total{method="POST",route="/predict",status="200"}'))

    before = count()
    for slow in (False, True):
        assert _post(oip_server.alpha, "task=const", png(1), slow).json()["results"][0]["top_k"][0]["label"] == "dog"
    assert count() == before + 2
