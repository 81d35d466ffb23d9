"""open_store picks the backend from the URL and refuses what it does not know."""
from __future__ import annotations

from pathlib import Path

import pytest

from prompt_store import (
    LocalJobQueue,
    LocalStore,
    RedisJobQueue,
    RedisStore,
    StoreUnavailable,
    UnsupportedStoreUrl,
    open_queue,
    open_store,
)


def test_local_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for url in (f"file://{tmp_path}/a", str(tmp_path / "b"), f"file://localhost{tmp_path}/c"):
        with open_store(url) as store:
            assert isinstance(store, LocalStore) and store.root.parent == tmp_path
            assert isinstance(open_queue(store), LocalJobQueue)
    monkeypatch.chdir(tmp_path)
    with open_store("file://./rel") as store:
        assert store.root == tmp_path / "rel"
    with open_store("var") as store:
        assert store.root == tmp_path / "var"


def test_redis_urls(redis_url: str) -> None:
    with open_store(redis_url, prefix="factory") as store:
        assert isinstance(store, RedisStore) and store.keys.prefix == "factory"
        store.ping()
        assert isinstance(open_queue(store), RedisJobQueue)


@pytest.mark.parametrize("url", ["", "   ", "s3://bucket/x", "http://host/", "file://"])
def test_unknown_urls_are_clear_errors(url: str) -> None:
    with pytest.raises(UnsupportedStoreUrl, match="store URL|names no path|empty"):
        open_store(url)


def test_unreachable_redis_is_store_unavailable() -> None:
    from tests.fixtures.redis_server import free_port

    with open_store(f"redis://127.0.0.1:{free_port()}/0", connect_timeout=0.2, retries=0) as store:
        with pytest.raises(StoreUnavailable) as info:
            store.ping()
        assert info.value.__cause__ is not None
        with pytest.raises(StoreUnavailable):
            store.get_task("t", "task")
