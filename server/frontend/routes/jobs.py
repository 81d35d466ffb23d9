"""Training: submit a dataset, follow and cancel jobs."""
from __future__ import annotations

import asyncio
import json
import os
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import UploadFile

from prompt_store.ids import validate_id
from prompt_store.pages import DEFAULT_LIMIT, MAX_LIMIT, job_page
from prompt_store.records import JOB_STATES, TERMINAL_STATES
from server.errors import ApiError
from server.frontend.deps import State, Tenant
from server.frontend.missing import paged
from server.frontend.openapi import errors
from server.frontend.schemas import ErrorOut, JobList, JobOut, job_out
from server.shared import ingest_limits
from vpt.data.preflight import preflight_archive
from vpt.errors import TrainOptionsError
from vpt.options import TrainOptions, form_schema, from_form

router = APIRouter(tags=["jobs"], responses={404: {"model": ErrorOut}, 400: {"model": ErrorOut}})

_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".zip", ".tar")

TRAIN_BODY = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["dataset"],
    "properties": {
        "dataset": {"type": "string", "format": "binary",
                    "description": ".zip/.tar/.tar.gz: a folder per class (optional train/ and val/), "
                                   "or images plus manifest.csv / manifest.jsonl (file_name, label)"},
        **form_schema(),
    }}}}}}


def parse_options(fields: list[tuple[str, str]], max_prompts: int = 1024, max_workers: int = 64) -> TrainOptions:
    """Form fields -> validated TrainOptions; unknown, repeated or malformed fields are 400 `invalid_parameter`."""
    try:
        options = from_form(fields)
    except TrainOptionsError as e:
        raise ApiError(400, "invalid_parameter", e.message, details={"field": e.field}) from e
    for name, cap in (("num_prompts", max_prompts), ("num_workers", max_workers)):
        if getattr(options, name) > cap and not (name == "num_prompts" and options.method == "linear"):
            raise ApiError(400, "invalid_parameter", f"{name} must be at most {cap} on this server",
                           details={"field": name})
    return options


def _suffix(filename: str | None) -> str:
    name = (filename or "").lower()
    return next((s for s in _ARCHIVE_SUFFIXES if name.endswith(s)), "")


def _spool(upload: UploadFile, directory: Path) -> Path:
    """Copy the parsed upload to a file of ours, chunk by chunk; nothing is left behind on failure
    (a full disk is answered 507 by the error handlers)."""
    directory.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=directory, prefix="upload-")
    path = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            upload.file.seek(0)
            while chunk := upload.file.read(1 << 20):
                out.write(chunk)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


@router.post("/tasks/{task_id}/train", status_code=202, response_model=JobOut, openapi_extra=TRAIN_BODY,
             responses=errors(409, 413, 415, 429, 507))
async def train(task_id: str, request: Request, state: State, tenant: Tenant) -> JSONResponse:
    """Upload a dataset and queue a training job; the finished job publishes a new task version.

    Before answering 202 the archive's type, entries, layout and classes are checked, and a few images
    of each class decoded: a problem is a 400 `dataset_*` naming the offending files in `details`."""
    validate_id(task_id)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise ApiError(415, "unsupported_media_type", "send multipart/form-data with a 'dataset' file")
    async with request.form(max_files=1, max_fields=32, max_part_size=64 * 1024) as form:
        dataset = form.get("dataset")
        if not isinstance(dataset, UploadFile):
            raise ApiError(400, "bad_request", "the multipart field 'dataset' must be a file")
        fields = [(k, v) for k, v in form.multi_items() if k != "dataset" and isinstance(v, str)]
        options = parse_options(fields, state.settings.max_task_prompts, state.settings.max_train_workers)
        tmp = await run_in_threadpool(_spool, dataset, state.jobs.uploads_dir / "incoming")
        suffix, name = _suffix(dataset.filename), (dataset.filename or "dataset")[:200]
    try:  # what is cheap to check is answered now (400 dataset_*); the job still checks every image
        await run_in_threadpool(preflight_archive, tmp, state.jobs.uploads_dir / "incoming",
                                ingest_limits(state.settings), name=name)
        job = await run_in_threadpool(state.jobs.submit, tenant, task_id, tmp, suffix, options)
    finally:
        tmp.unlink(missing_ok=True)
    return JSONResponse(job_out(job).model_dump(), status_code=202, headers={"Location": f"/jobs/{job.job_id}"})


@router.get("/jobs", response_model=JobList)
def list_jobs(state: State, tenant: Tenant, task: str | None = Query(None),
              job_state: str | None = Query(None, alias="state"),
              limit: int = Query(DEFAULT_LIMIT, ge=1, le=MAX_LIMIT, description="jobs per page"),
              cursor: str | None = Query(None, description="`next_cursor` of the previous page")) -> JobList:
    """The tenant's jobs, newest first, a page at a time; follow `next_cursor` until it is null."""
    if task is not None:
        validate_id(task)
    if job_state is not None and job_state not in JOB_STATES:
        raise ApiError(400, "invalid_parameter", f"state must be one of {list(JOB_STATES)}")
    page = paged(job_page, state.store, tenant, limit, cursor, task, job_state)
    return JobList(jobs=[job_out(j) for j in page.items], next_cursor=page.next_cursor)


@router.get("/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, state: State, tenant: Tenant) -> JobOut:
    return job_out(state.store.get_job(tenant, validate_id(job_id, "job id")))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, responses={409: {"model": ErrorOut}})
def cancel_job(job_id: str, state: State, tenant: Tenant) -> JobOut:
    """A queued job is cancelled at once; a running one stops at its next training step."""
    return job_out(state.jobs.cancel(tenant, validate_id(job_id, "job id")))


@router.get("/jobs/{job_id}/events", response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}, "description": "progress events"}})
async def job_events(job_id: str, request: Request, state: State, tenant: Tenant) -> StreamingResponse:
    """Server-sent events: `progress` with the job whenever it changes, then `end` once it is terminal;
    a `: keep-alive` comment every `VPT_SSE_KEEPALIVE_S` while nothing changes, and `timeout` (then the
    stream closes) after `VPT_SSE_MAX_S`."""
    validate_id(job_id, "job id")
    first = await run_in_threadpool(state.store.get_job, tenant, job_id)  # 404 before the stream starts

    settings = state.settings

    async def stream() -> AsyncIterator[bytes]:
        job, last = first, None
        start = quiet_since = time.monotonic()
        while True:
            if job.updated_at != last:
                last, quiet_since = job.updated_at, time.monotonic()
                yield f"event: progress\ndata: {json.dumps(job_out(job).model_dump())}\n\n".encode()
            if job.state in TERMINAL_STATES:
                yield b"event: end\ndata: {}\n\n"
                return
            if time.monotonic() - start >= settings.sse_max_s:  # bounded: the client reconnects
                yield b"event: timeout\ndata: {}\n\n"
                return
            if time.monotonic() - quiet_since >= settings.sse_keepalive_s:  # proxies keep the stream open
                quiet_since = time.monotonic()
                yield b": keep-alive\n\n"
            await asyncio.sleep(0.5)
            if await request.is_disconnected():
                return
            job = await run_in_threadpool(state.store.get_job, tenant, job_id)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
