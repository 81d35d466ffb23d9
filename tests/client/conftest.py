"""Fixtures of the client tests: a scripted local HTTP server and clients pointed at it."""
from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from vpt_client import AsyncClient, Client
from vpt_client._retry import RetryPolicy

from tests.client.fake_server import DroppingServer, FakeServer

FAST_RETRY = {"initial_delay": 0.01, "max_delay": 0.05}


@pytest.fixture(scope="session")
def _fake_server() -> Iterator[FakeServer]:
    server = FakeServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def server(_fake_server: FakeServer) -> FakeServer:
    _fake_server.reset()
    return _fake_server


@pytest.fixture
def dropping_server() -> Iterator[DroppingServer]:
    s = DroppingServer()
    yield s
    s.stop()


@pytest.fixture
def client(server: FakeServer) -> Iterator[Client]:
    with Client(server.url, api_key="k-test", timeout=10) as c:
        c.retry_policy = RetryPolicy(max_retries=c.max_retries, **FAST_RETRY)
        yield c


@pytest.fixture
async def aclient(server: FakeServer) -> AsyncIterator[AsyncClient]:
    async with AsyncClient(server.url, api_key="k-test", timeout=10) as c:
        c.retry_policy = RetryPolicy(max_retries=c.max_retries, **FAST_RETRY)
        yield c
