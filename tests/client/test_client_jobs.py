"""Following jobs: the SSE decoder, events() over a streamed answer, and wait() by polling."""
from __future__ import annotations

import json

import pytest
import vpt_client as v
from vpt_client import AsyncClient, Client, Job
from vpt_client._sse import ServerSentEvent, SSEDecoder

from tests.client import samples
from tests.client.fake_server import FakeServer, reply, sse


def _feed(text: str) -> list[ServerSentEvent]:
    decoder, events = SSEDecoder(), []
    for line in text.splitlines():
        event = decoder.feed(line)
        if event is not None:
            events.append(event)
    last = decoder.flush()
    return events + ([last] if last else [])


def test_sse_decoder() -> None:
    events = _feed(": keep-alive\n\nevent: progress\ndata: {\"a\":\ndata:  1}\nid: 7\nretry: 500\n\r\n"
                   "data: plain\n\nevent: end\ndata:\n\nevent: tail\ndata: x")
    assert events[0] == ServerSentEvent("progress", '{"a":\n 1}', "7", 500)
    assert json.loads(events[0].data) == {"a": 1}
    assert events[1] == ServerSentEvent("message", "plain", "7", None)  # the last event id persists
    assert events[2].event == "end" and events[2].data == ""
    assert events[3] == ServerSentEvent("tail", "x", "7", None)  # flushed without a closing blank line
    assert len(events) == 4


def _progress_stream(*states: str) -> list:
    items: list = [": connected\n\n"]
    for i, state in enumerate(states):
        items.append(("progress", samples.job(state, epoch=i + 1, version=3 if state == "succeeded" else None)))
    return items + [("end", "{}")]


def test_events_yield_jobs_until_end(server: FakeServer, client: Client) -> None:
    server.on("GET", "/jobs/j-1/events", sse(_progress_stream("queued", "running", "succeeded")))
    jobs = list(client.jobs.events("j-1"))
    assert [j.state for j in jobs] == ["queued", "running", "succeeded"]
    assert [j.progress.epoch for j in jobs] == [1, 2, 3]
    assert all(isinstance(j, Job) for j in jobs)
    assert server.requests[0].headers["accept"] == "text/event-stream"


def test_events_reopen_a_stream_that_broke_off(server: FakeServer, client: Client) -> None:
    first = sse([("progress", samples.job("running", epoch=1))])  # closes without `end`
    server.on("GET", "/jobs/j-1/events", first, sse(_progress_stream("running", "succeeded")))
    jobs = list(client.jobs.events("j-1"))
    assert [j.state for j in jobs] == ["running", "running", "succeeded"]
    assert len(server.calls("GET", "/jobs/j-1/events")) == 2


def _unterminated_last_event() -> list:
    """A stream whose last (terminal) progress event has no closing blank line."""
    return [f"event: progress\ndata: {json.dumps(samples.job('succeeded', epoch=3, version=3))}"]


def test_events_keep_a_last_event_without_blank_line(server: FakeServer, client: Client) -> None:
    server.on("GET", "/jobs/j-1/events", sse(_unterminated_last_event()))
    jobs = list(client.jobs.events("j-1"))
    assert [j.state for j in jobs] == ["succeeded"]
    assert len(server.calls("GET", "/jobs/j-1/events")) == 1  # terminal: not reopened


async def test_async_events_keep_a_last_event_without_blank_line(server: FakeServer, aclient: AsyncClient) -> None:
    server.on("GET", "/jobs/j-1/events", sse(_unterminated_last_event()))
    jobs = [job async for job in aclient.jobs.events("j-1")]
    assert [j.state for j in jobs] == ["succeeded"]
    assert len(server.calls("GET", "/jobs/j-1/events")) == 1


def test_events_give_up_on_streams_without_events(server: FakeServer, client: Client) -> None:
    server.on("GET", "/jobs/j-1/events", sse([": nothing\n\n"]))
    with pytest.raises(v.APIConnectionError):
        list(client.jobs.events("j-1"))
    assert len(server.calls("GET", "/jobs/j-1/events")) == 3  # first + max_retries reopenings


