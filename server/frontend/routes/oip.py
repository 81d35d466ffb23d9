"""Open Inference Protocol v2 (KServe / Triton REST): a task is a model, its versions are the model's.

Same auth, tenancy, limits, batching, backpressure and timeouts as `/predict` (both call the same
entry point); errors in the protocol's own shape, `{"error": "<message>"}` (see server/errors.py).
Tensors and their checks live in oip_tensors.py; this module only routes.
"""
from __future__ import annotations

import json
import zlib
from typing import TYPE_CHECKING

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.concurrency import run_in_threadpool

from prompt_store.ids import validate_id
from prompt_store.records import TaskVersion
from server.errors import ApiError
from server.frontend.deps import State, Tenant
from server.frontend.openapi import errors
from server.frontend.routes.oip_tensors import (
    HEADER_LENGTH,
    IMAGE_BYTES,
    IMAGES,
    OUTPUT_TYPES,
    PROBABILITIES,
    InferRequest,
    Limits,
    build_outputs,
    encode_response,
    parse_request,
)
from server.frontend.routes.predict import classify

if TYPE_CHECKING:  # front-end processes never load the engine's state (torch, timm)
    from server.state import AppState

router = APIRouter(tags=["open inference protocol"])

SERVER_NAME = "vpt-serve"
PLATFORM = "pytorch_vpt"
EXTENSIONS = ["binary_tensor_data", "classification"]
ALL_CLASSES = 2**31 - 1  # top-k count that asks the batcher for every class
INFER_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": {"type": "object"}},
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"},
                                 "description": f"JSON header of {HEADER_LENGTH} bytes, then tensors"}}}}


# -- health and metadata ----------------------------------------------------------------------------

@router.get("/v2")
def server_metadata(request: Request) -> dict:
    """Server name, version and the protocol extensions it speaks."""
    return {"name": SERVER_NAME, "version": request.app.version, "extensions": EXTENSIONS}


@router.get("/v2/health/live")
def live() -> dict:
    return {"live": True}


@router.get("/v2/health/ready")
async def ready(state: State) -> dict:
    checks = await state.ready()
    failed = {k: v for k, v in checks.items() if v != "ok"}
    if failed:
        raise ApiError(503, "not_ready", f"not ready: {failed}", headers={"Retry-After": "2"})
    return {"ready": True}


def _version_number(version: str) -> int:
    if not (version.isascii() and version.isdigit()) or len(version) > 18 or int(version) < 1:
        raise ApiError(400, "bad_request", f"model version must be a positive integer, got {version[:24]!r}")
    return int(version)


def _record(state: AppState, tenant: str, task: str,
            version: str | None) -> tuple[TaskVersion, list[int], int]:
    """(the version's record, all version numbers, the current one); 404 for an unknown task or version."""
    info = state.store.get_info(tenant, validate_id(task))
    records = state.store.list_versions(tenant, task)
    wanted = info.current_version if version is None else _version_number(version)
    record = next((r for r in records if r.version == wanted), None)
    if record is None:
        raise ApiError(404, "version_not_found", f"model {task!r} has no version {wanted}")
    return record, [r.version for r in records], info.current_version


def _metadata(state: AppState, tenant: str, task: str, version: str | None) -> dict:
    record, versions, _ = _record(state, tenant, task, version)
    c, h, w = state.backbone.data_config["input_size"]
    num_classes = len(_classes(record))
    return {"name": task, "versions": [str(v) for v in versions], "platform": PLATFORM,
            "inputs": [{"name": IMAGES, "datatype": "FP32", "shape": [-1, c, h, w]},
                       {"name": IMAGE_BYTES, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": name, "datatype": dt,
                         "shape": [-1, num_classes if name == PROBABILITIES else -1]}
                        for name, dt in OUTPUT_TYPES.items()]}


def _classes(record: TaskVersion) -> list:
    try:
        classes = json.loads(record.metadata.get("classes", "[]"))
    except (ValueError, RecursionError):
        return []
    return classes if isinstance(classes, list) else []


def _ready(state: AppState, tenant: str, task: str, version: str | None) -> dict:
    record, _, current = _record(state, tenant, task, version)
    if record.version != current:
        raise ApiError(503, "not_ready", f"model {task!r} version {record.version} is not served: "
                                         f"the current version is {current}")
    if record.metadata.get("backbone_fingerprint", "") != state.backbone.fingerprint:
        raise ApiError(503, "not_ready", f"model {task!r} was trained on another backbone")
    return {"name": task, "ready": True}


@router.get("/v2/models/{task}")
def model_metadata(task: str, state: State, tenant: Tenant) -> dict:
    """Inputs and outputs, with datatypes and shapes (-1: any size), and the task's versions."""
    return _metadata(state, tenant, task, None)


