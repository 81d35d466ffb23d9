"""Answers for a task id that names no task: the closest existing id, or the job training its first version;
and for a listing cursor that names nothing.

Routes of the `tasks` and `predict` routers use `TaskRoute`: when a handler (or the engine process
behind it) finds no task, the 404 names the closest task id of the same tenant ("did you mean"),
and a task whose first training job is still queued or running is answered as such, naming the job:
409 `task_training` on `/predict`, 404 `task_not_found` with the job id elsewhere.
"""
from __future__ import annotations

import difflib
import logging
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from prompt_store.base import Store
from prompt_store.errors import StoreError, TaskNotFound
from prompt_store.pages import InvalidCursor, Page
from server.errors import ApiError

log = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
T = TypeVar("T")


def _is_missing_task(exc: BaseException) -> bool:
    """The store's TaskNotFound, or the engine process's answer for one (an ApiError with its code)."""
    return isinstance(exc, TaskNotFound) or (isinstance(exc, ApiError) and exc.code == TaskNotFound.code)


def closest_task(store: Store, tenant: str, task_id: str) -> str | None:
    """The tenant's task id most like `task_id` (difflib's ratio at least 0.6, case ignored), or None."""
    ids = {t.task_id.lower(): t.task_id for t in store.list_tasks(tenant) if t.task_id != task_id}
    found = difflib.get_close_matches(task_id.lower(), list(ids), n=1, cutoff=0.6)
    return ids[found[0]] if found else None


def explain_missing(store: Store, tenant: str, task_id: str, *, predicting: bool = False) -> ApiError:
    """The answer for `task_id` having no current version in `tenant`."""
    jobs = [j for j in store.list_jobs(tenant, task_id) if j.state in ACTIVE]
    if jobs:
        job = jobs[-1]  # the oldest active one: the job that makes the first version
        message = (f"task {task_id!r} has no version yet: its first training job {job.job_id} is {job.state}; "
                   f"follow it at /jobs/{job.job_id}")
        details = {"job_id": job.job_id, "job_state": job.state}
        if predicting:
            return ApiError(409, "task_training", message, details=details)
        return ApiError(404, TaskNotFound.code, message, details=details)
    near = closest_task(store, tenant, task_id)
    if near is None:
        return ApiError(404, TaskNotFound.code, f"no task {task_id!r}")
    return ApiError(404, TaskNotFound.code, f"no task {task_id!r}; did you mean {near!r}?",
                    details={"did_you_mean": near})


def _task_of(request: Request) -> str | None:
    task = request.path_params.get("task_id") or request.query_params.get("task")
    return task if isinstance(task, str) and task else None


class TaskRoute(APIRoute):
    """An APIRoute whose unknown-task errors become `explain_missing`'s answer."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def explained(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                better = await better_error(request, exc)
                if better is None:
                    raise
                raise better from exc

        return explained


async def better_error(request: Request, exc: Exception) -> ApiError | None:
    """`explain_missing`'s answer when `exc` says the request's task is missing; None to keep `exc`
    (also used by the raw-image /predict fast path, server/frontend/fastpath.py)."""
    state, tenant, task = getattr(request.app.state, "vpt", None), _tenant(request), _task_of(request)
    if not _is_missing_task(exc) or state is None or tenant is None or task is None:
        return None
    try:
        return await run_in_threadpool(explain_missing, state.store, tenant, task,
                                       predicting=request.url.path == "/predict")
    except StoreError as e:  # the plain 404 is still true
        log.info("no explanation for the missing task %r: %s", task, e)
        return None


def paged(lister: Callable[..., Page[T]], *args: Any) -> Page[T]:
    """`lister(*args)` with a cursor it did not hand out answered 400 `invalid_parameter`."""
    try:
        return lister(*args)
    except InvalidCursor as e:
        raise ApiError(400, "invalid_parameter", str(e), details={"field": "cursor"}) from e


def _tenant(request: Request) -> str | None:
    return getattr(request.state, "tenant", None)
