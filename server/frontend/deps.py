"""Request dependencies: the app state and the caller's tenant.

Both are `async def` on purpose: FastAPI runs a plain `def` dependency in a worker thread, two thread
hops per request that cost more CPU than the work itself (they never block).
"""
from __future__ import annotations

import functools
import ipaddress
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from server.errors import ApiError
from server.frontend.auth import DEFAULT_TENANT

if TYPE_CHECKING:  # front-end processes never load the engine's state (torch, timm)
    from server.state import AppState


async def get_state(request: Request) -> Any:
    state = getattr(request.app.state, "vpt", None)
    if state is None:
        raise ApiError(503, "not_ready", "the server is starting", headers={"Retry-After": "2"})
    return state


# the app's state: an `AppState` (one process) or a `FrontendState` (a front end), which routes use alike
State = Annotated["AppState", Depends(get_state)] if TYPE_CHECKING else Annotated[Any, Depends(get_state)]


def presented_key(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    key = request.headers.get("x-api-key")
    return key.strip() if key else None


@functools.lru_cache(maxsize=4096)  # parsing an address costs more than the rest of a keyless request's auth
def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def get_tenant(request: Request, state: State) -> str:
    """The tenant of the presented API key; `default` when keys are off (loopback callers only)."""
    if not state.keyring.enabled:
        client = request.client.host if request.client else None
        if not state.settings.allow_unauthenticated and not is_loopback(client):
            raise ApiError(403, "forbidden", "this server has no API keys and only answers loopback callers")
        request.state.tenant = DEFAULT_TENANT
        return DEFAULT_TENANT
    key = presented_key(request)
    if key is None:
        raise ApiError(401, "unauthorized", "an API key is required: 'Authorization: Bearer <key>'",
                       headers={"WWW-Authenticate": "Bearer"})
    tenant = state.keyring.tenant_for(key)
    if tenant is None:
        raise ApiError(401, "unauthorized", "unknown API key", headers={"WWW-Authenticate": "Bearer"})
    request.state.tenant = tenant
    return tenant


Tenant = Annotated[str, Depends(get_tenant)]
