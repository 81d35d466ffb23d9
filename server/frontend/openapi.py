"""The served OpenAPI document: every error a route can answer, in the shape it really has.

FastAPI documents a route's success and FastAPI's own 422 (`{"detail": ...}`, which this server never
sends). Here each operation gets the statuses it can produce: some follow from what the route depends
on (auth, the app state, a request body, parameters), the rest it declares in its decorator. House
routes answer `{"error": {"code", "message", ...}}`; the Open Inference Protocol routes under `/v2`
answer `{"error": "<message>"}`. HEAD, accepted on every GET route, is described once, in the
document's description, rather than as a copy of each GET operation.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.dependencies.models import Dependant
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field

from server.errors import is_oip_path
from server.frontend.deps import get_state, get_tenant
from server.frontend.schemas import ErrorOut

# Why each status is answered; the `code` values are those of docs/api.md's error table.
STATUS_TEXT = {
    400: "Bad input: `bad_request`, `invalid_parameter`, `invalid_task_id`, `invalid_job_id`, `image_invalid`, "
         "`dataset_*`",
    401: "`unauthorized`: no API key, or an unknown one (`WWW-Authenticate: Bearer`)",
    403: "`forbidden`: API keys are off and the caller is not on loopback (/metrics too, when "
         "`VPT_METRICS_TOKEN` is not set)",
    404: "`task_not_found`, `version_not_found`, `job_not_found`, `not_found` (no such task, version, job or "
         "file for this tenant)",
    405: "`method_not_allowed`: the path exists, the method does not (`Allow` lists those that do)",
    408: "`request_timeout`: the request body arrived too slowly",
    409: "`conflict`, `training_in_progress`, `job_finished`",
    413: "`payload_too_large`: the body, an image or an upload is over its limit",
    415: "`unsupported_media_type`: a content type (or content encoding) this route does not take",
    422: "`validation_error` (a parameter has the wrong type or range), `task_file_invalid`, `task_too_large`, "
         "`backbone_mismatch`",
    429: "`too_many_jobs`, `too_much_pending_data`: the tenant's training quota is in use",
    500: "`internal_error`: a fault of the server (logged with the request id), never bad input",
    503: "`busy`, `store_unavailable`, `engine_unavailable`, `not_ready` (with `Retry-After`)",
    504: "`timeout`: no answer within `VPT_REQUEST_TIMEOUT_S`",
    507: "`insufficient_storage`: the server's disk is full; nothing was stored (with `Retry-After`)",
}
# What `prompt_store.ids.validate_id` accepts, as a JSON-schema pattern (no look-ahead): 1-64 of
# A-Z a-z 0-9 . _ -, but neither "." nor "..". Anything else is answered 400 `invalid_*_id`.
ID_PATTERN = r"^([A-Za-z0-9_-][A-Za-z0-9._-]{0,63}|\.[A-Za-z0-9_-][A-Za-z0-9._-]{0,62}|\.\.[A-Za-z0-9._-]{1,62})$"
ID_PARAMS = {"task_id", "job_id", "task"}
OIP_VERSION_PATTERN = r"^[1-9][0-9]{0,17}$"  # a model version of the protocol's routes (a string there)
OIP_TEXT = "the Open Inference Protocol's error object, `{\"error\": \"<message>\"}`"


class OipErrorOut(BaseModel):
    """An Open Inference Protocol error (KServe v2): the message is a plain string."""
    error: str = Field(examples=["model 'flowers' has no version 7"])


def _uses(dependant: Dependant, call: Any) -> bool:
    return any(d.call is call or _uses(d, call) for d in dependant.dependencies)


def implied_statuses(route: APIRoute) -> set[int]:
    """The statuses a route can answer because of what it depends on (its decorator adds the rest)."""
    statuses = {413, 500}                       # any declared body past the route's limit; any fault of ours
    if _uses(route.dependant, get_state):
        statuses.add(503)                       # starting, store or engine unreachable
    if _uses(route.dependant, get_tenant):
        statuses |= {401, 403}
    params = route.dependant.path_params + route.dependant.query_params
    if any(p.name in ("task_id", "job_id", "task") for p in route.dependant.path_params):
        statuses |= {400, 404}                  # an invalid id; an unknown one
    if params:
        statuses.add(422)
    if route.body_field is not None or "requestBody" in (route.openapi_extra or {}):
        statuses.add(408)
    return statuses


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """A decorator's `responses` for the errors a route answers beyond those `implied_statuses` finds."""
    return {status: {"description": STATUS_TEXT[status]} for status in statuses}


def _error_response(status: int, path: str) -> dict[str, Any]:
    oip = is_oip_path(path)
    ref = "#/components/schemas/" + ("OipErrorOut" if oip else "ErrorOut")
    text = STATUS_TEXT.get(status, "an error")
    out: dict[str, Any] = {"description": f"{OIP_TEXT}; {text}" if oip else text,
                           "content": {"application/json": {"schema": {"$ref": ref}}}}
    if status in (429, 503, 507):
        out["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                          "schema": {"type": "integer"}}}
    if status == 401:
        out["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
    return out


def _document_errors(operation: dict[str, Any], path: str, statuses: set[int]) -> None:
    responses = operation.setdefault("responses", {})
    declared = {int(s) for s in responses if s.isdigit() and int(s) >= 400}
    for status in sorted(declared | statuses):
        responses[str(status)] = _error_response(status, path)
    operation["responses"] = dict(sorted(responses.items()))


def _describe_ids(operation: dict[str, Any], path: str) -> None:
    """Id parameters carry the pattern the server checks, so a client (or a generator) can know it."""
    for param in operation.get("parameters", []):
        name, schema = param.get("name"), param.get("schema", {})
        if name in ID_PARAMS:
            target = next((s for s in schema.get("anyOf", []) if s.get("type") == "string"), schema)
            target["pattern"] = ID_PATTERN
        elif name == "version" and is_oip_path(path) and schema.get("type") == "string":
            schema["pattern"] = OIP_VERSION_PATTERN


def build_schema(app: FastAPI, routers: Sequence[APIRouter]) -> dict[str, Any]:
    """FastAPI's document with every operation's errors as they are answered, FastAPI's 422 models gone.
    `routers`: those the app includes (without a prefix), whose routes say what they depend on."""
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for route in (r for router in routers for r in router.routes):
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        implied = implied_statuses(route)
        for method in route.methods:
            operation = schema["paths"].get(route.path_format, {}).get(method.lower())
            if operation is not None:
                _document_errors(operation, route.path_format, implied)
                _describe_ids(operation, route.path_format)
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    for model in (ErrorOut, OipErrorOut):
        _add_model(components, model)
    return schema


def _add_model(components: dict[str, Any], model: type[BaseModel]) -> None:
    body = model.model_json_schema(ref_template="#/components/schemas/{model}")
    components.update(body.pop("$defs", {}))
    components.setdefault(model.__name__, body)


def install_openapi(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """Serve `build_schema`'s document at /openapi.json (built once, on first request)."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_schema(app, routers)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
