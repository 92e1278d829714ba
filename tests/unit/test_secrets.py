"""nimbus.auth.secrets: sealed at rest, bound to their name, never stored in clear."""

from __future__ import annotations

import asyncio
import os

import pytest

from nimbus.auth.crypto import NodeKey
from nimbus.auth.secrets import MAX_SECRET_BYTES, MemorySecretStore, SecretRecord, Secrets
from nimbus.errors import InvalidParameterValue, ResourceNotFound


def make() -> tuple[Secrets, MemorySecretStore]:
    store = MemorySecretStore()
    return Secrets(store, NodeKey(os.urandom(32))), store


def test_set_resolve_and_the_store_holds_only_ciphertext() -> None:
    async def run() -> None:
        box, store = make()
        await box.open()
        record, created = await box.set("default", "db-password", "hunter2")
        assert created and record.created_at == record.updated_at
        assert b"hunter2" not in store.records["default", "db-password"].sealed
        assert box.resolve("default", {"DB_PASSWORD": "db-password"}) == {"DB_PASSWORD": "hunter2"}
        again, created = await box.set("default", "db-password", "correct horse")
        assert not created and again.created_at == record.created_at
        assert box.resolve("default", {"X": "db-password"}) == {"X": "correct horse"}
        # Reopened from the store, as after a restart.
        reopened = Secrets(store, box._node_key)
        await reopened.open()
        assert reopened.resolve("default", {"X": "db-password"}) == {"X": "correct horse"}

    asyncio.run(run())


def test_a_sealed_value_is_bound_to_its_tenant_and_name() -> None:
    async def run() -> None:
        box, store = make()
        await box.open()
        await box.set("default", "a", "value-of-a")
        await box.set("default", "b", "value-of-b")
        a = store.records["default", "a"]
        # Copying a's ciphertext under b's name does not make b's value readable as a.
        store.records["default", "b"] = SecretRecord("default", "b", a.sealed, 0.0, 0.0)
        swapped = Secrets(store, box._node_key)
        await swapped.open()
        with pytest.raises(Exception):  # noqa: B017 - the AEAD refuses it
            swapped.resolve("default", {"B": "b"})

    asyncio.run(run())


def test_tenants_do_not_share_secrets() -> None:
    async def run() -> None:
        box, _ = make()
        await box.open()
        await box.set("team-a", "token", "a's")
        assert box.missing("team-b", ["token"]) == ["token"]
        assert [r.name for r in box.of("team-a")] == ["token"] and box.of("team-b") == []
        with pytest.raises(ResourceNotFound):
            box.resolve("team-b", {"T": "token"})

    asyncio.run(run())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("bad name", "x"),
        ("-x", "x"),
        ("x" * 129, "x"),
        ("ok", ""),
        ("ok", "a\0b"),
        ("ok", "x" * (MAX_SECRET_BYTES + 1)),
    ],
)
def test_bad_names_and_values_are_refused(name: str, value: str) -> None:
    async def run() -> None:
        box, store = make()
        await box.open()
        with pytest.raises(InvalidParameterValue):
            await box.set("default", name, value)
        assert store.records == {}

    asyncio.run(run())
