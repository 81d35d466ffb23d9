"""The FastAPI app: factory, lifespan (the backbone loads once), request context middleware."""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from server.console import routes as console
from server.errors import ApiError, error_response, install_handlers, is_oip_path, oip_error_body
from server.frontend.fastpath import FastPredict
from server.frontend.openapi import install_openapi
from server.frontend.routes import jobs, oip, predict, system, tasks
from server.frontend.state import FrontendState
from server.settings import Settings

if TYPE_CHECKING:  # a front-end process never loads the engine's state (torch, timm)
    from server.state import AppState

log = logging.getLogger(__name__)
access = logging.getLogger("vpt.access")

_RID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")
Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]
_RID_PREFIX = os.urandom(10).hex()  # per process; with a counter: unique ids without a uuid4 per request
_RID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    """32 hex characters: this process's random prefix and a counter."""
    return f"{_RID_PREFIX}{next(_RID_COUNTER) & 0xFFFFFFFFFFFF:012x}"


def request_id(headers: dict[bytes, bytes]) -> str:
    """The caller's `X-Request-ID` when it is a plain token of at most 64 characters, else a new one."""
    rid = headers.get(b"x-request-id", b"").decode("latin-1")
    return rid if rid and _RID.match(rid) else new_request_id()


def head_as_get(scope: Scope, receive: Callable, send: Callable) -> tuple[Scope, Callable, Callable]:
    """HEAD on any GET route: the app runs the GET (on a copy of the scope); its status and headers go
    out, its body does not. A streamed body ends at once: the app then reads a disconnect."""
    ended = {"done": False}

    async def head_send(message: dict) -> None:
        if message["type"] == "http.response.start":
            await send(message)
        elif message["type"] == "http.response.body" and not ended["done"]:
            ended["done"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def head_receive() -> dict:
        if ended["done"]:
            return {"type": "http.disconnect"}
        return await receive()

    return {**scope, "method": "GET"}, head_receive, head_send


def install_method_not_allowed(app: FastAPI, routers: list[APIRouter]) -> None:
    """405 `method_not_allowed` with an `Allow` header naming every method of every route on the path
    (Starlette names only the first route's), HEAD wherever GET is."""
    async def handler(request: Request, exc: Exception) -> JSONResponse:
        allowed: set[str] = set()
        for route in (r for router in routers for r in router.routes):
            if isinstance(route, APIRoute) and route.matches(request.scope)[0] != Match.NONE:
                allowed |= route.methods
        if "GET" in allowed:
            allowed.add("HEAD")
        allow = ", ".join(m for m in _METHOD_ORDER if m in allowed)
        err = ApiError(405, "method_not_allowed", f"{request.method} is not allowed here; use {allow}",
                       headers={"Allow": allow})
        return error_response(err, getattr(request.state, "request_id", None), request.url.path)

    app.add_exception_handler(405, handler)


async def _body_chunk(receive: Callable, deadline: float, idle_s: float) -> dict:
    """The next body message, or 408 when the client stalls (idle) or the body takes too long."""
    wait = min(idle_s, deadline - time.monotonic())
    try:
        async with asyncio.timeout(max(0.0, wait)):  # a timer, not wait_for's extra task per body chunk
            return await receive()
    except TimeoutError:
        raise StarletteHTTPException(408, "the request body arrived too slowly") from None


def counted(receive: Callable, limit: int, settings: Settings) -> Callable[[], Awaitable[dict]]:
    """`receive` under a request's body rules: 413 once more than `limit` bytes came, 408 when the body
    stalls (`body_idle_timeout_s`) or takes too long (`body_timeout_s`)."""
    seen = {"n": 0, "done": False}
    deadline = time.monotonic() + settings.body_timeout_s

    async def counted_receive() -> dict:
        if seen["done"]:  # the body is in: what follows is a wait for the disconnect
            return await receive()
        message = await _body_chunk(receive, deadline, settings.body_idle_timeout_s)
        if message["type"] == "http.request":
            seen["n"] += len(message.get("body", b""))
            seen["done"] = not message.get("more_body", False)
            if seen["n"] > limit:
                raise StarletteHTTPException(413, f"the request body exceeds {limit} bytes")
        return message

    return counted_receive


def declared_length(headers: dict[bytes, bytes]) -> int:
    """The request's `Content-Length` (0 when absent or not a number: the body is counted as it comes)."""
    try:
        return int(headers.get(b"content-length", b"0") or 0)
    except ValueError:
        return 0


class RequestContext:
    """Request ids, body-size limits per route, access logs and request metrics (pure ASGI)."""

    def __init__(self, app: ASGIApp, settings: Settings, fastapi_app: FastAPI) -> None:
        self.app, self.settings, self.fastapi_app = app, settings, fastapi_app
        self._children: dict[tuple[str, str, int], tuple[Any, Any, Any]] = {}  # labelled metrics, per state
        self.fast = FastPredict(fastapi_app)
        fastapi_app.state.request_context = self  # the HTTP protocol's own fast path shares limits and metrics

    def limit_for(self, path: str) -> int:
        s = self.settings
        if path.endswith("/train"):
            return s.max_upload_bytes + (1 << 20)
        if path == "/predict" or (is_oip_path(path) and path.endswith("/infer")):
            return s.max_images_per_request * s.max_image_bytes + (1 << 20)
        if path.endswith("/import"):
            return s.max_task_file_bytes
        return 1 << 20

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "")
        headers = dict(scope.get("headers") or [])
        rid = request_id(headers)
        scope.setdefault("state", {})["request_id"] = rid
        limit = self.limit_for(scope["path"])
        status = {"code": 500}
        t0 = time.perf_counter()

        async def send_with_id(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + [(b"x-request-id", rid.encode())]
            await send(message)

        declared = declared_length(headers)
        inner = scope
        if method == "HEAD":  # the server (uvicorn) keeps its own scope: it knows no body follows
            inner, receive, send_with_id = head_as_get(scope, receive, send_with_id)
        try:
            await self._dispatch(inner, receive, send_with_id, declared, limit, rid, self.fast.accepts(inner, headers))
        finally:
            self.observe(inner, method, status["code"], time.perf_counter() - t0, rid)

    async def _dispatch(self, scope: Scope, receive: Callable, send: Callable, declared: int, limit: int,
                        rid: str, fast: tuple[str, int] | None) -> None:
        if declared > limit:
            await self._reject(send, rid, limit, scope["path"])
        else:
            counted_receive = counted(receive, limit, self.settings)
            if fast is not None:
                await self.fast(scope, counted_receive, send, fast)
            else:
                await self.app(scope, counted_receive, send)

    async def _reject(self, send: Callable, rid: str, limit: int, path: str) -> None:
        status, headers, body = self.too_large(rid, limit, path)
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    @staticmethod
    def too_large(rid: str, limit: int, path: str) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        """The 413 for a declared body beyond the route's limit: status, headers, body (the connection closes)."""
        message = f"the request body exceeds {limit} bytes"
        error = oip_error_body(message) if is_oip_path(path) else {
            "error": {"code": "payload_too_large", "message": message, "request_id": rid}}
        body = json.dumps(error).encode()
        return 413, [(b"content-type", b"application/json"), (b"connection", b"close"),
                     (b"content-length", str(len(body)).encode())], body

    def observe(self, scope: Scope, method: str, status: int, seconds: float, rid: str) -> None:
        """The access log line and request metrics of one answered request."""
        route = scope.get("route")
        template = getattr(route, "path", None) or "unmatched"
        access.info("%s %s %d %.1fms rid=%s", method, scope["path"], status, seconds * 1000, rid)
        state = getattr(self.fastapi_app.state, "vpt", None)
        if state is not None:
            key = (template, method, status)
            children = self._children.get(key)
            if children is None or children[0] is not state.metrics:  # `labels()` locks: look up each series once
                children = (state.metrics, state.metrics.requests.labels(template, method, str(status)),
                            state.metrics.latency.labels(template, method))
                if len(self._children) < 10_000:
                    self._children[key] = children
            children[1].inc()
            children[2].observe(seconds)


def create_app(settings: Settings | None = None, state: AppState | None = None,
               frontend: FrontendState | None = None) -> FastAPI:
    """The app. Single process: its lifespan loads the backbone and opens the store unless `state` is
    given. Front-end process: `frontend` connects to the engine process at startup."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = state is None and frontend is None
        if frontend is not None:
            await frontend.start()
            app.state.vpt = frontend
        elif state is not None:
            app.state.vpt = state
        else:  # the single-process server: the model stack loads here
            from server.state import AppState

            app.state.vpt = await run_in_threadpool(AppState.start, settings)
        facts = app.state.vpt.backbone.describe()
        log.info("ready: backbone %s on %s, store %s", facts["name"], facts["device"], settings.store_redacted)
        try:
            yield
        finally:
            if owned:
                await run_in_threadpool(app.state.vpt.close)
            if frontend is not None:
                await frontend.client.close()
                frontend.close()
            app.state.vpt = None

    app = FastAPI(title="vpt-serve", version="0.1.0", lifespan=lifespan,
                  description="Many image classifiers on one frozen ViT with Visual Prompt Tuning. "
                              "Errors are `{\"error\": {\"code\", \"message\"}}`; the Open Inference "
                              "Protocol routes under `/v2` answer `{\"error\": \"<message>\"}`. Every GET "
                              "route also answers HEAD: the same status and headers, no body.")
    install_handlers(app)
    routers = [module.router for module in (tasks, jobs, predict, system, oip, console)]
    for router in routers:
        app.include_router(router)
    install_openapi(app, routers)
    install_method_not_allowed(app, routers)
    app.add_middleware(RequestContext, settings=settings, fastapi_app=app)
    return app
