"""Both store backends behind one fixture, so every contract test runs against each."""
from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from prompt_store import Store, open_store


@dataclass
class Backend:
    """Where a store lives; `open()` gives another client of the same data (a second replica)."""

    kind: str
    url: str
    options: dict[str, Any]
    opened: list[Store] = field(default_factory=list)

    def open(self) -> Store:
        store = open_store(self.url, **self.options)
        self.opened.append(store)
        return store


def make_blob(seed: int, size: int = 4096) -> bytes:
    """A deterministic pseudo task file whose content differs per seed."""
    chunk = hashlib.sha256(str(seed).encode()).digest()
    return (chunk * (size // len(chunk) + 1))[:size]


def meta_for(blob: bytes, **extra: str) -> dict[str, str]:
    """Metadata carrying the blob's own checksum, so readers can check blob/record pairing."""
    return {"format": "vpt-task/1", "blob_sha": hashlib.sha256(blob).hexdigest(), **extra}


@pytest.fixture(params=["local", "redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        b = Backend("local", f"file://{tmp_path / 'store'}", {})
    else:
        url = request.getfixturevalue("redis_url")
        b = Backend("redis", url, {"prefix": "t" + uuid.uuid4().hex[:12]})
    yield b
    for store in b.opened:
        store.close()


@pytest.fixture
def store(backend: Backend) -> Store:
    return backend.open()
