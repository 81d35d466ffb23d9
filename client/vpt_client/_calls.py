"""Every endpoint of the HTTP API (docs/api.md) described once, for both clients."""
from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, NamedTuple
from urllib.parse import quote

import httpx

from vpt_client._base_client import Call, TimeoutTypes
from vpt_client._constants import STREAM_TIMEOUT, UPLOAD_TIMEOUT
from vpt_client._files import FilePart, ProgressReader
from vpt_client._retry import Retry
from vpt_client._sse import ServerSentEvent
from vpt_client._train_options import FIELDS
from vpt_client.errors import InvalidInputError
from vpt_client.models import Backbone, Health, Job, Prediction, Readiness, Task, Version

END = object()  # job_from_event's answer to `event: end`


def _segment(value: str | int, what: str) -> str:
    text = str(value)
    if not text:
        raise InvalidInputError(f"{what} must not be empty")
    return quote(text, safe="")


def _model(cls: Any) -> Any:
    return lambda response: cls.model_validate_json(response.content)


def _listed(key: str, cls: Any) -> Any:
    return lambda response: [cls.model_validate(item) for item in response.json()[key]]


class Page(NamedTuple):
    """One page of a listing; `next_cursor` is None on the last (and from servers that do not page)."""

    items: list[Any]
    next_cursor: str | None


def _paged(key: str, cls: Any) -> Any:
    def parse(response: httpx.Response) -> Page:
        body = response.json()
        cursor = body.get("next_cursor")
        return Page([cls.model_validate(item) for item in body[key]], cursor if isinstance(cursor, str) else None)

    return parse


def _nothing(response: httpx.Response) -> None:
    return None


def _readiness(response: httpx.Response) -> Readiness:
    body = response.json()
    if response.is_success:
        return Readiness.model_validate(body)
    err = body.get("error", {}) if isinstance(body, dict) else {}
    checks = err.get("details") if isinstance(err.get("details"), dict) else {}
    return Readiness(status=err.get("code") or "not_ready", checks=checks, message=err.get("message"))


def list_tasks(cursor: str | None = None) -> Call[Page]:
    """One page of tasks; the clients follow `next_cursor` to list them all."""
    return Call("GET", "/tasks", _paged("tasks", Task), Retry.IDEMPOTENT,
                params={"cursor": cursor} if cursor else None)


def get_task(task: str) -> Call[Task]:
    return Call("GET", f"/tasks/{_segment(task, 'task')}", _model(Task), Retry.IDEMPOTENT)


def delete_task(task: str) -> Call[None]:
    return Call("DELETE", f"/tasks/{_segment(task, 'task')}", _nothing, Retry.IDEMPOTENT)


def list_versions(task: str) -> Call[list[Version]]:
    return Call("GET", f"/tasks/{_segment(task, 'task')}/versions", _listed("versions", Version),
                Retry.IDEMPOTENT)


def activate(task: str, version: int) -> Call[Task]:
    path = f"/tasks/{_segment(task, 'task')}/versions/{_segment(version, 'version')}/activate"
    return Call("POST", path, _model(Task), Retry.IDEMPOTENT)


def export_task(task: str, version: int | None, timeout: TimeoutTypes | None) -> Call[bytes]:
    params = {"version": version} if version is not None else None
    return Call("GET", f"/tasks/{_segment(task, 'task')}/export", lambda r: r.content, Retry.IDEMPOTENT,
                params=params, headers={"Accept": "application/octet-stream"},
                timeout=UPLOAD_TIMEOUT if timeout is None else timeout)


def import_task(task: str, content: bytes, timeout: TimeoutTypes | None) -> Call[Task]:
    return Call("PUT", f"/tasks/{_segment(task, 'task')}/import", _model(Task), Retry.IDEMPOTENT,
                content=content, headers={"Content-Type": "application/octet-stream"},
                timeout=UPLOAD_TIMEOUT if timeout is None else timeout)


def list_jobs(task: str | None, state: str | None, cursor: str | None = None) -> Call[Page]:
    """One page of jobs, newest first; the clients follow `next_cursor` to list them all."""
    params = {k: v for k, v in (("task", task), ("state", state), ("cursor", cursor)) if v is not None}
    return Call("GET", "/jobs", _paged("jobs", Job), Retry.IDEMPOTENT, params=params or None)


def get_job(job_id: str) -> Call[Job]:
    return Call("GET", f"/jobs/{_segment(job_id, 'job id')}", _model(Job), Retry.IDEMPOTENT)


def cancel_job(job_id: str) -> Call[Job]:
    return Call("POST", f"/jobs/{_segment(job_id, 'job id')}/cancel", _model(Job), Retry.IDEMPOTENT)


def job_events(job_id: str) -> Call[None]:
    return Call("GET", f"/jobs/{_segment(job_id, 'job id')}/events", _nothing, Retry.IDEMPOTENT,
                headers={"Accept": "text/event-stream"}, timeout=STREAM_TIMEOUT)


def backbone() -> Call[Backbone]:
    return Call("GET", "/backbone", _model(Backbone), Retry.IDEMPOTENT)


def health() -> Call[Health]:
    return Call("GET", "/healthz", _model(Health), Retry.IDEMPOTENT)


def ready() -> Call[Readiness]:
    # Not retried: the answer "not ready yet" is what the caller asked for.
    return Call("GET", "/readyz", _readiness, Retry.NEVER, accept=frozenset({503}))


def predict(task: str, parts: list[FilePart], top_k: int, timeout: TimeoutTypes | None) -> Call[Prediction]:
    if top_k < 1:
        raise InvalidInputError(f"top_k must be >= 1, got {top_k}")
    return Call("POST", "/predict", _model(Prediction), Retry.SAFE,
                params={"task": _check_task(task), "top_k": top_k},
                files=[("image", part) for part in parts], timeout=timeout)


def train(
    task: str, upload: tuple[str, ProgressReader, str], fields: Mapping[str, str], timeout: TimeoutTypes | None
) -> Call[Job]:
    """`fields` are the form fields `train_fields` made of the training options."""
    return Call("POST", f"/tasks/{_segment(task, 'task')}/train", _model(Job), Retry.NEVER,
                files=[("dataset", upload)], data=fields,
                timeout=UPLOAD_TIMEOUT if timeout is None else timeout)


def train_fields(options: Mapping[str, Any]) -> dict[str, str]:
    """Training options as form fields: None left out, booleans as true/false, containers as JSON."""
    unknown = sorted(set(options) - set(FIELDS))
    if unknown:
        raise InvalidInputError(f"unknown training option(s) {', '.join(unknown)}; known: " + ", ".join(FIELDS))
    fields: dict[str, str] = {}
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, bool):
            fields[name] = "true" if value else "false"
        elif isinstance(value, (dict, list, tuple)):
            fields[name] = json.dumps(value)
        else:
            fields[name] = str(value)
    return fields


def _check_task(task: str) -> str:
    if not task:
        raise InvalidInputError("task must not be empty")
    return task


def job_from_event(event: ServerSentEvent) -> Job | object | None:
    """A `progress` event's Job, END for `end`, None for anything else (comments, unknown events)."""
    if event.event == "end":
        return END
    if event.event == "progress" and event.data:
        return Job.model_validate_json(event.data)
    return None
