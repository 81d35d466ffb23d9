"""HTTP errors: one root, and the single place where lower layers' errors become statuses."""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from kernels.errors import KernelError
from prompt_store.errors import (
    BankFull,
    InvalidId,
    JobNotFound,
    RecordCorrupt,
    StoreConflict,
    StoreError,
    StoreFull,
    StoreUnavailable,
    TaskNotFound,
    TaskTooLarge,
    TaskUnservable,
    VersionNotFound,
    is_disk_full,
)
from vpt.data.errors import DatasetError
from vpt.errors import TaskFileError, TaskSpecError, VPTError

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error with an HTTP status, a stable code and a message (plus optional details/headers)."""

    def __init__(self, status: int, code: str, message: str, details: Any = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.headers = details, headers


def busy(message: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, "busy", message, headers={"Retry-After": str(retry_after_s)})


def insufficient_storage() -> ApiError:
    """507: the server's disk is full (or read-only); nothing was stored. Retrying later may work."""
    return ApiError(507, "insufficient_storage", "the server is out of disk space; nothing was stored",
                    headers={"Retry-After": "30"})


_STATUS_OF_CODE = ((TaskNotFound, 404), (VersionNotFound, 404), (JobNotFound, 404), (TaskTooLarge, 422),
                   (TaskUnservable, 422))


def translate(exc: Exception) -> ApiError:
    """Map an error from below the server to its HTTP answer."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, DatasetError):
        return ApiError(400, exc.code, exc.message, details=exc.entries or None)
    if isinstance(exc, InvalidId):
        code = "invalid_job_id" if "job id" in str(exc) else "invalid_task_id"
        return ApiError(400, code, str(exc))
    for kind, status in _STATUS_OF_CODE:  # errors whose own `code` is the HTTP code
        if isinstance(exc, kind):
            return ApiError(status, exc.code, str(exc))
    if isinstance(exc, StoreConflict):  # JobFinished too: callers that mean "finished" say so themselves
        return ApiError(409, "conflict", str(exc))
    if isinstance(exc, BankFull):
        return busy(f"every prompt bank slot is in use: {exc}")
    if isinstance(exc, StoreFull) or is_disk_full(exc):
        log.error("out of disk space: %s", exc)
        return insufficient_storage()
    if isinstance(exc, StoreUnavailable):
        return ApiError(503, "store_unavailable", "the prompt store is unavailable; retry shortly",
                        headers={"Retry-After": "2"})
    if isinstance(exc, RecordCorrupt):
        log.error("corrupt store record: %s", exc)
        return ApiError(500, "internal_error", "a stored record is corrupt")
    if isinstance(exc, TaskFileError):
        return ApiError(422, exc.code, exc.message)
    if isinstance(exc, TaskSpecError) or getattr(exc, "code", None) == "invalid_parameter":
        return ApiError(400, "invalid_parameter", str(exc))
    if isinstance(exc, StoreError):
        log.error("store error: %s", exc)
        return ApiError(500, "internal_error", "store error")
    if isinstance(exc, (KernelError, VPTError)):
        log.exception("engine error", exc_info=exc)
        return ApiError(500, "internal_error", "inference failed")
    log.exception("unhandled error", exc_info=exc)
    return ApiError(500, "internal_error", "internal server error")


OIP_PREFIX = "/v2"  # Open Inference Protocol routes answer errors in that protocol's own shape


def is_oip_path(path: str) -> bool:
    return path == OIP_PREFIX or path.startswith(OIP_PREFIX + "/")


def oip_error_body(message: str) -> dict[str, str]:
    """The protocol's error object: `{"error": "<message>"}` (Triton's clients fail on anything else)."""
    return {"error": message}


def error_response(err: ApiError, request_id: str | None = None, path: str = "") -> JSONResponse:
    if is_oip_path(path):
        return JSONResponse(oip_error_body(err.message), status_code=err.status, headers=err.headers)
    body: dict[str, Any] = {"code": err.code, "message": err.message}
    if err.details is not None:
        body["details"] = err.details
    if request_id:
        body["request_id"] = request_id
    return JSONResponse({"error": body}, status_code=err.status, headers=err.headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 408: "request_timeout", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "validation_error", 503: "busy"}


def http_error(exc: StarletteHTTPException) -> ApiError:
    """Starlette's HTTP exceptions (404 routes, 405, the body limits' 408/413) in our shape."""
    return ApiError(exc.status_code, _HTTP_CODES.get(exc.status_code, "error"), str(exc.detail), headers=exc.headers)


def install_handlers(app: FastAPI) -> None:
    def respond(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err, getattr(request.state, "request_id", None), request.url.path)

    @app.exception_handler(ApiError)
    async def _api(request: Request, exc: ApiError) -> JSONResponse:
        return respond(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        msg = f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}"
        return respond(request, ApiError(422, "validation_error", msg, details=errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return respond(request, http_error(exc))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> JSONResponse:
        log.info("client left before sending the whole body: %s %s", request.method, request.url.path)
        return respond(request, ApiError(400, "bad_request", "the client closed the connection mid-request"))

    async def _translated(request: Request, exc: Exception) -> JSONResponse:
        return respond(request, translate(exc))

    # handled inside the app: no traceback, no re-raise (OSError: a full or read-only disk answers 507)
    for root in (StoreError, VPTError, KernelError, OSError):
        app.add_exception_handler(root, _translated)
    app.add_exception_handler(Exception, _translated)  # bugs: logged, answered 500 with the error shape
