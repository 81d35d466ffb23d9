"""The served OpenAPI document describes what the server really answers, in both process layouts.

Real uvicorn processes: a dedicated single-process server (no training worker, so submitted jobs stay
queued) and the session's front-end server. Responses are checked by schemathesis against the document
the server serves: status declared, content type declared, body and headers valid against the schema.
"""
from __future__ import annotations

import copy
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fixtures.digits import digit_png
from tests.fixtures.live_server import ServerProcess
from tests.server.helpers import backbone_for, constant_task

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]
FUZZ = settings(max_examples=4, derandomize=True, deadline=None, database=None,
                suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
TASK = "oa-tour"


@dataclass
class Served:
    mode: str
    proc: ServerProcess
    schema: object
    http: httpx.Client
    may_write: bool                    # a dedicated server: fuzz every method, submit training jobs
    ids: dict[str, str] = field(default_factory=dict)

    def call(self, method: str, path: str, expect: int, **case: object):
        """One request built from the document's operation, validated against it."""
        response = self.schema[path][method].Case(**case).call_and_validate(base_url=self.proc.base_url,
                                                                            checks=CHECKS, timeout=60)
        assert response.status_code == expect, (method, path, response.status_code, response.text[:300])
        return response


@pytest.fixture(scope="module")
def single_server(tmp_path_factory: pytest.TempPathFactory, tiny_vit_env: dict[str, str]) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("openapi")
    proc = ServerProcess({**tiny_vit_env, "VPT_STORE": str(root / "store"), "VPT_FRONTEND_WORKERS": "0",
                          "VPT_WORKERS": "0", "VPT_MAX_WAIT_MS": "5", "VPT_SSE_MAX_S": "1"},
                         root / "server.log").start()
    yield proc
    proc.stop()


@pytest.fixture(scope="module", params=["single-process", "front-ends"])
def served(request: pytest.FixtureRequest, tiny_vit_file: Path) -> Iterator[Served]:
    single = request.param == "single-process"
    proc = request.getfixturevalue("single_server" if single else "live_server")
    schema = schemathesis.openapi.from_url(proc.base_url + "/openapi.json")
    with httpx.Client(base_url=proc.base_url, timeout=60) as http:
        s = Served(request.param, proc, schema, http, may_write=single)
        blob = constant_task(backbone_for(str(tiny_vit_file)), ["cat", "dog"], winner=1)
        r = http.put(f"/tasks/{TASK}/import", content=blob)
        assert r.status_code == 201, r.text
        s.ids.update(task_id=TASK, task=TASK, version=str(r.json()["current_version"]), rel="index.html",
                     job_id="job-oa-missing")
        yield s


def _dataset() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for label in (0, 1):
            for i in range(4):
                z.writestr(f"{label}/{i}.png", digit_png(label, i))
    return buf.getvalue()


def test_every_route_answers_as_its_document_says(served: Served) -> None:
    t, v = {"task_id": TASK}, {"task_id": TASK, "version": served.ids["version"]}
    png = digit_png(1)
    served.call("GET", "/tasks", 200)
    served.call("GET", "/tasks/{task_id}", 200, path_parameters=t)
    served.call("GET", "/tasks/{task_id}", 404, path_parameters={"task_id": "oa-missing"})
    served.call("GET", "/tasks/{task_id}", 400, path_parameters={"task_id": "bad id"})
    served.call("GET", "/tasks/{task_id}/versions", 200, path_parameters=t)
    served.call("GET", "/tasks/{task_id}/versions/{version}", 200, path_parameters=v)
    served.call("GET", "/tasks/{task_id}/versions/{version}", 422, path_parameters={**v, "version": "abc"})
    served.call("POST", "/tasks/{task_id}/versions/{version}/activate", 200, path_parameters=v)
    served.call("GET", "/tasks/{task_id}/export", 200, path_parameters=t)
    served.call("PUT", "/tasks/{task_id}/import", 422, path_parameters=t, body=b"not a task file",
                media_type="application/octet-stream")
    served.call("POST", "/predict", 200, query={"task": TASK, "top_k": 2}, body={"image": [png]},
                media_type="multipart/form-data")
    served.call("POST", "/predict", 400, query={"task": TASK}, body={"image": [b"no image"]},
                media_type="multipart/form-data")
    served.call("POST", "/predict", 200, query={"task": TASK}, body=png, media_type="image/png")  # raw body
    served.call("POST", "/predict", 400, query={"task": TASK}, body=b"no image", media_type="image/png")
    served.call("GET", "/jobs", 200)
    served.call("GET", "/jobs/{job_id}", 404, path_parameters={"job_id": "job-oa-missing"})
    for path in ("/backbone", "/healthz", "/readyz", "/metrics", "/v2", "/v2/health/live", "/v2/health/ready",
                 "/console"):
        served.call("GET", path, 200)
    served.call("GET", "/console/static/{rel}", 200, path_parameters={"rel": "index.html"})
    served.call("GET", "/console/static/{rel}", 404, path_parameters={"rel": "nothing.html"})
    _oip_tour(served)
    if served.may_write:
        _job_tour(served)


def _oip_tour(served: Served) -> None:
    m, mv = {"task": TASK}, {"task": TASK, "version": served.ids["version"]}
    served.call("GET", "/v2/models/{task}", 200, path_parameters=m)
    served.call("GET", "/v2/models/{task}", 404, path_parameters={"task": "oa-missing"})
    served.call("GET", "/v2/models/{task}/versions/{version}", 200, path_parameters=mv)
    served.call("GET", "/v2/models/{task}/ready", 200, path_parameters=m)
    served.call("GET", "/v2/models/{task}/versions/{version}/ready", 200, path_parameters=mv)
    pixels = {"inputs": [{"name": "images", "shape": [1, 3, 32, 32], "datatype": "FP32", "data": [0.0] * 3072}]}
    served.call("POST", "/v2/models/{task}/infer", 200, path_parameters=m, body=pixels,
                media_type="application/json")
    served.call("POST", "/v2/models/{task}/versions/{version}/infer", 200, path_parameters=mv, body=pixels,
                media_type="application/json")
    served.call("POST", "/v2/models/{task}/infer", 400, path_parameters=m, body={"inputs": []},
                media_type="application/json")


def _job_tour(served: Served) -> None:
    """Submit (the job stays queued: no worker), follow its events (the stream ends after 1 s), cancel."""
    r = served.call("POST", "/tasks/{task_id}/train", 202, path_parameters={"task_id": "oa-train"},
                    body={"dataset": _dataset(), "epochs": "1"}, media_type="multipart/form-data")
    job = {"job_id": r.json()["job_id"]}
    served.call("GET", "/jobs/{job_id}", 200, path_parameters=job)
    served.call("GET", "/jobs/{job_id}/events", 200, path_parameters=job)
    served.call("POST", "/jobs/{job_id}/cancel", 200, path_parameters=job)
    served.call("POST", "/jobs/{job_id}/cancel", 409, path_parameters=job)
    served.call("DELETE", "/tasks/{task_id}", 404, path_parameters={"task_id": "oa-train"})


def test_generated_requests_get_documented_answers(served: Served) -> None:
    """A few generated requests per operation (fixed seed), valid and invalid; on the shared front-end
    server only reads, so that nothing other tests own is touched."""
    failures: list[str] = []
    for result in served.schema.get_all_operations():
        op = result.ok()
        if not served.may_write and op.method.upper() != "GET":
            continue
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @FUZZ
            @given(case=op.as_strategy(mode))
            def run(case) -> None:
                case.call_and_validate(base_url=served.proc.base_url, checks=CHECKS, timeout=60)

            try:
                run()
            except Unsatisfiable:
                assert mode == schemathesis.GenerationMode.NEGATIVE  # nothing of this operation can be invalid
            except (Exception, BaseExceptionGroup) as e:  # noqa: BLE001 - every operation's, reported together
                failures.append(f"{op.label} ({mode.value}): {str(e)[:1200]}")
    assert not failures, "\n\n".join(failures)


def test_the_document_declares_the_error_shapes(served: Served) -> None:
    doc = served.http.get("/openapi.json").json()
    assert "HTTPValidationError" not in str(doc) and "ValidationError" not in doc["components"]["schemas"]
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            errors = {s: r for s, r in operation["responses"].items() if int(s) >= 400}
            assert {"413", "500"} <= set(errors), (method, path)
            want = "OipErrorOut" if path.startswith("/v2") else "ErrorOut"
            for status, response in errors.items():
                ref = response["content"]["application/json"]["schema"]["$ref"]
                assert ref.endswith("/" + want), (method, path, status, ref)
    assert "503" in doc["paths"]["/readyz"]["get"]["responses"]
    assert {"401", "403"} <= set(doc["paths"]["/metrics"]["get"]["responses"])
    assert {"408", "415", "429", "507"} <= set(doc["paths"]["/tasks/{task_id}/train"]["post"]["responses"])
    assert doc["components"]["schemas"]["OipErrorOut"]["properties"]["error"]["type"] == "string"


def test_validation_errors_use_the_house_shape(served: Served) -> None:
    for r in (served.http.get(f"/tasks/{TASK}/versions/abc"), served.http.post("/predict?task=x&top_k=0"),
              served.http.get(f"/tasks/{TASK}/export", params={"version": "0"})):
        body = r.json()
        assert r.status_code == 422 and set(body) == {"error"}, r.text
        assert body["error"]["code"] == "validation_error" and body["error"]["message"]
        assert body["error"]["details"][0]["loc"][0] in ("path", "query") and "detail" not in body


def test_head_answers_every_get_route_like_get(served: Served) -> None:
    doc = served.http.get("/openapi.json").json()
    gets = [p for p, ops in doc["paths"].items() if "get" in ops and "/events" not in p] + ["/openapi.json"]
    assert len(gets) > 15
    for template in gets:
        path = template.format(**served.ids)
        got, head = served.http.get(path), served.http.head(path)
        assert head.status_code == got.status_code == (404 if "{job_id}" in template else 200), (path, got.text[:200])
        assert head.content == b"", path
        assert head.headers["content-type"] == got.headers["content-type"], path
        if template != "/metrics":  # its counters move between the two requests
            assert int(head.headers["content-length"]) == len(got.content), path
    missing = served.http.head("/tasks/oa-missing")
    assert missing.status_code == 404 and missing.content == b""


def test_head_on_an_event_stream_ends_at_once(single_server: ServerProcess) -> None:
    """The stream's headers, no body."""
    with httpx.Client(base_url=single_server.base_url, timeout=60) as http:
        r = http.post("/tasks/oa-head/train", files={"dataset": ("d.zip", _dataset(), "application/zip")})
        assert r.status_code == 202, r.text
        head = http.head(f"/jobs/{r.json()['job_id']}/events", timeout=10)
        assert head.status_code == 200 and head.headers["content-type"].startswith("text/event-stream")
        assert head.content == b""
        assert http.delete("/tasks/oa-head").status_code == 204


def test_unsupported_methods_answer_405_with_allow(served: Served) -> None:
    for method, path, allowed in (("PATCH", f"/tasks/{TASK}", {"GET", "HEAD", "DELETE"}),
                                  ("PUT", "/healthz", {"GET", "HEAD"}), ("GET", "/predict", {"POST"}),
                                  ("HEAD", "/predict", {"POST"})):
        r = served.http.request(method, path)
        assert r.status_code == 405, (method, path)
        assert {m.strip() for m in r.headers["allow"].split(",")} == allowed, (method, path, r.headers["allow"])
        if method != "HEAD":
            assert r.json()["error"]["code"] == "method_not_allowed"
    r = served.http.delete("/v2/health/live")
    assert r.status_code == 405 and isinstance(r.json()["error"], str) and "GET" in r.headers["allow"]


def test_an_answer_the_document_does_not_declare_fails_the_check(served: Served) -> None:
    """The checks are not vacuous: the same answer fails once its status is taken out of the document."""
    doc = copy.deepcopy(served.http.get("/openapi.json").json())
    del doc["paths"]["/tasks/{task_id}"]["get"]["responses"]["404"]
    doc["paths"]["/healthz"]["get"]["responses"]["200"]["content"]["application/json"]["schema"] = {
        "type": "object", "required": ["status"], "properties": {"status": {"enum": ["fine"]}}}
    narrowed = schemathesis.openapi.from_dict(doc)
    for path, params, expected in (("/tasks/{task_id}", {"task_id": "oa-missing"}, "Undocumented status code"),
                                   ("/healthz", {}, "Response violates schema")):
        case = narrowed[path]["GET"].Case(path_parameters=params)
        with pytest.raises(FailureGroup) as failed:
            case.call_and_validate(base_url=served.proc.base_url, checks=CHECKS, timeout=60)
        titles = [getattr(e, "title", "") for e in failed.value.exceptions]
        assert titles == [expected], titles
