"""API keys, the node key and route scopes, as pure logic (the HTTP side is in
tests/security/test_auth.py)."""

from __future__ import annotations

import asyncio
import os
import stat
from pathlib import Path

import pytest
from fastapi import APIRouter, FastAPI

from nimbus.api.scopes import check_routes, needs, route_scopes
from nimbus.auth import ADMIN_ID, KeyRing, allows
from nimbus.auth.crypto import NodeKey, load_node_key
from nimbus.auth.keys import MemoryKeyStore
from nimbus.errors import InvalidParameterValue, ResourceNotFound, ServiceException


def ring() -> KeyRing:
    keys = KeyRing(MemoryKeyStore(), NodeKey(os.urandom(32)))
    asyncio.run(keys.open())
    return keys


@pytest.mark.parametrize(
    ("held", "needed", "allowed"),
    [
        ({"admin"}, "deploy", True),
        ({"admin"}, "invoke", True),
        ({"deploy"}, "read", True),
        ({"deploy"}, "invoke", False),
        ({"deploy"}, "admin", False),
        ({"invoke"}, "read", False),
        ({"invoke"}, "invoke", True),
        ({"read"}, "deploy", False),
        ({"read", "invoke"}, "read", True),
    ],
)
def test_scope_lattice(held: set[str], needed: str, allowed: bool) -> None:
    assert allows(frozenset(held), needed) is allowed  # type: ignore[arg-type]


def test_a_created_key_is_found_by_its_secret_until_revoked() -> None:
    keys = ring()
    record, secret = asyncio.run(keys.create("ci", ["deploy", "deploy"]))
    assert record.scopes == ("deploy",)
    assert secret not in repr(record.view()) and "digest" not in record.view()
    principal = keys.by_secret(secret)
    assert principal is not None and principal.key_id == record.key_id
    assert keys.by_secret(secret + "x") is None
    assert keys.signing_secret(record.key_id) == (principal, secret)

    asyncio.run(keys.revoke(record.key_id))
    assert keys.by_secret(secret) is None
    assert keys.signing_secret(record.key_id) is None
    assert [r.key_id for r in keys.all()] == [record.key_id]  # revoked keys stay listed


@pytest.mark.parametrize("scopes", [[], ["root"], ["read", "everything"]])
def test_unknown_scopes_are_refused(scopes: list[str]) -> None:
    with pytest.raises(InvalidParameterValue, match="scopes must be some of"):
        asyncio.run(ring().create("x", scopes))


def test_revoking_needs_a_key_and_never_takes_the_admin_key() -> None:
    keys = ring()
    with pytest.raises(ResourceNotFound):
        asyncio.run(keys.revoke("NIMBNOPE"))
    asyncio.run(keys.bootstrap_admin("a" * 32))
    with pytest.raises(InvalidParameterValue, match="NIMBUS_ADMIN_KEY"):
        asyncio.run(keys.revoke(ADMIN_ID))


def test_a_new_admin_key_replaces_the_old_one() -> None:
    store = MemoryKeyStore()
    node_key = NodeKey(os.urandom(32))
    keys = KeyRing(store, node_key)
    asyncio.run(keys.open())
    asyncio.run(keys.bootstrap_admin("first-admin-key-0123"))
    asyncio.run(keys.bootstrap_admin("second-admin-key-0123"))
    assert keys.by_secret("first-admin-key-0123") is None
    admin = keys.by_secret("second-admin-key-0123")
    assert admin is not None and admin.key_id == ADMIN_ID and admin.may("admin")

    reopened = KeyRing(store, node_key)  # what a restart sees
    asyncio.run(reopened.open())
    assert reopened.by_secret("second-admin-key-0123") == admin
    assert reopened.signing_secret(ADMIN_ID) == (admin, "second-admin-key-0123")


def test_sealed_values_open_only_with_their_key_and_purpose() -> None:
    key = NodeKey(os.urandom(32))
    blob = key.seal(b"secret", "api-key")
    assert b"secret" not in blob
    assert key.seal(b"secret", "api-key") != blob  # a fresh nonce each time
    assert key.unseal(blob, "api-key") == b"secret"
    for wrong in (
        lambda: key.unseal(blob, "function-secret"),
        lambda: NodeKey(os.urandom(32)).unseal(blob, "api-key"),
        lambda: key.unseal(blob[:-1] + bytes([blob[-1] ^ 1]), "api-key"),
        lambda: key.unseal(b"\x02" + blob[1:], "api-key"),
        lambda: key.unseal(blob[:10], "api-key"),
    ):
        with pytest.raises(ServiceException):
            wrong()


def test_the_node_key_is_made_once_private_and_a_damaged_one_is_named(tmp_path: Path) -> None:
    path = tmp_path / "data" / "node.key"
    first = load_node_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    blob = first.seal(b"x", "p")
    assert load_node_key(path).unseal(blob, "p") == b"x"  # the same key the second time
    assert [p.name for p in path.parent.iterdir()] == ["node.key"]

    path.write_bytes(b"short")
    with pytest.raises(ServiceException, match="damaged"):
        load_node_key(path)


def test_a_route_without_a_scope_stops_the_app_even_in_an_included_router() -> None:
    app = FastAPI()
    app.get("/healthz")(lambda: {})
    app.get("/v1/things", dependencies=[needs("read")])(lambda: [])
    router = APIRouter()
    router.post("/v1/things/{name}/forgotten")(lambda name: name)
    app.include_router(router)

    assert route_scopes(app) == {
        ("GET", "/healthz"): (),
        ("GET", "/v1/things"): ("read",),
        ("POST", "/v1/things/{name}/forgotten"): (),
    }
    with pytest.raises(RuntimeError, match=r"POST /v1/things/\{name\}/forgotten"):
        check_routes(app)
