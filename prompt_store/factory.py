"""Open a store (and its job queue) from a URL."""
from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote, urlparse

from prompt_store.base import Store
from prompt_store.errors import StoreError
from prompt_store.local import LocalStore
from prompt_store.queue import JobQueue, LocalJobQueue
from prompt_store.redis_queue import RedisJobQueue
from prompt_store.redis_store import RedisStore

REDIS_SCHEMES = ("redis", "rediss", "unix")


class UnsupportedStoreUrl(StoreError, ValueError):
    """The URL names no known backend."""

    code = "invalid_store_url"


def open_store(url: str, **options: object) -> Store:
    """`file://PATH` or a bare path -> LocalStore; `redis://`, `rediss://`, `unix://` -> RedisStore.

    `options` go to the backend's constructor (e.g. `prefix=` for Redis, `poll_interval=` for local).
    """
    if not isinstance(url, str) or not url.strip():
        raise UnsupportedStoreUrl("the store URL is empty; use file://PATH, a path, or redis://HOST:PORT/DB")
    url = url.strip()
    scheme = urlparse(url).scheme.lower()
    if scheme in REDIS_SCHEMES:
        return RedisStore(url, **options)  # type: ignore[arg-type]
    if scheme == "file":  # file://PATH: everything after `file://` is the path (file:///abs, file://./rel)
        path = unquote(url[len("file://"):]) if url[:7].lower() == "file://" else ""
        if path.startswith("localhost/"):
            path = path[len("localhost"):]
        if not path:
            raise UnsupportedStoreUrl(f"file URL {url!r} names no path; use file:///abs/path or file://./rel")
        return LocalStore(Path(path), **options)  # type: ignore[arg-type]
    if scheme == "" or (len(scheme) == 1 and url[1:3] in (":\\", ":/")):  # a bare (or Windows drive) path
        return LocalStore(Path(url), **options)  # type: ignore[arg-type]
    raise UnsupportedStoreUrl(
        f"unsupported store URL scheme {scheme!r} in {url!r}: use file://PATH, a path, redis://, rediss:// or unix://"
    )


def open_queue(store: Store, stale_s: float = 120.0, max_claims: int = 3) -> JobQueue:
    """The Redis Streams queue for a Redis store; the store's own records for a local one.

    `stale_s`: a running job whose worker sent no heartbeat this long is recovered; `max_claims`:
    a job claimed this many times without finishing is failed (`worker_lost`)."""
    if isinstance(store, RedisStore):
        return RedisJobQueue(store, stale_s, max_claims)
    return LocalJobQueue(store, stale_s, max_claims)
