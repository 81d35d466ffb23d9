"""Prediction: images of any task join the next shared batch."""
from __future__ import annotations

import asyncio
import math
import time
from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from prompt_store.ids import validate_id
from server.answers import Outcome
from server.errors import ApiError
from server.frontend.deps import State, Tenant
from server.frontend.forms import parse_form
from server.frontend.missing import TaskRoute
from server.frontend.schemas import ErrorOut, PredictionOut, safe_text

if TYPE_CHECKING:  # front-end processes never load the engine's state (torch, timm)
    from server.state import AppState

router = APIRouter(tags=["predict"], route_class=TaskRoute)

PREDICT_BODY = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
    "image/*": {"schema": {"type": "string", "format": "binary"}},
}}}


async def _read_images(request: Request, state: State) -> list[tuple[bytes, str | None]]:
    s = state.settings
    ctype = request.headers.get("content-type", "").lower()
    if ctype.startswith("multipart/form-data"):
        items = []
        form = await parse_form(request, max_file_bytes=s.max_image_bytes, max_files=s.max_images_per_request,
                                max_fields=8)  # one file past the limit is 413, however many follow
        try:
            parts = [v for k, v in form.multi_items() if k == "image"]
            for part in parts:
                if not isinstance(part, UploadFile):
                    raise ApiError(400, "bad_request", "each 'image' field must be a file")
                data = await part.read(s.max_image_bytes + 1)
                if len(data) > s.max_image_bytes:
                    raise ApiError(413, "payload_too_large",
                                   f"image {part.filename!r} exceeds {s.max_image_bytes} bytes")
                items.append((data, part.filename))
        finally:
            await form.close()
        if not items:
            raise ApiError(400, "bad_request", "send one or more multipart 'image' files")
        return items
    if ctype.startswith(("image/", "application/octet-stream")):
        return [(await _read_raw(request, s.max_image_bytes), None)]
    raise ApiError(415, "unsupported_media_type",
                   "send multipart/form-data with 'image' files, or a raw image body (image/*)")


async def _read_raw(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` (the rest is never read)."""
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, "payload_too_large", f"the image exceeds {limit} bytes")
    return bytes(data)


async def classify(state: AppState, tenant: str, task: str, images: list[np.ndarray] | np.ndarray,
                   top_k: int) -> Outcome:
    """The prediction entry point of every HTTP route: decoded uint8 (H, W, 3) images or a preprocessed
    (n, 3, H, W) batch join the next shared batch (in this process, or the engine process's over the
    channel); 504 `timeout` past the request timeout, 503 `busy` when the queue is full."""
    try:
        async with asyncio.timeout(state.settings.request_timeout_s):  # no extra task, unlike wait_for
            return await state.predict(tenant, task, images, top_k)
    except TimeoutError as e:
        raise ApiError(504, "timeout", f"no answer within {state.settings.request_timeout_s} s") from e


@router.post("/predict", response_model=PredictionOut, openapi_extra=PREDICT_BODY,
             responses={400: {"model": ErrorOut}, 404: {"model": ErrorOut}, 413: {"model": ErrorOut},
                        409: {"model": ErrorOut}, 415: {"model": ErrorOut}, 503: {"model": ErrorOut}, 504: {"model": ErrorOut}})
async def predict(request: Request, state: State, tenant: Tenant, task: str = Query(..., description="task id"),
                  top_k: int = Query(5, ge=1, le=100)) -> JSONResponse:
    """Classify images with a task's current version: per image the top-k labels and scores."""
    validate_id(task)
    return await answer(request, state, tenant, task, top_k)


async def answer(request: Request, state: AppState, tenant: str, task: str, top_k: int) -> JSONResponse:
    """The route's work once its parameters are checked (server/frontend/fastpath.py calls it too)."""
    t0 = time.perf_counter()
    items = await _read_images(request, state)
    images = await state.decoder.decode([(d, n or f"#{i}") for i, (d, n) in enumerate(items)])
    t_decoded = time.perf_counter()
    outcome = await classify(state, tenant, task, images, top_k)
    results = [{"image": i, "filename": safe_text(name),
                "top_k": [{"label": safe_text(t.label), "index": t.index, "score": _score(t.score)} for t in top]}
               for i, ((_, name), top) in enumerate(zip(items, outcome.results))]
    total = (time.perf_counter() - t0) * 1000
    # PredictionOut's fields, serialised directly: validating our own output through the model costs
    # more CPU than the rest of the request's Python
    return JSONResponse({"task_id": task, "version": outcome.version, "results": results, "timings_ms": {
        "decode": round((t_decoded - t0) * 1000, 3), "queue": round(outcome.queue_ms, 3),
        "forward": round(outcome.forward_ms, 3), "total": round(total, 3),
        "batch_images": float(outcome.batch_images)}})


def _score(value: float) -> float | None:
    """A score as JSON allows it (a non-finite float, from a broken task, becomes null as pydantic writes it)."""
    return value if math.isfinite(value) else None
