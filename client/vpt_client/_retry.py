"""When to try a request again, and how long to wait first.

Which calls are retried:

- `IDEMPOTENT` (every GET, DELETE, PUT import, cancel, activate): on 408, 429, 502, 503, 504 and on
  any transport failure, timeouts included.
- `SAFE` (POST /predict): a prediction changes nothing on the server, so it is retried on 503 and
  on connection failures (refused, dropped), but not after a read timeout, where the server may
  still be working on it and a resend would only add load.
- `NEVER` (POST /train): a resend could start a second job.

The wait honours `Retry-After` (seconds or an HTTP date) when the server sends one; otherwise it is
an exponential backoff with jitter. A `Retry-After` above `max_retry_after` is not waited out.
"""
from __future__ import annotations

import email.utils
import enum
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import httpx

from vpt_client._constants import (
    DEFAULT_MAX_RETRIES,
    INITIAL_RETRY_DELAY,
    MAX_RETRY_AFTER,
    MAX_RETRY_DELAY,
)


class Retry(enum.Enum):
    NEVER = "never"
    SAFE = "safe"
    IDEMPOTENT = "idempotent"


_IDEMPOTENT_STATUSES = frozenset({408, 429, 502, 503, 504})
_SAFE_STATUSES = frozenset({503})
_CONNECTION_FAILURES = (httpx.ConnectError, httpx.ConnectTimeout, httpx.ReadError,
                        httpx.WriteError, httpx.RemoteProtocolError)


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """`Retry-After` in seconds from now (delta-seconds or an HTTP date), or None when absent or bad."""
    value = headers.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = DEFAULT_MAX_RETRIES
    initial_delay: float = INITIAL_RETRY_DELAY
    max_delay: float = MAX_RETRY_DELAY
    max_retry_after: float = MAX_RETRY_AFTER

    def delay_after_response(self, kind: Retry, attempt: int, response: httpx.Response) -> float | None:
        """Seconds to wait before attempt `attempt + 1`, or None when the answer is final."""
        if attempt >= self.max_retries or kind is Retry.NEVER:
            return None
        statuses = _IDEMPOTENT_STATUSES if kind is Retry.IDEMPOTENT else _SAFE_STATUSES
        if response.status_code not in statuses:
            return None
        retry_after = parse_retry_after(response.headers)
        if retry_after is None:
            return self.backoff(attempt)
        if retry_after > self.max_retry_after:
            return None
        # A little extra, never less than asked, so that clients told the same time spread out.
        return retry_after * (1.0 + 0.1 * random.random())

    def delay_after_error(self, kind: Retry, attempt: int, error: httpx.TransportError) -> float | None:
        if attempt >= self.max_retries or kind is Retry.NEVER:
            return None
        if kind is Retry.SAFE and not isinstance(error, _CONNECTION_FAILURES):
            return None
        return self.backoff(attempt)

    def backoff(self, attempt: int) -> float:
        delay = min(self.initial_delay * 2.0**attempt, self.max_delay)
        return delay * (1.0 - 0.25 * random.random())
