"""API keys: issued by Nimbus, kept hashed and sealed, checked on every request.

A key is an *access key id* (public: ``NIMB…``, or ``admin`` for the bootstrap key)
and a *secret*. HTTP clients send the secret, ``Authorization: Bearer <secret>``;
AWS clients sign requests with the id and the secret (SigV4, :mod:`.sigv4`). The
store keeps the secret's sha256 (what a bearer token is checked against, in constant
time) and the secret itself sealed with the node key (SigV4 needs the secret to
recompute a signature; it never leaves the node). Revoked keys stay listed.

Scopes: ``admin`` (everything, keys included), ``deploy`` (functions and triggers,
and what ``read`` allows), ``invoke`` (run functions, read their async invocations),
``read`` (list, describe, logs, metrics). Each key belongs to a tenant (``default``
until tenants exist).

:class:`KeyRing` is the in-memory index the edge uses (one dict lookup per request);
:class:`KeyStore` is where keys are kept: :class:`SqliteKeyStore` (``keys.db``), and
:class:`MemoryKeyStore`, the fake.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import sqlite3
import string
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol, TypeVar, get_args

from nimbus.auth.crypto import NodeKey
from nimbus.errors import InvalidParameterValue, ResourceNotFound
from nimbus.store.sqlitefile import SqliteFile

__all__ = [
    "ADMIN_ID",
    "SCOPES",
    "KeyRecord",
    "KeyRing",
    "KeyStore",
    "MemoryKeyStore",
    "Principal",
    "Scope",
    "SqliteKeyStore",
    "allows",
]

Scope = Literal["admin", "deploy", "invoke", "read"]
SCOPES: tuple[Scope, ...] = get_args(Scope)
#: The bootstrap key's access key id (SigV4 clients sign with it and the admin key).
ADMIN_ID = "admin"
DEFAULT_TENANT = "default"
_PURPOSE = "api-key"
_ID_ALPHABET = string.ascii_uppercase + string.digits
T = TypeVar("T")


def allows(scopes: frozenset[str], needed: Scope) -> bool:
    """Whether a key with ``scopes`` may do what needs ``needed``."""
    if "admin" in scopes or needed in scopes:
        return True
    return needed == "read" and "deploy" in scopes


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request is: the key it came with."""

    key_id: str
    tenant: str
    scopes: frozenset[str]
    name: str = ""

    def may(self, needed: Scope) -> bool:
        return allows(self.scopes, needed)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as stored: ``digest`` is the secret's sha256, ``sealed`` the secret sealed
    with the node key."""

    key_id: str
    name: str
    tenant: str
    scopes: tuple[str, ...]
    digest: str
    sealed: bytes
    created_at: float
    revoked_at: float | None = None

    @property
    def principal(self) -> Principal:
        return Principal(self.key_id, self.tenant, frozenset(self.scopes), self.name)

    def view(self) -> dict[str, object]:
        """The key as the API shows it: never its secret."""
        return {
            "id": self.key_id,
            "name": self.name,
            "tenant": self.tenant,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
            "revoked_at": self.revoked_at,
        }


class KeyStore(Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def load(self) -> list[KeyRecord]:
        """Every key, revoked ones included."""
        ...

    async def put(self, record: KeyRecord) -> None:
        """Insert or replace a key, durably before returning."""
        ...


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class KeyRing:
    """The node's keys, indexed for the edge."""

    def __init__(self, store: KeyStore, node_key: NodeKey) -> None:
        self._store = store
        self._node_key = node_key
        self._records: dict[str, KeyRecord] = {}
        self._by_digest: dict[str, Principal] = {}

    async def open(self) -> None:
        await self._store.open()
        for record in await self._store.load():
            self._index(record)

    async def close(self) -> None:
        await self._store.close()

    def _index(self, record: KeyRecord) -> None:
        old = self._records.get(record.key_id)
        if old is not None:
            self._by_digest.pop(old.digest, None)
        self._records[record.key_id] = record
        if record.revoked_at is None:
            self._by_digest[record.digest] = record.principal

    # -- the edge ----------------------------------------------------------------------
    def by_secret(self, secret: str) -> Principal | None:
        """The principal of a bearer token, or None (unknown or revoked)."""
        return self._by_digest.get(digest(secret))

    def signing_secret(self, key_id: str) -> tuple[Principal, str] | None:
        """A live key's principal and secret, for checking a SigV4 signature."""
        record = self._records.get(key_id)
        if record is None or record.revoked_at is not None:
            return None
        secret = self._node_key.unseal(record.sealed, _PURPOSE).decode()
        return record.principal, secret

    # -- management ----------------------------------------------------------------------
    async def bootstrap_admin(self, secret: str) -> None:
        """The admin key (id ``admin``) is ``secret``; replaced when it changed."""
        current = self._records.get(ADMIN_ID)
        if (
            current is not None
            and current.revoked_at is None
            and hmac.compare_digest(current.digest, digest(secret))
        ):
            return
        await self._save(
            KeyRecord(
                ADMIN_ID,
                "bootstrap admin key",
                DEFAULT_TENANT,
                ("admin",),
                digest(secret),
                self._node_key.seal(secret.encode(), _PURPOSE),
                time.time(),
            )
        )

    async def create(
        self, name: str, scopes: list[str], tenant: str = DEFAULT_TENANT
    ) -> tuple[KeyRecord, str]:
        """A new key: its record and its secret (shown once, never again)."""
        unknown = [s for s in scopes if s not in SCOPES]
        if not scopes or unknown:
            raise InvalidParameterValue(
                f"scopes must be some of {', '.join(SCOPES)} (got {', '.join(scopes) or 'none'})"
            )
        if len(name) > 100:
            raise InvalidParameterValue("a key's name is at most 100 characters")
        key_id = "NIMB" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(16))
        secret = "nmb_" + secrets.token_urlsafe(32)
        record = KeyRecord(
            key_id,
            name,
            tenant,
            tuple(dict.fromkeys(scopes)),
            digest(secret),
            self._node_key.seal(secret.encode(), _PURPOSE),
            time.time(),
        )
        await self._save(record)
        return record, secret

    async def revoke(self, key_id: str) -> KeyRecord:
        record = self._records.get(key_id)
        if record is None:
            raise ResourceNotFound(f"no key {key_id!r}")
        if key_id == ADMIN_ID:
            raise InvalidParameterValue(
                "the bootstrap admin key is not revoked: set another NIMBUS_ADMIN_KEY (or "
                "--admin-key-file) and restart to replace it"
            )
        if record.revoked_at is None:
            record = replace(record, revoked_at=time.time())
            await self._save(record)
        return record

    def all(self, tenant: str | None = None) -> list[KeyRecord]:
        return sorted(
            (r for r in self._records.values() if tenant is None or r.tenant == tenant),
            key=lambda r: r.created_at,
        )

    async def _save(self, record: KeyRecord) -> None:
        await self._store.put(record)
        self._index(record)


