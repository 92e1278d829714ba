"""Secrets: values a function needs that nobody should read back.

``nimbus secrets set db-password`` stores a value sealed with the node key
(AES-256-GCM, :mod:`.crypto`, purpose ``function-secret``) in ``secrets.db``; a
function names the secrets it needs in its spec (``secrets: {DB_PASSWORD:
db-password}``) and each of its instances gets the value as that environment
variable when it starts. No route returns a value: the API lists names and times
only. A secret a function's current version uses cannot be removed (409).

:class:`Secrets` keeps every record (sealed) in memory, so resolving a function's
secrets when an instance starts is a dict lookup and one decryption each.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from nimbus.auth.crypto import NodeKey
from nimbus.errors import InvalidParameterValue, ResourceNotFound
from nimbus.store.sqlitefile import SqliteFile

__all__ = [
    "MAX_SECRET_BYTES",
    "SECRET_NAME_RE",
    "MemorySecretStore",
    "SecretRecord",
    "SecretStore",
    "Secrets",
    "SqliteSecretStore",
    "check_secret_name",
]

#: ``db-password``, ``stripe.api_key``, ``TOKEN_2``: what Secrets Manager names allow,
#: less ``/+=@`` (kept out of URLs and shells).
SECRET_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: A value's size limit: far above any password or key, well below what an
#: environment can carry (the kernel takes 128 KiB per variable).
MAX_SECRET_BYTES = 32 * 1024
_PURPOSE = "function-secret"


def check_secret_name(name: str) -> str:
    if not SECRET_NAME_RE.fullmatch(name):
        raise InvalidParameterValue(
            f"{name[:140]!r} is not a secret name: letters, digits, '.', '_' and '-', "
            "starting with a letter or digit, at most 128 characters"
        )
    return name


@dataclass(frozen=True, slots=True)
class SecretRecord:
    tenant: str
    name: str
    sealed: bytes
    created_at: float
    updated_at: float

    def public(self) -> dict[str, object]:
        """What the API shows: never the value."""
        return {"name": self.name, "created_at": self.created_at, "updated_at": self.updated_at}


class SecretStore(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def load(self) -> list[SecretRecord]: ...
    async def put(self, record: SecretRecord) -> None: ...
    async def delete(self, tenant: str, name: str) -> None: ...


class Secrets:
    """The node's secrets, sealed, indexed by ``(tenant, name)``."""

    def __init__(self, store: SecretStore, node_key: NodeKey) -> None:
        self._store = store
        self._node_key = node_key
        self._records: dict[tuple[str, str], SecretRecord] = {}

    async def open(self) -> None:
        await self._store.open()
        self._records = {(r.tenant, r.name): r for r in await self._store.load()}

    async def close(self) -> None:
        await self._store.close()

    def of(self, tenant: str) -> list[SecretRecord]:
        return sorted((r for (t, _), r in self._records.items() if t == tenant), key=_name)

    def get(self, tenant: str, name: str) -> SecretRecord:
        record = self._records.get((tenant, name))
        if record is None:
            raise ResourceNotFound(
                f"no secret named {name!r}; create it with 'nimbus secrets set {name}'"
            )
        return record

    def missing(self, tenant: str, names: Iterable[str]) -> list[str]:
        """Those of ``names`` that are not secrets of ``tenant``."""
        return sorted({n for n in names if (tenant, n) not in self._records})

    async def set(self, tenant: str, name: str, value: str) -> tuple[SecretRecord, bool]:
        """Store ``value`` as ``name``; ``(record, created)``."""
        check_secret_name(name)
        raw = value.encode()
        if not raw:
            raise InvalidParameterValue("a secret's value cannot be empty")
        if len(raw) > MAX_SECRET_BYTES:
            raise InvalidParameterValue(
                f"the value is {len(raw)} bytes; a secret holds at most {MAX_SECRET_BYTES}"
            )
        if "\0" in value:
            raise InvalidParameterValue("a secret's value cannot contain NUL characters")
        now = time.time()
        before = self._records.get((tenant, name))
        record = SecretRecord(
            tenant,
            name,
            self._node_key.seal(raw, f"{_PURPOSE}:{tenant}:{name}"),
            before.created_at if before is not None else now,
            now,
        )
        await self._store.put(record)
        self._records[tenant, name] = record
        return record, before is None

    async def delete(self, tenant: str, name: str) -> None:
        self.get(tenant, name)
        await self._store.delete(tenant, name)
        self._records.pop((tenant, name), None)

    def resolve(self, tenant: str, wanted: Mapping[str, str]) -> dict[str, str]:
        """``{VARIABLE: secret name}`` → ``{VARIABLE: value}``; ResourceNotFound names the
        first secret that does not exist."""
        out: dict[str, str] = {}
        for variable, name in wanted.items():
            record = self.get(tenant, name)
            out[variable] = self._node_key.unseal(
                record.sealed, f"{_PURPOSE}:{tenant}:{name}"
            ).decode()
        return out


def _name(record: SecretRecord) -> str:
    return record.name


class MemorySecretStore:
    """A :class:`SecretStore` in a dict (unit tests)."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], SecretRecord] = {}

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def load(self) -> list[SecretRecord]:
        return list(self.records.values())

    async def put(self, record: SecretRecord) -> None:
        self.records[record.tenant, record.name] = record

    async def delete(self, tenant: str, name: str) -> None:
        self.records.pop((tenant, name), None)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS secrets (
    tenant     TEXT NOT NULL,
    name       TEXT NOT NULL,
    sealed     BLOB NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (tenant, name)
);
"""


class SqliteSecretStore:
    """Secrets in ``secrets.db``, sealed (WAL, synchronous=FULL), one worker thread."""

    def __init__(self, path: Path) -> None:
        self._file = SqliteFile(path, _SCHEMA, thread_name="nimbus-secrets")

    async def open(self) -> None:
        await self._file.open()

    async def close(self) -> None:
        await self._file.close()

    async def load(self) -> list[SecretRecord]:
        def q(db: sqlite3.Connection) -> list[SecretRecord]:
            rows = db.execute(
                "SELECT tenant, name, sealed, created_at, updated_at FROM secrets"
            ).fetchall()
            return [SecretRecord(r[0], r[1], bytes(r[2]), r[3], r[4]) for r in rows]

        return await self._file.run(q)

    async def put(self, record: SecretRecord) -> None:
        def w(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT OR REPLACE INTO secrets (tenant, name, sealed, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?)",
                (record.tenant, record.name, record.sealed, record.created_at, record.updated_at),
            )

        await self._file.run(w)

    async def delete(self, tenant: str, name: str) -> None:
        def w(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM secrets WHERE tenant = ? AND name = ?", (tenant, name))

        await self._file.run(w)
