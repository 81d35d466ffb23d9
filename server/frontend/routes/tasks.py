"""Tasks: list, inspect, delete, versions, activate (rollback), export and import task files."""
from __future__ import annotations

import logging

import anyio
from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool

from prompt_store.errors import TaskNotFound
from prompt_store.ids import validate_id
from prompt_store.pages import DEFAULT_LIMIT, MAX_LIMIT, task_page
from server.errors import ApiError
from server.frontend.deps import State, Tenant
from server.frontend.missing import TaskRoute, paged
from server.frontend.openapi import errors
from server.frontend.schemas import (
    ErrorOut,
    TaskList,
    TaskOut,
    VersionList,
    VersionOut,
    task_out,
    task_summary,
    version_out,
)

log = logging.getLogger(__name__)
router = APIRouter(tags=["tasks"], route_class=TaskRoute, responses={404: {"model": ErrorOut}, 400: {"model": ErrorOut}})

MAX_VERSION = 2**63 - 1  # no store counts further; larger numbers would not even fit in a file name


def _running(state: State) -> tuple[str, str]:
    return state.backbone.name, state.backbone.fingerprint


def _version(task_id: str, version: int | None) -> int | None:
    """`version` unless it is a number no task can have (404, like any missing version)."""
    if version is not None and version > MAX_VERSION:
        raise ApiError(404, "version_not_found", f"task {task_id!r} has no version {str(version)[:24]}...")
    return version


@router.get("/tasks", response_model=TaskList)
def list_tasks(state: State, tenant: Tenant,
               limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="tasks per page"),
               cursor: str | None = Query(None, description="`next_cursor` of the previous page")) -> TaskList:
    """The tenant's tasks by id, a page at a time: the cheap facts of each (`GET /tasks/{task_id}` has
    class names and metrics); follow `next_cursor` until it is null."""
    page = paged(task_page, state.store, tenant, limit, cursor)
    size, running = state.backbone.element_size, _running(state)
    return TaskList(tasks=[task_summary(i, size, running) for i in page.items], next_cursor=page.next_cursor)


@router.get("/tasks/{task_id}", response_model=TaskOut)
def get_task(task_id: str, state: State, tenant: Tenant) -> TaskOut:
    return task_out(state.store.get_info(tenant, validate_id(task_id)), state.backbone.element_size, _running(state))


@router.delete("/tasks/{task_id}", status_code=204, responses=errors(409, 507))
def delete_task(task_id: str, state: State, tenant: Tenant) -> Response:
    """Delete every version; a queued or running training job of the task is cancelled first (also
    when that job is the task's first, so no version exists yet)."""
    try:
        state.store.get_info(tenant, validate_id(task_id))  # 404 for an unknown task, before touching jobs
    except TaskNotFound:
        if not any(j.state in ("queued", "running") for j in state.store.list_jobs(tenant, task_id)):
            raise
        state.jobs.cancel_active(tenant, task_id)
        return Response(status_code=204)
    state.jobs.cancel_active(tenant, task_id)
    state.store.delete_task(tenant, task_id)
    _changed(state, tenant, task_id)
    return Response(status_code=204)


@router.get("/tasks/{task_id}/versions", response_model=VersionList)
def list_versions(task_id: str, state: State, tenant: Tenant) -> VersionList:
    info = state.store.get_info(tenant, validate_id(task_id))
    versions = state.store.list_versions(tenant, task_id)
    return VersionList(versions=[version_out(v, info.current_version, element_size=state.backbone.element_size) for v in versions])


@router.get("/tasks/{task_id}/versions/{version}", response_model=VersionOut)
def get_version(task_id: str, version: int, state: State, tenant: Tenant) -> VersionOut:
    """One version with all its metrics, the feature map (t-SNE of CLS features) included."""
    info = state.store.get_info(tenant, validate_id(task_id))
    record, _ = state.store.get_task(tenant, task_id, _version(task_id, version))
    return version_out(record, info.current_version, full=True, element_size=state.backbone.element_size)


@router.post("/tasks/{task_id}/versions/{version}/activate", response_model=TaskOut, responses=errors(409, 507))
async def activate(task_id: str, version: int, state: State, tenant: Tenant) -> TaskOut:
    """Make version `n` current (rollback or forward); every replica serves it from its next batch."""
    _, blob = await run_in_threadpool(state.store.get_task, tenant, validate_id(task_id), _version(task_id, version))
    await state.check_task(blob)
    await run_in_threadpool(state.store.activate, tenant, task_id, version)
    await _notify(state, tenant, task_id)
    info = await run_in_threadpool(state.store.get_info, tenant, task_id)
    return task_out(info, state.backbone.element_size, _running(state))


@router.get("/tasks/{task_id}/export", response_class=Response,
            responses={200: {"content": {"application/octet-stream": {}}, "description": "the task file"}})
def export(task_id: str, state: State, tenant: Tenant, version: int | None = Query(None, ge=1)) -> Response:
    record, blob = state.store.get_task(tenant, validate_id(task_id), _version(task_id, version))
    name = f"{task_id}-v{record.version}.safetensors"
    return Response(blob, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{name}"',
                             "X-Task-Version": str(record.version)})


@router.put("/tasks/{task_id}/import", response_model=TaskOut, status_code=201, responses=errors(409, 507),
            openapi_extra={"requestBody": {"required": True,
                                           "content": {"application/octet-stream": {"schema": {
                                               "type": "string", "format": "binary"}}}}})
async def import_task(task_id: str, request: Request, state: State, tenant: Tenant) -> TaskOut:
    """Add a task file (from `export` or the `vpt-serve train` CLI) as the task's new current version."""
    validate_id(task_id)
    blob = await request.body()
    if not blob:
        raise ApiError(400, "bad_request", "the request body must be a task file")
    meta = await state.check_task(blob)  # 422 unless this server's backbone can serve it
    info = await run_in_threadpool(_put, state, tenant, task_id, blob, meta)
    await _notify(state, tenant, task_id)
    return task_out(info, state.backbone.element_size, _running(state))


async def _notify(state: State, tenant: str, task_id: str) -> None:
    """In a front-end process, tell the engine about this write before answering it (read-your-writes);
    other processes learn it from the store's change events. A failure only delays it to those events."""
    notify = getattr(state, "task_changed", None)
    if notify is not None:
        try:
            await notify(tenant, task_id)
        except Exception as e:  # noqa: BLE001 - the event log still delivers the change
            log.warning("could not tell the engine that %s/%s changed: %s", tenant, task_id, e)


def _changed(state: State, tenant: str, task_id: str) -> None:
    """`_notify` from a sync route (a worker thread of the event loop)."""
    if getattr(state, "task_changed", None) is not None:
        anyio.from_thread.run(_notify, state, tenant, task_id)


def _put(state: State, tenant: str, task_id: str, blob: bytes, meta: dict[str, str]):
    state.store.put_task(tenant, task_id, blob, meta)
    return state.store.get_info(tenant, task_id)
