"""Defaults of the SDK: one place to read them."""
from __future__ import annotations

import httpx

__version__ = "0.1.0"

ENV_BASE_URL = "VPT_BASE_URL"
ENV_API_KEY = "VPT_API_KEY"
DEFAULT_BASE_URL = "http://127.0.0.1:8000"

# Ordinary calls; train uploads and export downloads get a longer read/write allowance.
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=5.0)
UPLOAD_TIMEOUT = httpx.Timeout(600.0, connect=5.0)
# Server-sent events: the connection idles between progress events.
STREAM_TIMEOUT = httpx.Timeout(None, connect=5.0)

DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY = 0.5  # seconds, doubled on every attempt
MAX_RETRY_DELAY = 8.0
# A Retry-After longer than this is not waited out: the BusyError reaches the caller instead.
MAX_RETRY_AFTER = 60.0

DEFAULT_POLL_INTERVAL = 1.0
# A dataset zip stays in memory up to this size, then spills to a temporary file.
SPOOL_MAX_BYTES = 8 * 1024 * 1024

JOB_TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})
