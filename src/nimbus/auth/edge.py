"""The edge's authentication and authorisation: one check per request, before any route.

:meth:`Edge.principal` reads ``Authorization: Bearer <key>`` (the CLI and HTTP
clients); :meth:`Edge.require` raises ``401 Unauthorized`` (no key, or not a live
one) or ``403 AccessDenied`` (its scopes do not cover what the route needs). The
control plane's routes each declare their scope (:func:`scoped`); the gateway
checks a function's ``auth: key`` itself. With authentication off
(``--insecure-no-auth``, loopback only) every request is the admin.
"""

from __future__ import annotations

from collections.abc import Iterable

from nimbus.auth.keys import ADMIN_ID, DEFAULT_TENANT, KeyRing, Principal, Scope
from nimbus.errors import AccessDenied, Unauthorized

__all__ = ["ANONYMOUS_ADMIN", "PRINCIPAL", "Edge", "require_scope"]

#: Where the edge puts a request's principal in its ASGI scope.
PRINCIPAL = "nimbus.principal"

#: Who every request is when authentication is off.
ANONYMOUS_ADMIN = Principal(ADMIN_ID, DEFAULT_TENANT, frozenset({"admin"}), "authentication off")


def require_scope(scope: dict[str, object] | object, needed: Scope) -> Principal:
    """The principal the edge put in an ASGI ``scope``, if it may do ``needed``."""
    principal = scope.get(PRINCIPAL) if isinstance(scope, dict) else None
    if not isinstance(principal, Principal):
        raise Unauthorized("this needs an API key: send 'Authorization: Bearer <key>'")
    if not principal.may(needed):
        raise AccessDenied(
            f"the key {principal.key_id} ({', '.join(sorted(principal.scopes))}) may not "
            f"do this: it needs the {needed} scope"
        )
    return principal


class Edge:
    def __init__(self, keys: KeyRing | None) -> None:
        """``keys`` None: authentication is off."""
        self.keys = keys

    @property
    def enabled(self) -> bool:
        return self.keys is not None

    def principal(self, headers: Iterable[tuple[bytes, bytes]]) -> Principal | None:
        """Who sent a request with these (ASGI) headers; None without a valid key."""
        if self.keys is None:
            return ANONYMOUS_ADMIN
        for name, value in headers:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").strip().partition(" ")
                if scheme.lower() == "bearer" and token.strip():
                    return self.keys.by_secret(token.strip())
                return None
        return None

    def require(self, headers: Iterable[tuple[bytes, bytes]], needed: Scope) -> Principal:
        """The request's principal if it may do what needs ``needed``; else
        :class:`Unauthorized` or :class:`AccessDenied`."""
        principal = self.principal(headers)
        if principal is None:
            raise Unauthorized(
                "this needs an API key: send 'Authorization: Bearer <key>' (the CLI reads "
                "NIMBUS_API_KEY); the admin key is in the data dir's admin.key"
            )
        if not principal.may(needed):
            raise AccessDenied(
                f"the key {principal.key_id} ({', '.join(sorted(principal.scopes))}) may not "
                f"do this: it needs the {needed} scope"
            )
        return principal
