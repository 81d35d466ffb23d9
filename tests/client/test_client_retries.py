"""Retries: which calls, how many times, and waits that honour Retry-After (lower bounds only)."""
from __future__ import annotations

import email.utils
import math
import time

import pytest
import vpt_client as v
from vpt_client import AsyncClient, Client
from vpt_client._retry import Retry, RetryPolicy, parse_retry_after

from tests.client import samples
from tests.client.fake_server import DroppingServer, FakeServer, error, reply

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 16


def _busy(retry_after: str | None = None):
    return error(503, "busy", "queue full", headers={"Retry-After": retry_after} if retry_after else None)


def test_get_retries_on_503_and_waits_retry_after(server: FakeServer) -> None:
    server.on("GET", "/tasks", _busy("1"), reply(200, {"tasks": [samples.TASK]}))
    with Client(server.url, max_retries=2) as client:
        start = time.monotonic()
        tasks = client.tasks.list()
        elapsed = time.monotonic() - start
    calls = server.calls("GET", "/tasks")
    assert len(calls) == 2
    assert tasks[0].task_id == "digits"
    assert elapsed >= 1.0
    assert calls[1].at - calls[0].at >= 1.0 - 0.01  # server-side arrival times, same clock


def test_retry_after_as_http_date_is_honoured(server: FakeServer) -> None:
    when = math.floor(time.time()) + 2
    server.on("GET", "/backbone", _busy(email.utils.formatdate(when, usegmt=True)), reply(200, samples.BACKBONE))
    with Client(server.url, max_retries=1) as client:
        assert client.backbone().name == samples.BACKBONE["name"]
    calls = server.calls("GET", "/backbone")
    assert len(calls) == 2
    assert calls[1].at >= when - 0.01


def test_retries_stop_after_max_retries_with_busy_error(server: FakeServer, client: Client) -> None:
    server.on("GET", "/jobs", _busy("0"))
    with pytest.raises(v.BusyError) as info:
        client.jobs.list()
    assert len(server.calls("GET", "/jobs")) == 3  # 1 + max_retries (2)
    assert info.value.retry_after == 0.0 and info.value.code == "busy"


def test_long_retry_after_is_not_waited_out(server: FakeServer, client: Client) -> None:
    server.on("GET", "/tasks", _busy("120"))
    with pytest.raises(v.BusyError) as info:
        client.tasks.list()
    assert len(server.calls("GET", "/tasks")) == 1
    assert info.value.retry_after == 120.0


def test_train_is_never_retried(server: FakeServer, client: Client, tmp_path) -> None:
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "a.png").write_bytes(PNG)
    server.on("POST", "/tasks/digits/train", _busy("0"))
    with pytest.raises(v.BusyError):
        client.train("digits", tmp_path)
    assert len(server.calls("POST", "/tasks/digits/train")) == 1


def test_predict_is_retried_on_503_but_not_on_500(server: FakeServer, client: Client) -> None:
    server.on("POST", "/predict", _busy("0"), reply(200, samples.PREDICTION))
    assert client.predict("digits", PNG).results[0].label == "7"
    assert len(server.calls("POST", "/predict")) == 2
    server.reset()
    server.on("POST", "/predict", error(500, "internal_error"))
    with pytest.raises(v.ServerError):
        client.predict("digits", PNG)
    assert len(server.calls("POST", "/predict")) == 1


@pytest.mark.parametrize("status", [502, 504, 429])
def test_idempotent_calls_retry_gateway_errors(server: FakeServer, client: Client, status: int) -> None:
    server.on("DELETE", "/tasks/digits", error(status, "timeout"), reply(204))
    assert client.tasks.delete("digits") is None
    assert len(server.calls("DELETE", "/tasks/digits")) == 2


def test_client_errors_are_not_retried(server: FakeServer, client: Client) -> None:
    server.on("GET", "/tasks/x", error(404, "task_not_found"))
    with pytest.raises(v.NotFoundError):
        client.tasks.get("x")
    assert len(server.calls()) == 1


@pytest.mark.parametrize(("call", "attempts"), [("get", 3), ("predict", 3), ("train", 1)])
def test_dropped_connections(dropping_server: DroppingServer, tmp_path, call: str, attempts: int) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(PNG)
    with Client(dropping_server.url, max_retries=2) as client:
        client.retry_policy = RetryPolicy(max_retries=2, initial_delay=0.01)
        with pytest.raises(v.APIConnectionError):
            if call == "get":
                client.tasks.list()
            elif call == "predict":
                client.predict("digits", PNG)
            else:
                client.train("digits", tmp_path)
    assert dropping_server.connections == attempts


def test_read_timeout_retries_get_but_not_predict(server: FakeServer) -> None:
    server.on("GET", "/tasks", reply(200, {"tasks": []}, delay=1.0))
    server.on("POST", "/predict", reply(200, samples.PREDICTION, delay=1.0))
    with Client(server.url, max_retries=1, timeout=0.3) as client:
        client.retry_policy = RetryPolicy(max_retries=1, initial_delay=0.01)
        with pytest.raises(v.APITimeoutError):
            client.tasks.list()
        with pytest.raises(v.APITimeoutError):
            client.predict("digits", PNG)
    assert len(server.calls("GET", "/tasks")) == 2
    assert len(server.calls("POST", "/predict")) == 1


async def test_async_retry_honours_retry_after(server: FakeServer) -> None:
    server.on("GET", "/jobs/j-1", _busy("1"), reply(200, samples.job()))
    async with AsyncClient(server.url, max_retries=2) as client:
        start = time.monotonic()
        job = await client.jobs.get("j-1")
        elapsed = time.monotonic() - start
    assert job.state == "running"
    assert len(server.calls("GET", "/jobs/j-1")) == 2
    assert elapsed >= 1.0


async def test_async_train_not_retried_and_predict_retried(server: FakeServer, aclient: AsyncClient,
                                                           tmp_path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.png").write_bytes(PNG)
    server.on("POST", "/tasks/t/train", _busy("0"))
    server.on("POST", "/predict", _busy("0"), _busy("0"), reply(200, samples.PREDICTION))
    with pytest.raises(v.BusyError):
        await aclient.train("t", tmp_path)
    assert (await aclient.predict("t", PNG)).version == 2
    assert len(server.calls("POST", "/tasks/t/train")) == 1
    assert len(server.calls("POST", "/predict")) == 3


def test_policy_backoff_grows_and_stays_capped() -> None:
    policy = RetryPolicy(max_retries=10, initial_delay=0.5, max_delay=8.0)
    delays = [policy.backoff(a) for a in range(8)]
    assert all(0.75 * min(0.5 * 2**a, 8.0) <= d <= min(0.5 * 2**a, 8.0) for a, d in enumerate(delays))
    assert policy.delay_after_error(Retry.NEVER, 0, __import__("httpx").ConnectError("x")) is None


def test_parse_retry_after_forms() -> None:
    assert parse_retry_after({"retry-after": "3"}) == 3.0
    assert parse_retry_after({"retry-after": "-4"}) == 0.0
    assert parse_retry_after({"retry-after": "soon"}) is None
    assert parse_retry_after({}) is None
    future = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 20.0 <= parse_retry_after({"retry-after": future}) <= 30.0
