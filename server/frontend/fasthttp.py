"""The plain `POST /predict` served from the HTTP protocol itself, without an ASGI request cycle.

uvicorn's httptools protocol turns every request into an ASGI cycle: a scope, `receive` and `send`
coroutines, one message per body chunk and two per response, then the app's middleware stack. For
the busiest request of a front end (one raw image, `?task=...&top_k=...`) that is a large share of
its CPU besides decoding. `FastHttpProtocol` is uvicorn's protocol with one change: when a request's
head shows exactly that request, it hands the body, as it arrives, to the same code as the route
(`FastPredict.respond`: auth, checks, decoding, the engine, error translation) under the same size
limits and timeouts as `RequestContext`, and writes the status line, headers and body in one write.
Request ids, the access log and request metrics are `RequestContext`'s own. Every other request, and
any request this path is unsure of (proxy headers, `Expect: 100-continue`, HTTP/1.0, a pipelined
request behind another, a root path, the concurrency limit reached, the app not started), takes
uvicorn's ordinary path unchanged.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httptools
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from server.frontend.app import counted, declared_length, request_id
from server.frontend.fastpath import PATH

log = logging.getLogger(__name__)
_PROXY_HEADERS = (b"x-forwarded-for", b"x-forwarded-proto")


class _Cycle:
    """What uvicorn's protocol reads and writes of the request in flight (body, events, completion)."""

    def __init__(self, keep_alive: bool) -> None:
        self.body = bytearray()
        self.more_body = True
        self.message_event = asyncio.Event()
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = keep_alive


class FastHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; the plain `/predict` request skips the ASGI cycle (module docstring)."""

    fast_app: FastAPI | None = None  # set by `protocol_for`

    def on_headers_complete(self) -> None:
        params = self._plain_predict()
        if params is None:
            super().on_headers_complete()
            return
        self.cycle = cycle = _Cycle(self.parser.should_keep_alive())  # type: ignore[assignment]
        # this request's scope now: a pipelined request's head may be parsed before the task runs
        task = self.loop.create_task(self._serve(cycle, self.scope, *params))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)  # a graceful shutdown waits for it

    def _plain_predict(self) -> tuple[Any, dict[bytes, bytes], tuple[str, int]] | None:
        """(the request context, the headers, (task, top_k)) when this request can take the fast path."""
        app = self.fast_app
        context = getattr(app.state, "request_context", None) if app is not None else None
        if context is None or getattr(app.state, "vpt", None) is None or self.root_path \
                or self.expect_100_continue or self.parser.get_method() != b"POST" \
                or self.parser.get_http_version() != "1.1" or self.parser.should_upgrade():
            return None
        if self.cycle is not None and not self.cycle.response_complete:  # pipelined behind another
            return None
        if self.limit_concurrency is not None and (len(self.connections) >= self.limit_concurrency
                                                   or len(self.tasks) >= self.limit_concurrency):
            return None
        url = httptools.parse_url(self.url)
        if url.path != PATH.encode():
            return None
        headers = dict(self.headers)
        if any(h in headers for h in _PROXY_HEADERS):  # the client address is the proxy's to say
            return None
        self.scope.update(method="POST", path=PATH, raw_path=url.path, query_string=url.query or b"")
        params = context.fast.accepts(self.scope, headers)
        return None if params is None else (context, headers, params)

    async def _serve(self, cycle: _Cycle, scope: dict[str, Any], context: Any, headers: dict[bytes, bytes],
                     params: tuple[str, int]) -> None:
        t0, status = time.perf_counter(), 500
        rid = request_id(headers)
        scope["state"]["request_id"] = rid
        scope["app"], scope["route"] = context.fast.app, context.fast.route  # metrics count it under the route
        try:
            limit = context.limit_for(PATH)
            if declared_length(headers) > limit:
                status, head, body = context.too_large(rid, limit, PATH)
                self._write(cycle, status, head, body, rid)
                return
            # the body streams to the route as it arrives: it checks the caller first and refuses an image
            # past its own limit without reading the rest, as on the ordinary path
            receive = counted(self._receiver(cycle), limit, context.settings)
            response = await context.fast.respond(scope, receive, params)
            status = response.status_code
            if cycle.more_body:  # answered before the whole body came (a refusal): the rest is not read
                cycle.keep_alive = False
            self._write(cycle, status, response.raw_headers, response.body, rid)
        except Exception:  # a bug: answer 500 as uvicorn would, never leave the client hanging
            log.exception("the fast /predict path failed")
            if not cycle.response_complete:
                cycle.keep_alive = False
                self._write(cycle, 500, [(b"content-type", b"text/plain; charset=utf-8"),
                                         (b"content-length", b"21")], b"Internal Server Error", rid)
        finally:
            if not cycle.response_complete:  # cancelled (shutdown): the connection is done
                cycle.response_complete = True
                cycle.message_event.set()
                self.transport.close()
            context.observe(scope, "POST", status, time.perf_counter() - t0, rid)

    def _receiver(self, cycle: _Cycle) -> Callable[[], Awaitable[dict[str, Any]]]:
        """An ASGI `receive` over the cycle's body, as uvicorn's: each call the bytes arrived since the
        last, or a disconnect once the client is gone (`counted` adds the limits and timeouts)."""

        async def receive() -> dict[str, Any]:
            while not cycle.body and cycle.more_body and not cycle.disconnected:
                self.flow.resume_reading()  # the protocol pauses reading past 64 KiB held
                await cycle.message_event.wait()
                cycle.message_event.clear()
            if cycle.disconnected:
                return {"type": "http.disconnect"}
            chunk, cycle.body = bytes(cycle.body), bytearray()
            return {"type": "http.request", "body": chunk, "more_body": cycle.more_body}

        return receive

    def _write(self, cycle: _Cycle, status: int, headers: list[tuple[bytes, bytes]], body: bytes, rid: str) -> None:
        """Status line, headers and body in one write; then the cycle is complete (as uvicorn's `send`)."""
        out = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers, (b"x-request-id", rid.encode())):
            if name == b"connection" and b"close" in value.lower():
                cycle.keep_alive = False
            out += [name, b": ", value, b"\r\n"]
        if not cycle.keep_alive and not any(name == b"connection" for name, _ in headers):
            out.append(b"connection: close\r\n")
        out += [b"\r\n", body]
        if not cycle.disconnected:
            self.transport.write(b"".join(out))
        cycle.response_complete = True
        cycle.message_event.set()
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()


def protocol_for(app: FastAPI) -> type[HttpToolsProtocol]:
    """uvicorn's `http` setting for `app`: its httptools protocol with the plain `/predict` fast path."""
    return type("FastHttpProtocol", (FastHttpProtocol,), {"fast_app": app})


__all__ = ["FastHttpProtocol", "protocol_for"]
