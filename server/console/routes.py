"""`/console`: the single-page console and its static files, under a strict Content-Security-Policy.

Everything the console shows comes from the JSON routes with the API key the person typed (kept in
the tab's sessionStorage); these routes serve only files shipped in the package, to anyone.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import Response

from server.errors import ApiError

router = APIRouter(tags=["console"])
PAGE = {200: {"description": "a file of the console", "content": {"text/html": {"schema": {"type": "string"}}}}}

STATIC = (Path(__file__).parent / "static").resolve()
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cache-Control": "no-cache"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def _file(rel: str) -> Response:
    path = (STATIC / rel).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file() or path.suffix not in TYPES:
        raise ApiError(404, "not_found", f"the console has no file {rel[:80]!r}")
    return Response(path.read_bytes(), media_type=TYPES[path.suffix], headers=HEADERS)


@router.get("/console", response_class=Response, responses=PAGE)
@router.get("/console/", response_class=Response, include_in_schema=False)
def console_page() -> Response:
    """The console's page; its views live in the URL fragment (`#/tasks`, `#/task/<id>`, ...)."""
    return _file("index.html")


@router.get("/console/static/{rel:path}", response_class=Response, responses={**PAGE, 404: {"description": "not_found"}})
def console_static(rel: str) -> Response:
    return _file(rel)
