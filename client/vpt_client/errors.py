"""The SDK's exceptions, and the one function that maps an HTTP answer to one of them.

    VPTError
    ├── APIError (status, code, message, details, request_id)
    │   ├── BadRequestError (400, 422)
    │   │   └── InvalidDatasetError (400, code dataset_*)
    │   ├── AuthenticationError (401)
    │   ├── PermissionDeniedError (403)
    │   ├── NotFoundError (404)
    │   ├── ConflictError (409)
    │   ├── PayloadTooLargeError (413)
    │   ├── UnsupportedMediaTypeError (415)
    │   └── ServerError (5xx)
    │       └── BusyError (503, retry_after)
    ├── APIConnectionError (transport failure)
    │   └── APITimeoutError
    ├── ResponseValidationError (a success answer that does not parse)
    ├── InvalidInputError (bad arguments caught before anything is sent)
    ├── JobFailedError (a waited-for job ended failed or cancelled)
    └── WaitTimeoutError (a wait ran out of time; the job goes on)
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import httpx

from vpt_client._retry import parse_retry_after

if TYPE_CHECKING:
    from vpt_client.models import Job

__all__ = [
    "APIConnectionError",
    "APIError",
    "APITimeoutError",
    "AuthenticationError",
    "BadRequestError",
    "BusyError",
    "ConflictError",
    "InvalidDatasetError",
    "InvalidInputError",
    "JobFailedError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "ResponseValidationError",
    "ServerError",
    "UnsupportedMediaTypeError",
    "VPTError",
    "WaitTimeoutError",
    "make_api_error",
]


class VPTError(Exception):
    """Root of every exception the SDK raises."""

    code: str = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class APIError(VPTError):
    """The server answered with an error status."""

    def __init__(
        self,
        message: str,
        *,
        status: int,
        code: str,
        details: Any = None,
        request_id: str | None = None,
        response: httpx.Response | None = None,
    ) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.details = details
        self.request_id = request_id
        self.response = response

    def __str__(self) -> str:
        return f"{self.code}: {self.message} (HTTP {self.status})"


class BadRequestError(APIError):
    """400 or 422: the request itself is wrong (parameters, image, task file)."""


class InvalidDatasetError(BadRequestError):
    """400 with a `dataset_*` code: the uploaded dataset was refused; `details` names the entries."""


class AuthenticationError(APIError):
    """401: no API key, or an unknown one."""


class PermissionDeniedError(APIError):
    """403."""


class NotFoundError(APIError):
    """404: unknown task, version or job (or another tenant's)."""


class ConflictError(APIError):
    """409: e.g. a training already in progress, or cancelling a finished job."""


class PayloadTooLargeError(APIError):
    """413."""


class UnsupportedMediaTypeError(APIError):
    """415."""


class ServerError(APIError):
    """5xx."""


class BusyError(ServerError):
    """503: queue full, store unavailable or not ready. `retry_after` is in seconds when the server said."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


class APIConnectionError(VPTError):
    """The request did not get an answer: connection refused or dropped, DNS failure, etc."""

    code = "connection_error"


class APITimeoutError(APIConnectionError):
    """The request timed out."""

    code = "timeout"


class ResponseValidationError(VPTError):
    """The server answered success with a body the SDK cannot read (e.g. a proxy's page, a version skew)."""

    code = "invalid_response"

    def __init__(self, message: str, *, response: httpx.Response | None = None) -> None:
        super().__init__(message)
        self.response = response


class InvalidInputError(VPTError, ValueError):
    """An argument is unusable (missing file, unsupported image type); nothing was sent."""

    code = "invalid_input"


class JobFailedError(VPTError):
    """A job being waited for ended `failed` or `cancelled`; `job` is its final state."""

    def __init__(self, job: Job) -> None:
        err = job.error
        code = err.code if err is not None and err.code else f"job_{job.state}"
        message = err.message if err is not None and err.message else f"job {job.job_id} {job.state}"
        super().__init__(message, code=code)
        self.job = job


class WaitTimeoutError(VPTError):
    """`wait()` gave up; the job itself goes on (`job` is the last state seen)."""

    code = "wait_timeout"

    def __init__(self, job: Job, timeout: float) -> None:
        super().__init__(f"job {job.job_id} still {job.state} after {timeout:g}s")
        self.job = job


_BY_STATUS: dict[int, type[APIError]] = {
    400: BadRequestError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    413: PayloadTooLargeError,
    415: UnsupportedMediaTypeError,
    422: BadRequestError,
    503: BusyError,
}
# Used when the body is not the documented {"error": {...}} (e.g. a proxy's own error page).
_DEFAULT_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
                  409: "conflict", 413: "payload_too_large", 415: "unsupported_media_type",
                  422: "validation_error", 503: "busy", 504: "timeout", 500: "internal_error"}


def make_api_error(response: httpx.Response) -> APIError:
    """Map an error answer to its exception class: the only place where statuses become types."""
    status = response.status_code
    code, message, details = _read_error_body(response)
    code = code or _DEFAULT_CODES.get(status, f"http_{status}")
    cls = _BY_STATUS.get(status) or (ServerError if status >= 500 else APIError)
    if status == 400 and code.startswith("dataset_"):
        cls = InvalidDatasetError
    kwargs: dict[str, Any] = {"status": status, "code": code, "details": details, "response": response,
                              "request_id": response.headers.get("x-request-id")}
    if cls is BusyError:
        kwargs["retry_after"] = parse_retry_after(response.headers)
    return cls(message or response.reason_phrase or f"HTTP {status}", **kwargs)


def _read_error_body(response: httpx.Response) -> tuple[str | None, str, Any]:
    try:
        body = json.loads(response.content) if response.content else None
    except ValueError:
        return None, response.text[:500].strip(), None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return (str(err["code"]) if err.get("code") else None, str(err.get("message") or ""),
                err.get("details"))
    if isinstance(body, dict) and "detail" in body:  # a framework's default error shape
        detail = body["detail"]
        return None, detail if isinstance(detail, str) else json.dumps(detail), detail
    return None, response.text[:500].strip(), None