class MemoryKeyStore:
    """A :class:`KeyStore` in a dict (unit tests)."""

    def __init__(self) -> None:
        self.records: dict[str, KeyRecord] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def load(self) -> list[KeyRecord]:
        return list(self.records.values())

    async def put(self, record: KeyRecord) -> None:
        self.records[record.key_id] = record


_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    tenant     TEXT NOT NULL,
    scopes     TEXT NOT NULL,
    digest     TEXT NOT NULL,
    sealed     BLOB NOT NULL,
    created_at REAL NOT NULL,
    revoked_at REAL
);
"""


class SqliteKeyStore:
    """Keys in ``keys.db`` (WAL, synchronous=FULL), one worker thread."""

    def __init__(self, path: Path) -> None:
        self._file = SqliteFile(path, _SCHEMA, thread_name="nimbus-keys")

    async def open(self) -> None:
        await self._file.open()

    async def close(self) -> None:
        await self._file.close()

    async def load(self) -> list[KeyRecord]:
        def q(db: sqlite3.Connection) -> list[KeyRecord]:
            rows = db.execute(
                "SELECT id, name, tenant, scopes, digest, sealed, created_at, revoked_at FROM keys"
            ).fetchall()
            return [
                KeyRecord(r[0], r[1], r[2], tuple(r[3].split(",")), r[4], bytes(r[5]), r[6], r[7])
                for r in rows
            ]

        return await self._file.run(q)

    async def put(self, record: KeyRecord) -> None:
        def w(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO keys (id, name, tenant, scopes, digest, sealed,"
                " created_at, revoked_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    record.key_id,
                    record.name,
                    record.tenant,
                    ",".join(record.scopes),
                    record.digest,
                    record.sealed,
                    record.created_at,
                    record.revoked_at,
                ),
            )

        await self._file.run(w)
