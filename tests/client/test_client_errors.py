"""Every status and code of docs/api.md maps to its exception, with the body's fields kept."""
from __future__ import annotations

import pytest
import vpt_client as v
from vpt_client import AsyncClient, Client

from tests.client.fake_server import FakeServer, error, raw

DATASET_CODES = [
    "dataset_unsafe_path", "dataset_link", "dataset_too_large", "dataset_bomb", "dataset_image_too_large",
    "dataset_corrupt_image", "dataset_not_image", "dataset_empty_class", "dataset_too_few_classes",
    "dataset_manifest_missing_file", "dataset_manifest_invalid", "dataset_archive_invalid",
    "dataset_too_few_images",
]
CASES = (
    [(400, c, v.BadRequestError) for c in ("bad_request", "invalid_task_id", "invalid_parameter", "image_invalid")]
    + [(400, c, v.InvalidDatasetError) for c in DATASET_CODES]
    + [(401, "unauthorized", v.AuthenticationError), (403, "forbidden", v.PermissionDeniedError)]
    + [(404, c, v.NotFoundError) for c in ("not_found", "task_not_found", "version_not_found", "job_not_found")]
    + [(409, c, v.ConflictError) for c in ("conflict", "training_in_progress", "job_finished")]
    + [(413, "payload_too_large", v.PayloadTooLargeError), (415, "unsupported_media_type",
                                                            v.UnsupportedMediaTypeError)]
    + [(422, c, v.BadRequestError) for c in ("validation_error", "task_file_invalid", "backbone_mismatch")]
    + [(503, c, v.BusyError) for c in ("busy", "store_unavailable", "not_ready")]
    + [(504, "timeout", v.ServerError), (500, "internal_error", v.ServerError)]
)


@pytest.mark.parametrize(("status", "code", "cls"), CASES, ids=[f"{s}-{c}" for s, c, _ in CASES])
def test_status_and_code_map_to_exception(server: FakeServer, status: int, code: str, cls: type) -> None:
    details = {"entries": ["../evil.png"]} if code.startswith("dataset_") else None
    headers = {"x-request-id": "req-42"} | ({"Retry-After": "7"} if status == 503 else {})
    server.on("GET", "/tasks/digits", error(status, code, f"message for {code}", details, headers))
    with Client(server.url, max_retries=0) as client, pytest.raises(cls) as info:
        client.tasks.get("digits")
    exc = info.value
    assert type(exc) is cls
    assert isinstance(exc, v.APIError) and isinstance(exc, v.VPTError)
    assert (exc.status, exc.code, exc.message) == (status, code, f"message for {code}")
    assert exc.details == details
    assert exc.request_id == "req-42"
    assert str(exc) == f"{code}: message for {code} (HTTP {status})"
    if status == 503:
        assert exc.retry_after == 7.0
    # dataset_* only when the status is 400; 5xx always under ServerError
    assert isinstance(exc, v.InvalidDatasetError) == code.startswith("dataset_")
    assert isinstance(exc, v.ServerError) == (status >= 500)


def test_body_without_error_object_gets_status_default_code(server: FakeServer) -> None:
    server.on("GET", "/tasks", raw(413, b"<html>Request Entity Too Large</html>", "text/html"))
    server.on("GET", "/backbone", raw(422, b'{"detail": [{"loc": ["query", "top_k"]}]}', "application/json"))
    server.on("GET", "/healthz", raw(418, b"", "text/plain"))
    with Client(server.url, max_retries=0) as client:
        with pytest.raises(v.PayloadTooLargeError) as too_large:
            client.tasks.list()
        with pytest.raises(v.BadRequestError) as invalid:
            client.backbone()
        with pytest.raises(v.APIError) as teapot:
            client.health()
    assert too_large.value.code == "payload_too_large" and "Too Large" in too_large.value.message
    assert invalid.value.code == "validation_error" and invalid.value.details == [{"loc": ["query", "top_k"]}]
    assert type(teapot.value) is v.APIError and teapot.value.code == "http_418"


async def test_async_client_maps_errors_the_same_way(server: FakeServer) -> None:
    server.on("GET", "/jobs/j-9", error(404, "job_not_found", "no job j-9"))
    server.on("POST", "/tasks/digits/versions/3/activate", error(409, "conflict", "busy task"))
    async with AsyncClient(server.url, max_retries=0) as client:
        with pytest.raises(v.NotFoundError) as missing:
            await client.jobs.get("j-9")
        with pytest.raises(v.ConflictError):
            await client.tasks.activate("digits", 3)
    assert missing.value.code == "job_not_found" and missing.value.message == "no job j-9"


def test_connection_refused_is_api_connection_error() -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    with Client(f"http://127.0.0.1:{port}", max_retries=0) as client, pytest.raises(v.APIConnectionError) as info:
        client.tasks.list()
    assert info.value.code == "connection_error" and not isinstance(info.value, v.APIError)
    assert isinstance(info.value.__cause__, Exception)  # chained from the transport error


def test_client_side_input_errors_send_nothing(server: FakeServer, client: Client, tmp_path) -> None:
    with pytest.raises(v.InvalidInputError):
        client.predict("digits", tmp_path / "missing.png")
    with pytest.raises(v.InvalidInputError):
        client.predict("digits", [object()])
    with pytest.raises(v.InvalidInputError):
        client.predict("digits", b"\x89PNG", top_k=0)
    with pytest.raises(v.InvalidInputError):
        client.tasks.get("")
    with pytest.raises(v.InvalidInputError):
        client.tasks.import_("digits", b"")
    with pytest.raises(v.VPTError):
        Client("ftp://example")
    assert server.requests == []


def test_unreadable_success_answer_is_response_validation_error(server: FakeServer, client: Client) -> None:
    server.on("GET", "/tasks/digits", raw(200, b"<html>login page</html>", "text/html"))
    server.on("GET", "/jobs/j-1", raw(200, b'{"job_id": "j-1"}', "application/json"))  # no state
    with pytest.raises(v.ResponseValidationError) as html:
        client.tasks.get("digits")
    with pytest.raises(v.ResponseValidationError) as partial:
        client.jobs.get("j-1")
    assert html.value.code == partial.value.code == "invalid_response"
    assert html.value.response is not None and html.value.response.status_code == 200
    assert "state" in partial.value.message
