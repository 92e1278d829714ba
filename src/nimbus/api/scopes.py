"""What each control-plane route needs: a scope, declared on the route, checked at the edge.

The edge (``Nimbus.__call__``) has already turned away a request without a valid key
(``401``) and put its principal in the ASGI scope; :func:`needs` is the route's
dependency that checks the key's scopes (``403``). :func:`check_routes` runs when the
app is built: a route without a scope is a startup error, so none can be forgotten.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.routing import iter_route_contexts

from nimbus.auth import Principal, Scope
from nimbus.auth.edge import PRINCIPAL
from nimbus.errors import AccessDenied, Unauthorized

__all__ = ["PRINCIPAL", "PUBLIC", "REDACTED", "check_routes", "may_deploy", "needs", "route_scopes"]

#: What a reader without the deploy scope sees for each environment value.
REDACTED = "(redacted)"

#: Routes anyone may call.
PUBLIC = frozenset({"/healthz"})


def needs(*scopes: Scope) -> Any:
    """A route dependency: the request's principal, if one of ``scopes`` allows it."""

    def check(request: Request) -> Principal:
        principal = request.scope.get(PRINCIPAL)
        if not isinstance(principal, Principal):
            raise Unauthorized("this needs an API key: send 'Authorization: Bearer <key>'")
        if not any(principal.may(s) for s in scopes):
            raise AccessDenied(
                f"the key {principal.key_id} ({', '.join(sorted(principal.scopes))}) may not "
                f"do this: it needs the {' or '.join(scopes)} scope"
            )
        return principal

    check.nimbus_scopes = scopes  # type: ignore[attr-defined]
    return Depends(check)


def may_deploy(request: Request) -> bool:
    """Whether the request's key may see what deployers see (environment values)."""
    principal = request.scope.get(PRINCIPAL)
    return isinstance(principal, Principal) and principal.may("deploy")


def route_scopes(app: FastAPI) -> dict[tuple[str, str], tuple[str, ...]]:
    """``(method, path) -> scopes`` for every route of ``app`` (``()`` when public)."""
    found: dict[tuple[str, str], tuple[str, ...]] = {}
    # iter_route_contexts flattens included routers, as the OpenAPI schema does
    for route in iter_route_contexts(app.routes):
        dependant = getattr(route, "dependant", None)
        if dependant is None:
            continue
        scopes: tuple[str, ...] = ()
        for dependency in dependant.dependencies:
            scopes = getattr(dependency.call, "nimbus_scopes", scopes)
        path = route.path
        if path is None:
            continue
        for method in route.methods or ():
            found[method, path] = scopes
    return found


def check_routes(app: FastAPI) -> None:
    """Every route but :data:`PUBLIC` declares its scope, or the app does not start."""
    bare = [
        f"{method} {path}"
        for (method, path), scopes in route_scopes(app).items()
        if not scopes and path not in PUBLIC
    ]
    if bare:
        raise RuntimeError(f"routes without a scope: {', '.join(sorted(bare))}")
