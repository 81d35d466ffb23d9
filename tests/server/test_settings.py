"""Settings that need no server: what logs may show of the store URL."""
from __future__ import annotations

import pytest

from server.settings import Settings


@pytest.mark.parametrize("url,shown", [
    ("redis://:0f1e2d@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://app:p@ss@cache.internal:6380/1", "rediss://app:***@cache.internal:6380/1"),
    ("redis://:@redis:6379/0", "redis://:@redis:6379/0"),
    ("redis://redis:6379/0", "redis://redis:6379/0"),
    ("file:///data/store", "file:///data/store"),
])
def test_store_password_is_not_logged(url: str, shown: str) -> None:
    assert Settings(store=url).store_redacted == shown