async def test_async_events_and_handle(server: FakeServer, aclient: AsyncClient, tmp_path) -> None:
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "x.png").write_bytes(b"\x89PNG")
    server.on("POST", "/tasks/digits/train", reply(202, samples.job("queued", epoch=None)))
    server.on("GET", "/jobs/j-1/events", sse(_progress_stream("running", "succeeded"), pause=0.01))
    handle = await aclient.train("digits", tmp_path)
    states = [job.state async for job in handle.events()]
    assert states == ["running", "succeeded"]
    assert handle.state == "succeeded" and handle.job.version == 3


def test_wait_polls_until_done_and_reports_progress(server: FakeServer, client: Client) -> None:
    server.on("GET", "/jobs/j-1", reply(200, samples.job("queued", epoch=None)), reply(200, samples.job("running")),
              reply(200, samples.job("succeeded", epoch=4, version=5)))
    seen: list[str] = []
    job = client.jobs.wait("j-1", poll_interval=0.01, on_progress=lambda j: seen.append(j.state))
    assert seen == ["queued", "running", "succeeded"]
    assert job.succeeded and job.version == 5
    assert len(server.calls("GET", "/jobs/j-1")) == 3


def test_wait_raises_job_failed_unless_unchecked(server: FakeServer, client: Client) -> None:
    failed = samples.job("failed", error={"code": "dataset_too_few_images", "message": "need 2 per class"})
    server.on("GET", "/jobs/j-1", reply(200, failed))
    with pytest.raises(v.JobFailedError) as info:
        client.jobs.wait("j-1", poll_interval=0.01)
    assert info.value.code == "dataset_too_few_images" and info.value.job.state == "failed"
    assert client.jobs.wait("j-1", check=False).state == "failed"
    server.on("GET", "/jobs/j-1", reply(200, samples.job("cancelled")))
    with pytest.raises(v.JobFailedError) as cancelled:
        client.jobs.wait("j-1")
    assert cancelled.value.code == "job_cancelled"


def test_wait_timeout_leaves_the_job_running(server: FakeServer, client: Client) -> None:
    server.on("GET", "/jobs/j-1", reply(200, samples.job("running")))
    with pytest.raises(v.WaitTimeoutError) as info:
        client.jobs.wait("j-1", timeout=0.2, poll_interval=0.05)
    assert info.value.job.state == "running"
    assert len(server.calls("GET", "/jobs/j-1")) >= 2
    assert server.calls("POST") == []  # nothing cancelled


async def test_async_wait_with_coroutine_callback(server: FakeServer, aclient: AsyncClient) -> None:
    running = reply(200, samples.job("running"))
    server.on("GET", "/jobs/j-1", running, running, reply(200, samples.job("succeeded")))
    seen: list[str] = []

    async def hook(job: Job) -> None:
        seen.append(job.state)

    handle = await aclient.jobs.handle("j-1")
    assert handle.state == "running"
    job = await handle.wait(poll_interval=0.01, on_progress=hook)
    assert job.succeeded and seen == ["running", "succeeded"] and handle.state == "succeeded"
    with pytest.raises(v.WaitTimeoutError):
        server.on("GET", "/jobs/j-1", reply(200, samples.job("running")))
        await aclient.jobs.wait("j-1", timeout=0.05, poll_interval=0.01)


def test_handle_refresh_and_cancel(server: FakeServer, client: Client) -> None:
    server.on("GET", "/jobs/j-1", reply(200, samples.job("running")))
    server.on("POST", "/jobs/j-1/cancel", reply(200, samples.job("cancelled")))
    handle = client.jobs.handle("j-1")
    assert repr(handle) == "JobHandle(job_id='j-1', state='running')"
    assert handle.cancel().state == "cancelled" and handle.state == "cancelled"
    assert handle.refresh().state == "running"
