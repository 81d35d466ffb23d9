"""The synchronous client."""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Self, TypeVar, Unpack

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


class Client(BaseClient):
    """Talks to a vpt-serve server. Base URL and key default to $VPT_BASE_URL and $VPT_API_KEY.

    >>> with Client("http://127.0.0.1:8000") as vpt:
    ...     job = vpt.train("digits", "data/digits/", method="vpt-deep", num_prompts=10)
    ...     job.wait(on_progress=lambda j: print(j.progress))
    ...     print(vpt.predict("digits", "seven.png").results[0].label)
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        http_client: httpx.Client | None = None,
        **options: Unpack[ClientOptions],
    ) -> None:
        super().__init__(base_url, api_key, **options)
        self._http = http_client if http_client is not None else httpx.Client()
        self._owns_http = http_client is None
        self.tasks = Tasks(self)
        self.jobs = Jobs(self)

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _send(self, call: Call[Any], *, stream: bool = False) -> httpx.Response:
        """Send with retries; return a successful (or accepted) answer, raise the mapped error otherwise."""
        attempt = 0
        while True:
            request = self._build_request(self._http, call)
            try:
                response = self._http.send(request, stream=stream)
            except httpx.TransportError as exc:
                delay = self._delay_after_error(call, attempt, exc)
                if delay is None:
                    raise self._connection_error(call, exc) from exc
            else:
                delay = self._delay_after_response(call, attempt, response)
                if delay is None:
                    if stream and not response.is_success:
                        response.read()
                        response.close()
                    self._check(call, response)
                    return response
                response.close()
            time.sleep(delay)
            attempt += 1

    def _call(self, call: Call[T]) -> T:
        return self._parse(call, self._send(call))

    def train(
        self,
        task: str,
        dataset: str | os.PathLike,
        *,
        on_upload: ProgressCallback | None = None,
        timeout: TimeoutTypes | None = None,
        **options: Unpack[TrainOptions],
    ) -> JobHandle:
        """Upload a dataset (a directory, zipped on the fly, or a .zip/.tar/.tar.gz) and start training.

        Options are `TrainOptions` (method, num_prompts, epochs, ...). `on_upload(sent, total)` is
        called as the upload goes. Never retried: a resend could start a second job.
        """
        fields = calls.train_fields(options)
        with prepare_dataset(dataset) as upload:
            job = self._call(calls.train(task, upload.part(on_upload), fields, timeout))
        return JobHandle(self, job)

    def predict(
        self,
        task: str,
        images: ImageInput | Sequence[ImageInput],
        *,
        top_k: int = 5,
        timeout: TimeoutTypes | None = None,
    ) -> Prediction:
        """Classify one image or a list (paths, bytes, binary files, PIL images, numpy arrays)."""
        return self._call(calls.predict(task, encode_images(images), top_k, timeout))

    def backbone(self) -> Backbone:
        return self._call(calls.backbone())

    def health(self) -> Health:
        return self._call(calls.health())

    def ready(self) -> Readiness:
        return self._call(calls.ready())


class Tasks:
    """`client.tasks`: list, inspect, version, move and delete tasks."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self) -> list[Task]:
        """Every task, by id (the server's pages followed): the listing's facts; `get` has the rest."""
        page = self._client._call(calls.list_tasks())
        items = list(page.items)
        while page.next_cursor:
            page = self._client._call(calls.list_tasks(page.next_cursor))
            items += page.items
        return items

    def get(self, task: str) -> Task:
        return self._client._call(calls.get_task(task))

    def delete(self, task: str) -> None:
        self._client._call(calls.delete_task(task))

    def versions(self, task: str) -> list[Version]:
        return self._client._call(calls.list_versions(task))

    def activate(self, task: str, version: int) -> Task:
        return self._client._call(calls.activate(task, version))

    def export(
        self, task: str, path: str | os.PathLike | None = None, *, version: int | None = None,
        timeout: TimeoutTypes | None = None,
    ) -> bytes | Path:
        """The task file (current or given version): returned as bytes, or written to `path`."""
        call = calls.export_task(task, version, timeout)
        if path is None:
            return self._client._call(call)
        target, partial = Path(path), Path(f"{path}.part")
        response = self._client._send(call, stream=True)
        try:
            with partial.open("wb") as fh:
                for chunk in response.iter_bytes():
                    fh.write(chunk)
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            raise APIConnectionError(f"export of {task} broke off: {exc}") from exc
        finally:
            response.close()
        partial.replace(target)
        return target

    def import_(
        self, task: str, source: str | os.PathLike | bytes, *, timeout: TimeoutTypes | None = None
    ) -> Task:
        """Store a task file (a path or bytes) as a new version of `task`."""
        return self._client._call(calls.import_task(task, read_task_file(source), timeout))


