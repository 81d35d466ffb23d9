"""Backbone facts, health, readiness and Prometheus metrics."""
from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from prompt_store.errors import StoreError
from server.frontend.deps import State, Tenant, is_loopback
from server.errors import ApiError
from server.frontend.schemas import BackboneOut

router = APIRouter(tags=["system"])


@router.get("/backbone", response_model=BackboneOut)
def backbone(state: State, tenant: Tenant) -> BackboneOut:
    """The frozen backbone every task runs on; clients preprocess nothing (the server does)."""
    return BackboneOut(**state.backbone.describe())


@router.get("/healthz")
def healthz() -> dict[str, str]:
    """The process answers."""
    return {"status": "ok"}


@router.get("/readyz")
def readyz(state: State) -> JSONResponse:
    """Backbone loaded, store reachable, batcher running; 503 `not_ready` otherwise."""
    checks = {"backbone": "ok", "batcher": "ok" if state.batcher._thread.is_alive() else "stopped"}
    try:
        state.store.ping()
        checks["store"] = "ok"
    except StoreError as e:
        checks["store"] = f"unavailable: {e}"
    if all(v == "ok" for v in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    return JSONResponse({"error": {"code": "not_ready", "message": "not ready", "details": checks}},
                        status_code=503, headers={"Retry-After": "2"})


@router.get("/metrics", response_class=Response)
def metrics(request: Request, state: State) -> Response:
    """Prometheus text. Labels name tenants and tasks, so it answers loopback callers, or callers
    presenting `VPT_METRICS_TOKEN` as a bearer token."""
    token = state.settings.metrics_token
    presented = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    allowed = (token is not None and hmac.compare_digest(presented.encode(), token.encode())) or (
        token is None and is_loopback(request.client.host if request.client else None))
    if not allowed:
        raise ApiError(403, "forbidden", "/metrics needs VPT_METRICS_TOKEN as a bearer token (or a loopback caller)")
    return Response(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")
