"""What the sync and async clients share: settings, request building, answer handling, retry policy.

Each endpoint is described once, as a `Call` (see `_calls.py`); `Client` and `AsyncClient` only
differ in how they send it and how they sleep between attempts.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypedDict, TypeVar, Unpack

import httpx
from pydantic import ValidationError

from vpt_client._constants import (
    DEFAULT_BASE_URL,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    ENV_API_KEY,
    ENV_BASE_URL,
    __version__,
)
from vpt_client._retry import Retry, RetryPolicy
from vpt_client.errors import (
    APIConnectionError,
    APITimeoutError,
    InvalidInputError,
    ResponseValidationError,
    make_api_error,
)
from vpt_client.models import Job

logger = logging.getLogger(__name__)

T = TypeVar("T")
C = TypeVar("C")
TimeoutTypes = float | httpx.Timeout | None


class ClientOptions(TypedDict, total=False):
    """Keyword settings shared by `Client` and `AsyncClient`; defaults in `BaseClient.__init__`."""

    timeout: TimeoutTypes
    max_retries: int
    headers: Mapping[str, str] | None


@dataclass(frozen=True)
class Call(Generic[T]):
    """One API request: how to send it, whether it may be resent, how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    retry: Retry
    params: Mapping[str, Any] | None = None
    content: bytes | None = None
    files: list[tuple[str, Any]] | None = None
    data: Mapping[str, str] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeout: TimeoutTypes | None = None  # None: the client's
    # Error statuses handed to `parse` instead of raised (e.g. 503 from /readyz).
    accept: frozenset[int] = frozenset()


class BaseClient:
    """Configuration and the transport-independent half of every request."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        unknown = sorted(set(options) - set(ClientOptions.__annotations__))
        if unknown:
            raise TypeError(f"unexpected keyword argument(s) {', '.join(unknown)}")
        timeout = options.get("timeout", DEFAULT_TIMEOUT)
        max_retries = options.get("max_retries", DEFAULT_MAX_RETRIES)
        base_url = base_url or os.environ.get(ENV_BASE_URL) or DEFAULT_BASE_URL
        if not base_url.startswith(("http://", "https://")):
            raise InvalidInputError(f"base URL {base_url!r} must start with http:// or https://")
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key if api_key is not None else (os.environ.get(ENV_API_KEY) or None)
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        if max_retries < 0:
            raise InvalidInputError("max_retries must be >= 0")
        self.max_retries = max_retries
        self.retry_policy = RetryPolicy(max_retries=max_retries)
        self._extra_headers = dict(options.get("headers") or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}(base_url={self.base_url!r})"

    @property
    def default_headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": f"vpt-client/{__version__}"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        headers.update(self._extra_headers)
        return headers

    def _build_request(self, http: httpx.Client | httpx.AsyncClient, call: Call[Any]) -> httpx.Request:
        timeout = self.timeout if call.timeout is None else call.timeout
        if not isinstance(timeout, httpx.Timeout):
            timeout = httpx.Timeout(timeout)
        return http.build_request(
            call.method,
            self.base_url + call.path,
            params=call.params,
            content=call.content,
            files=call.files,
            data=call.data,
            headers={**self.default_headers, **call.headers},
            timeout=timeout,
        )

    def _delay_after_response(self, call: Call[Any], attempt: int, response: httpx.Response) -> float | None:
        if response.is_success or response.status_code in call.accept:
            return None
        delay = self.retry_policy.delay_after_response(call.retry, attempt, response)
        if delay is not None:
            logger.info("%s %s answered %d; retrying in %.2fs (retry %d of %d)", call.method, call.path,
                        response.status_code, delay, attempt + 1, self.max_retries)
        return delay

    def _delay_after_error(self, call: Call[Any], attempt: int, error: httpx.TransportError) -> float | None:
        delay = self.retry_policy.delay_after_error(call.retry, attempt, error)
        if delay is not None:
            logger.info("%s %s failed (%s); retrying in %.2fs (retry %d of %d)", call.method, call.path,
                        type(error).__name__, delay, attempt + 1, self.max_retries)
        return delay

    def _check(self, call: Call[Any], response: httpx.Response) -> None:
        """Raise the mapped APIError for an error answer `call` does not accept; the body must be read."""
        if not response.is_success and response.status_code not in call.accept:
            raise make_api_error(response)

    def _parse(self, call: Call[T], response: httpx.Response) -> T:
        try:
            return call.parse(response)
        except (ValidationError, ValueError, KeyError, TypeError) as exc:
            raise ResponseValidationError(
                f"{call.method} {call.path}: unexpected answer ({type(exc).__name__}: {str(exc)[:300]})",
                response=response,
            ) from exc

    def _connection_error(self, call: Call[Any], error: httpx.TransportError) -> APIConnectionError:
        where = f"{call.method} {self.base_url}{call.path}"
        if isinstance(error, httpx.TimeoutException):
            return APITimeoutError(f"{where} timed out ({type(error).__name__})")
        return APIConnectionError(f"{where}: {error or type(error).__name__}")


class _JobHandleBase(Generic[C]):
    """What `JobHandle` and `AsyncJobHandle` share: the client, the latest known Job, and its id/state."""

    def __init__(self, client: C, job: Job) -> None:
        self._client = client
        self.job = job

    def __repr__(self) -> str:
        return f"{type(self).__name__}(job_id={self.job_id!r}, state={self.state!r})"

    @property
    def job_id(self) -> str:
        return self.job.job_id

    @property
    def state(self) -> str:
        return self.job.state