@router.get("/v2/models/{task}/versions/{version}")
def version_metadata(task: str, version: str, state: State, tenant: Tenant) -> dict:
    return _metadata(state, tenant, task, version)


@router.get("/v2/models/{task}/ready")
def model_ready(task: str, state: State, tenant: Tenant) -> dict:
    """200 when the task's current version can be served; 404 unknown, 503 not servable."""
    return _ready(state, tenant, task, None)


@router.get("/v2/models/{task}/versions/{version}/ready")
def version_ready(task: str, version: str, state: State, tenant: Tenant) -> dict:
    """Only the current version of a task is served: others answer 503."""
    return _ready(state, tenant, task, version)


# -- inference --------------------------------------------------------------------------------------

def _limits(state: AppState) -> Limits:
    s = state.settings
    _, h, w = state.backbone.data_config["input_size"]
    return Limits((h, w), s.max_images_per_request, s.max_image_bytes, s.max_top_k)


def _body_limit(state: AppState) -> int:
    s = state.settings  # as the request-size middleware counts an inference body, here once decompressed
    return s.max_images_per_request * s.max_image_bytes + (1 << 20)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent with `Content-Encoding` gzip or deflate (tritonclient's request compression),
    inflated to at most `limit` bytes (413 past it)."""
    if encoding in ("", "identity"):
        return body
    if encoding not in ("gzip", "deflate"):
        raise ApiError(415, "unsupported_media_type", f"Content-Encoding {encoding[:32]!r} is not supported: "
                                                      "send gzip, deflate or identity")
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as e:
        raise ApiError(400, "bad_request", f"the {encoding} body cannot be decompressed: {e}") from None
    if len(out) > limit:
        raise ApiError(413, "payload_too_large", f"the decompressed request body exceeds {limit} bytes")
    if not inflater.eof:
        raise ApiError(400, "bad_request", f"the {encoding} body is truncated")
    return out


async def _images(state: AppState, req: InferRequest) -> list[np.ndarray] | np.ndarray:
    """Decoded uint8 (H, W, 3) images, or (N, 3, H, W) float32 normalised as the backbone expects."""
    if req.encoded is not None:
        return await state.decoder.decode([(data, f"#{i}") for i, data in enumerate(req.encoded)])
    x = np.array(req.pixels, dtype=np.float32)                                  # (N, 3, H, W)
    if req.pixels.dtype == np.uint8:                                            # pixels: normalise like timm
        dc = state.backbone.data_config
        mean = np.array(dc["mean"], dtype=np.float32).reshape(1, 3, 1, 1)
        std = np.array(dc["std"], dtype=np.float32).reshape(1, 3, 1, 1)
        x = (x / np.float32(255.0) - mean) / std
    return x


async def _check_served(state: AppState, tenant: str, task: str, version: str) -> None:
    record, _, current = await run_in_threadpool(_record, state, tenant, task, version)
    if record.version != current:
        raise ApiError(400, "bad_request", f"model {task!r} version {record.version} is not served: only the "
                                           f"current version ({current}) is; activate it first")


async def _infer(request: Request, state: AppState, tenant: str, task: str, version: str | None) -> Response:
    validate_id(task)
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    body = await run_in_threadpool(decompress, await request.body(), encoding, _body_limit(state))
    req = await run_in_threadpool(parse_request, body, request.headers.get(HEADER_LENGTH), _limits(state))
    if version is not None:
        await _check_served(state, tenant, task, version)
    images = await _images(state, req)
    needed = req.classes_needed()
    outcome = await classify(state, tenant, task, images, ALL_CLASSES if needed is None else needed)
    content, head = encode_response(task, outcome.version, req.id, build_outputs(req, outcome.results))
    if head is None:
        return Response(content, media_type="application/json")
    return Response(content, media_type="application/octet-stream", headers={HEADER_LENGTH: str(head)})


@router.post("/v2/models/{task}/infer", response_class=Response, openapi_extra=INFER_BODY,
             responses=errors(415, 504))
async def infer(task: str, request: Request, state: State, tenant: Tenant) -> Response:
    """Classify a batch of images (preprocessed tensors or encoded files) with the task's current version."""
    return await _infer(request, state, tenant, task, None)


@router.post("/v2/models/{task}/versions/{version}/infer", response_class=Response, openapi_extra=INFER_BODY,
             responses=errors(415, 504))
async def infer_version(task: str, version: str, request: Request, state: State, tenant: Tenant) -> Response:
    """As `infer`, for the task's current version only (another version answers 400)."""
    return await _infer(request, state, tenant, task, version)

