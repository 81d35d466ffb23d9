"""The asynchronous client: the same API as `Client`, awaited (asyncio or trio, through anyio)."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar, Unpack

import anyio
import anyio.to_thread
import httpx

from vpt_client import _calls as calls
from vpt_client._base_client import BaseClient, Call, ClientOptions, TimeoutTypes, _JobHandleBase
from vpt_client._constants import DEFAULT_POLL_INTERVAL
from vpt_client._files import ImageInput, ProgressCallback, encode_images, prepare_dataset, read_task_file
from vpt_client._sse import SSEDecoder
from vpt_client._train_options import TrainOptions
from vpt_client.errors import APIConnectionError, JobFailedError, WaitTimeoutError
from vpt_client.models import Backbone, Health, Job, Prediction, Readiness, Task, Version

logger = logging.getLogger(__name__)
T = TypeVar("T")
ProgressHook = Callable[[Job], "Awaitable[None] | None"]


class AsyncClient(BaseClient):
    """Async twin of `Client`: `async with AsyncClient() as vpt: await vpt.predict(...)`."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        http_client: httpx.AsyncClient | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        super().__init__(base_url, api_key, **options)
        self._http = http_client if http_client is not None else httpx.AsyncClient()
        self._owns_http = http_client is None
        self.tasks = AsyncTasks(self)
        self.jobs = AsyncJobs(self)

    async def close(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _send(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        attempt = 0
        while True:
            request = self._build_request(self._http, call)
            try:
                response = await self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self._delay_after_error(call, attempt, exc)
                if delay is None:
                    raise self._connection_error(call, exc) from exc
            else:
                delay = self._delay_after_response(call, attempt, response)
                if delay is None:
                    if stream and not response.is_success:
                        await response.aread()
                        await response.aclose()
                    self._check(call, response)
                    return response
                await response.aclose()
            await anyio.sleep(delay)
            attempt += 1

    async def _call(self, call: Call[T]) -> T:
        return self._parse(call, await self._send(call))

    async def train(
        self,
        task: str,
        dataset: str | os.PathLike,
        *,
        on_upload: ProgressCallback | None = None,
        timeout: TimeoutTypes | None = None,
        **options: Unpack[TrainOptions],
    ) -> AsyncJobHandle:
        """See `Client.train`; a directory is zipped in a worker thread."""
        fields = calls.train_fields(options)
        upload = await anyio.to_thread.run_sync(prepare_dataset, dataset)
        with upload:
            job = await self._call(calls.train(task, upload.part(on_upload), fields, timeout))
        return AsyncJobHandle(self, job)

    async def predict(
        self,
        task: str,
        images: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 5,
        timeout: TimeoutTypes | None = None,
    ) -> Prediction:
        parts = await anyio.to_thread.run_sync(encode_images, images)
        return await self._call(calls.predict(task, parts, top_k, timeout))

    async def backbone(self) -> Backbone:
        return await self._call(calls.backbone())

    async def health(self) -> Health:
        return await self._call(calls.health())

    async def ready(self) -> Readiness:
        return await self._call(calls.ready())


class AsyncTasks:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self) -> list[Task]:
        """Every task, by id (the server's pages followed): the listing's facts; `get` has the rest."""
        page = await self._client._call(calls.list_tasks())
        items = list(page.items)
        while page.next_cursor:
            page = await self._client._call(calls.list_tasks(page.next_cursor))
            items += page.items
        return items

    async def get(self, task: str) -> Task:
        return await self._client._call(calls.get_task(task))

    async def delete(self, task: str) -> None:
        await self._client._call(calls.delete_task(task))

    async def versions(self, task: str) -> list[Version]:
        return await self._client._call(calls.list_versions(task))

    async def activate(self, task: str, version: int) -> Task:
        return await self._client._call(calls.activate(task, version))

    async def export(
        self, task: str, path: str | os.PathLike | None = None, *, version: int | None = None,
        timeout: TimeoutTypes | None = None,
    ) -> bytes | Path:
        call = calls.export_task(task, version, timeout)
        if path is None:
            return await self._client._call(call)
        target, partial = Path(path), Path(f"{path}.part")
        response = await self._client._send(call, stream=True)
        try:
            async with await anyio.open_file(partial, "wb") as fh:
                async for chunk in response.aiter_bytes():
                    await fh.write(chunk)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise APIConnectionError(f"export of {task} broke off: {exc}") from exc
        finally:
            await response.aclose()
        partial.replace(target)
        return target

    async def import_(
        self, task: str, source: str | os.PathLike | bytes, *, timeout: TimeoutTypes | None = None
    ) -> Task:
        content = await anyio.to_thread.run_sync(read_task_file, source)
        return await self._client._call(calls.import_task(task, content, timeout))


class AsyncJobs:
    def __init__(self, client: AsyncClient) -> None:
        self._client = client

    async def list(self, task: str | None = None, state: str | None = None) -> list[Job]:
        """Every job, newest first, optionally of one task or state (the server's pages followed)."""
        page = await self._client._call(calls.list_jobs(task, state))
        items = list(page.items)
        while page.next_cursor:
            page = await self._client._call(calls.list_jobs(task, state, page.next_cursor))
            items += page.items
        return items

    async def get(self, job_id: str) -> Job:
        return await self._client._call(calls.get_job(job_id))

    async def cancel(self, job_id: str) -> Job:
        return await self._client._call(calls.cancel_job(job_id))

    async def handle(self, job_id: str) -> AsyncJobHandle:
        return AsyncJobHandle(self._client, await self.get(job_id))

    async def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        on_progress: ProgressHook | None = None,
        check: bool = True,
    ) -> Job:
        """Poll until the job ends; `on_progress` may be a plain function or a coroutine function."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = await self.get(job_id)
        while True:
            if on_progress is not None:
                result = on_progress(job)
                if result is not None:
                    await result
            if job.done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(job, timeout or 0.0)
            pause = poll_interval if deadline is None else min(poll_interval, deadline - time.monotonic())
            await anyio.sleep(max(pause, 0.0))
            job = await self.get(job_id)
        if check and not job.succeeded:
            raise JobFailedError(job)
        return job

    async def events(self, job_id: str) -> AsyncIterator[Job]:
        """See `Jobs.events`."""
        call, quiet, last = calls.job_events(job_id), 0, None
        while True:
            response, got = await self._client._send(call, stream=True), False
            try:
                decoder, lines = SSEDecoder(), response.aiter_lines()
                while True:
                    line = await anext(lines, None)  # None: the stream ended; flush an unterminated last event
                    event = decoder.flush() if line is None else decoder.feed(line)
                    item = None if event is None else calls.job_from_event(event)
                    if item is calls.END:
                        return
                    if isinstance(item, Job):
                        got, last = True, item
                        yield item
                    if line is None:
                        break
            except httpx.TransportError as exc:
                logger.info("event stream of job %s broke off: %s", job_id, exc)
            finally:
                await response.aclose()
            if last is not None and last.done:
                return
            quiet = 0 if got else quiet + 1
            if quiet > self._client.max_retries:
                raise APIConnectionError(f"the event stream of job {job_id} keeps closing without events")
            await anyio.sleep(self._client.retry_policy.backoff(quiet))


class AsyncJobHandle(_JobHandleBase[AsyncClient]):
    """Async twin of `JobHandle`."""

    async def refresh(self) -> Job:
        self.job = await self._client.jobs.get(self.job_id)
        return self.job

    async def wait(
        self,
        timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        on_progress: ProgressHook | None = None,
        check: bool = True,
    ) -> Job:
        async def seen(job: Job) -> None:
            self.job = job
            if on_progress is not None:
                result = on_progress(job)
                if result is not None:
                    await result

        return await self._client.jobs.wait(self.job_id, timeout, poll_interval, seen, check)

    async def events(self) -> AsyncIterator[Job]:
        async for job in self._client.jobs.events(self.job_id):
            self.job = job
            yield job

    async def cancel(self) -> Job:
        self.job = await self._client.jobs.cancel(self.job_id)
        return self.job
