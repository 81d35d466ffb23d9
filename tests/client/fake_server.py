"""A small real HTTP server (Starlette under uvicorn, in a thread) whose answers the tests script.

Every request is recorded (method, raw path, query, headers, body, parsed multipart, arrival time).
Answers are queued per (method, path); the last queued answer repeats.
"""
from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class Recorded:
    method: str
    path: str
    raw_path: bytes
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    at: float
    form: dict[str, str] = field(default_factory=dict)
    files: list[tuple[str, str | None, str | None, bytes]] = field(default_factory=list)  # field, name, type, data


Answer = Callable[[Recorded], Response] | Response


def reply(status: int = 200, body: Any = None, headers: dict[str, str] | None = None,
          delay: float = 0.0) -> Answer:
    def make(_: Recorded) -> Response:
        if status == 204:
            return Response(status_code=204, headers=headers)
        return JSONResponse(body, status_code=status, headers=headers)

    make.delay = delay  # type: ignore[attr-defined]
    return make


def error(status: int, code: str, message: str = "something is wrong", details: Any = None,
          headers: dict[str, str] | None = None) -> Answer:
    err: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        err["details"] = details
    return reply(status, {"error": err}, headers)


def raw(status: int, content: bytes, media_type: str, headers: dict[str, str] | None = None) -> Answer:
    return lambda _: Response(content, status_code=status, media_type=media_type, headers=headers)


def sse(events: Iterable[tuple[str, Any] | str], pause: float = 0.0) -> Answer:
    """A text/event-stream answer: (event, data) pairs (data JSON-encoded unless str) or raw text."""
    chunks = []
    for item in events:
        if isinstance(item, str):
            chunks.append(item)
        else:
            name, data = item
            text = data if isinstance(data, str) else json.dumps(data)
            chunks.append(f"event: {name}\ndata: {text}\n\n")

    async def stream() -> Any:
        for chunk in chunks:
            yield chunk.encode()
            await asyncio.sleep(pause)

    return lambda _: StreamingResponse(stream(), media_type="text/event-stream")


class FakeServer:
    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self._answers: dict[tuple[str, str], deque[Answer]] = {}
        self._lock = threading.Lock()
        self.url = ""
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None

    def on(self, method: str, path: str, *answers: Answer) -> None:
        with self._lock:
            self._answers[(method, path)] = deque(answers)

    def reset(self) -> None:
        with self._lock:
            self.requests.clear()
            self._answers.clear()

    def calls(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        return [r for r in self.requests if (method is None or r.method == method)
                and (path is None or r.path == path)]

    def _next(self, method: str, path: str) -> Answer | None:
        with self._lock:
            queue = self._answers.get((method, path))
            if not queue:
                return None
            return queue.popleft() if len(queue) > 1 else queue[0]

    async def _endpoint(self, request: Request) -> Response:
        body = await request.body()
        rec = Recorded(request.method, request.url.path, request.scope.get("raw_path", b""),
                       parse_qs(request.url.query), {k.lower(): v for k, v in request.headers.items()},
                       body, time.time())
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form(max_part_size=64 * 1024 * 1024)
            for name, value in form.multi_items():
                if isinstance(value, str):
                    rec.form[name] = value
                else:
                    rec.files.append((name, value.filename, value.content_type, await value.read()))
        with self._lock:
            self.requests.append(rec)
        answer = self._next(request.method, request.url.path)
        if answer is None:
            return JSONResponse({"error": {"code": "not_found", "message": "no scripted answer"}}, 404)
        delay = getattr(answer, "delay", 0.0)
        if delay:
            await asyncio.sleep(delay)
        return answer(rec) if callable(answer) else answer

    def start(self) -> None:
        methods = ["GET", "POST", "PUT", "DELETE", "PATCH"]
        app = Starlette(routes=[Route("/{path:path}", self._endpoint, methods=methods)])
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="fake-vpt-server", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the test HTTP server did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)


class DroppingServer:
    """Accepts TCP connections and closes them at once, counting them: a server that never answers."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.recv(65536)
            conn.close()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
