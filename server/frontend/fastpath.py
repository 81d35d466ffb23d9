"""`POST /predict` with one raw image body, served without FastAPI's routing and dependency layers.

The common request of a busy server (one image, `?task=...&top_k=...`) spends more of a front end's
CPU in routing, dependency solving and the exception middleware stack than in its own work. This
pure ASGI layer takes exactly that request, when its query is plainly valid, and runs the same code
as the route (auth: `get_tenant`; work: `predict.answer`; errors: `TaskRoute`'s `better_error`, then
`translate` and `error_response`, as the app's handlers render them). Anything else (multipart, a query FastAPI would answer 422,
other routes) goes through the app unchanged.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from prompt_store.ids import validate_id
from server.errors import ApiError, error_response, http_error, translate
from server.frontend.deps import get_tenant
from server.frontend.missing import better_error
from server.frontend.routes import predict

PATH = "/predict"
_TOP_K = re.compile(r"^[0-9]{1,3}$")
_RAW_TYPES = (b"image/", b"application/octet-stream")


def plain_query(query: bytes) -> tuple[str, int] | None:
    """(task, top_k) of a query with `task` once and `top_k` at most once (1..100), nothing else; else None."""
    task, top_k = None, None
    for part in query.split(b"&"):
        key, sep, value = part.partition(b"=")
        if key == b"task" and sep and task is None:
            task = unquote_plus(value.decode("latin-1"))
        elif key == b"top_k" and top_k is None and _TOP_K.match(value.decode("latin-1")):
            top_k = int(value)
            if not 1 <= top_k <= 100:
                return None
        else:
            return None
    return (task, 5 if top_k is None else top_k) if task else None


class FastPredict:
    """Answers the plain raw-image `/predict` request (see the module docstring)."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        # The route from its own router: FastAPI may keep an included router whole in `app.routes`.
        self.route: BaseRoute = next(r for r in predict.router.routes if getattr(r, "path", None) == PATH
                                     and "POST" in getattr(r, "methods", ()))

    def accepts(self, scope: dict[str, Any], headers: dict[bytes, bytes]) -> tuple[str, int] | None:
        if scope["path"] != PATH or scope.get("method") != "POST" \
                or getattr(self.app.state, "vpt", None) is None:
            return None
        if not headers.get(b"content-type", b"").lower().startswith(_RAW_TYPES):
            return None
        return plain_query(scope.get("query_string", b""))

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable, params: tuple[str, int]) -> None:
        response = await self.respond(scope, receive, params)
        await response(scope, receive, send)

    async def respond(self, scope: dict[str, Any], receive: Callable, params: tuple[str, int]) -> Response:
        """The request's response, errors included (server/frontend/fasthttp.py writes it without ASGI)."""
        scope["app"], scope["route"] = self.app, self.route  # as routing would set them (metrics read `route`)
        request = Request(scope, receive)
        task, top_k = params
        state = self.app.state.vpt
        try:
            tenant = await get_tenant(request, state)
            validate_id(task)
            response = await predict.answer(request, state, tenant, task, top_k)
        except StarletteHTTPException as e:  # 408/413 from the body limits
            response = error_response(http_error(e), scope["state"].get("request_id"), PATH)
        except ClientDisconnect:
            err = ApiError(400, "bad_request", "the client closed the connection mid-request")
            response = error_response(err, scope["state"].get("request_id"), PATH)
        except Exception as e:  # noqa: BLE001 (translate logs what is a bug and answers 500)
            better = await better_error(request, e)  # as the route's TaskRoute: "did you mean", task_training
            response = error_response(translate(better or e), scope["state"].get("request_id"), PATH)
        return response
