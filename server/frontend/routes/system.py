"""Backbone facts, health, readiness and Prometheus metrics."""
from __future__ import annotations

import asyncio
import hmac
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from prompt_store.errors import StoreError
from server.errors import ApiError
from server.frontend.deps import State, Tenant, is_loopback, presented_key
from server.frontend.openapi import errors
from server.frontend.schemas import BackboneOut, ReadyOut

if TYPE_CHECKING:  # front-end processes never load the engine's state (torch, timm)
    from server.state import AppState

router = APIRouter(tags=["system"])


@router.get("/backbone", response_model=BackboneOut)
def backbone(state: State, tenant: Tenant) -> BackboneOut:
    """The frozen backbone every task runs on; clients preprocess nothing (the server does)."""
    return BackboneOut(**state.backbone.describe())


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


def readiness(state: AppState, details: bool = False) -> dict[str, str]:
    """Each check's state: "ok" or why not (backbone loaded, batcher running, store reachable, enough
    free disk). With `details`, the reasons (paths, store messages): only for trusted callers."""
    checks = {"backbone": "ok", "batcher": "ok" if state.batcher._thread.is_alive() else "stopped"}
    reasons: dict[str, str] = {}
    try:
        state.store.ping()
        checks["store"] = "ok"
    except StoreError as e:
        checks["store"], reasons["store"] = "unavailable", str(e)
    low = low_disk(state)
    checks["disk"] = "low" if low else "ok"
    if low:
        reasons["disk"] = low
    if details:
        checks = {k: f"{v}: {reasons[k]}" if k in reasons else v for k, v in checks.items()}
    return checks


@router.get("/readyz", response_model=ReadyOut, responses=errors(503))
async def readyz(request: Request, state: State) -> JSONResponse:
    """Backbone loaded, store reachable, batcher running, enough free disk; 503 `not_ready` otherwise.
    Details (paths, store messages, free bytes) only go to loopback or authenticated callers."""
    checks = await state.ready(details=_may_see_details(request, state))  # in the engine process, if apart
    if all(v == "ok" for v in checks.values()):
        details = await asyncio.to_thread(_task_details, state)
        return JSONResponse({"status": "ready", "checks": checks, "details": details})
    return JSONResponse({"error": {"code": "not_ready", "message": "not ready", "details": checks}},
                        status_code=503, headers={"Retry-After": "2"})


def _task_details(state: AppState) -> dict[str, int | str]:
    """Tasks this backbone cannot serve (trained on another one): counted, never a reason to be unready."""
    count = getattr(state, "unservable_tasks", None)
    if count is None:
        return {}
    try:
        n = count()
    except StoreError:
        return {}
    out: dict[str, int | str] = {"unservable_tasks": n}
    if n:
        out["hint"] = (f"{n} task(s) were trained on another backbone (backbone_mismatch); GET /tasks marks "
                       "them servable=false")
    return out


def low_disk(state: AppState) -> str | None:
    """A description of the first data folder with less than `VPT_MIN_FREE_BYTES` free, if any."""
    folders = [state.settings.uploads_dir.resolve()]
    root = getattr(state.store, "root", None)
    if root is not None:
        folders.append(Path(root))
    for folder in folders:
        try:
            free = shutil.disk_usage(folder).free
        except OSError as e:
            return f"{folder}: {e}"
        if free < state.settings.min_free_bytes:
            return f"{folder}: {free} bytes free, below {state.settings.min_free_bytes}"
    return None


def _may_see_details(request: Request, state: AppState) -> bool:
    if is_loopback(request.client.host if request.client else None):
        return True
    key = presented_key(request)
    return key is not None and state.keyring.enabled and state.keyring.tenant_for(key) is not None


@router.get("/metrics", response_class=Response, responses={
    200: {"description": "Prometheus text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}},
    **errors(401, 403)})
async def metrics(request: Request, state: State) -> Response:
    """Prometheus text. Labels name tenants and tasks, so it answers loopback callers, or callers
    presenting `VPT_METRICS_TOKEN` as a bearer token."""
    token = state.settings.metrics_token
    if token is None:
        if not is_loopback(request.client.host if request.client else None):
            raise ApiError(403, "forbidden", "/metrics answers loopback callers only unless VPT_METRICS_TOKEN is set")
    else:
        presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not hmac.compare_digest(presented.encode(), token.encode()):
            raise ApiError(401, "unauthorized", "/metrics needs VPT_METRICS_TOKEN as a bearer token",
                           headers={"WWW-Authenticate": "Bearer"})
    return Response(await state.render_metrics(), media_type="text/plain; version=0.0.4; charset=utf-8")