class Jobs:
    """`client.jobs`: training jobs."""

    def __init__(self, client: Client) -> None:
        self._client = client

    def list(self, task: str | None = None, state: str | None = None) -> list[Job]:
        """Every job, newest first, optionally of one task or state (the server's pages followed)."""
        page = self._client._call(calls.list_jobs(task, state))
        items = list(page.items)
        while page.next_cursor:
            page = self._client._call(calls.list_jobs(task, state, page.next_cursor))
            items += page.items
        return items

    def get(self, job_id: str) -> Job:
        return self._client._call(calls.get_job(job_id))

    def cancel(self, job_id: str) -> Job:
        return self._client._call(calls.cancel_job(job_id))

    def handle(self, job_id: str) -> JobHandle:
        return JobHandle(self._client, self.get(job_id))

    def wait(
        self,
        job_id: str,
        timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        on_progress: Callable[[Job], None] | None = None,
        check: bool = True,
    ) -> Job:
        """Poll until the job ends; `check` raises JobFailedError unless it succeeded."""
        deadline = None if timeout is None else time.monotonic() + timeout
        job = self.get(job_id)
        while True:
            if on_progress is not None:
                on_progress(job)
            if job.done:
                break
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeoutError(job, timeout or 0.0)
            pause = poll_interval if deadline is None else min(poll_interval, deadline - time.monotonic())
            time.sleep(max(pause, 0.0))
            job = self.get(job_id)
        if check and not job.succeeded:
            raise JobFailedError(job)
        return job

    def events(self, job_id: str) -> Iterator[Job]:
        """Follow GET /jobs/{id}/events: yield the Job of every `progress` event until `end`.

        A stream that breaks off is reopened; after `max_retries + 1` reopenings in a row without
        any event, APIConnectionError is raised.
        """
        call, quiet, last = calls.job_events(job_id), 0, None
        while True:
            response, got = self._client._send(call, stream=True), False
            try:
                decoder, lines = SSEDecoder(), response.iter_lines()
                while True:
                    line = next(lines, None)  # None: the stream ended; flush an unterminated last event
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
                response.close()
            if last is not None and last.done:
                return
            quiet = 0 if got else quiet + 1
            if quiet > self._client.max_retries:
                raise APIConnectionError(f"the event stream of job {job_id} keeps closing without events")
            time.sleep(self._client.retry_policy.backoff(quiet))


class JobHandle(_JobHandleBase[Client]):
    """A training job as returned by `train`: the latest known state plus wait/events/cancel."""

    def refresh(self) -> Job:
        self.job = self._client.jobs.get(self.job_id)
        return self.job

    def wait(
        self,
        timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
        on_progress: Callable[[Job], None] | None = None,
        check: bool = True,
    ) -> Job:
        def seen(job: Job) -> None:
            self.job = job
            if on_progress is not None:
                on_progress(job)

        return self._client.jobs.wait(self.job_id, timeout, poll_interval, seen, check)

    def events(self) -> Iterator[Job]:
        for job in self._client.jobs.events(self.job_id):
            self.job = job
            yield job

    def cancel(self) -> Job:
        self.job = self._client.jobs.cancel(self.job_id)
        return self.job
