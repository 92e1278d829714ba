"""The embedded store: one SQLite database in WAL mode, on one worker thread.

All SQLite calls run on a single dedicated thread (so the event loop never
blocks on disk), in short transactions. Nothing on the invoke path reads the
store: the control plane keeps the current versions in memory.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import orjson

from nimbus.errors import ResourceConflict, ResourceNotFound
from nimbus.models import FunctionRecord, FunctionSpec, TriggerState, Version

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS functions (
    name        TEXT PRIMARY KEY,
    created_at  REAL NOT NULL,
    latest      INTEGER NOT NULL,
    uid         INTEGER NOT NULL UNIQUE
);
-- The next sandbox uid to hand out: uids are never reused, even after a delete.
CREATE TABLE IF NOT EXISTS uids (next INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    name         TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    number       INTEGER NOT NULL,
    spec         TEXT NOT NULL,
    code_sha256  TEXT NOT NULL,
    layer_sha256 TEXT,
    created_at   REAL NOT NULL,
    PRIMARY KEY (name, number)
);
-- Schedule triggers' last fire times, so a restart neither double-fires nor drops a run.
CREATE TABLE IF NOT EXISTS trigger_state (
    function     TEXT NOT NULL REFERENCES functions(name) ON DELETE CASCADE,
    name         TEXT NOT NULL,
    created_at   REAL NOT NULL,
    last_fire    REAL,
    fingerprint  TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (function, name)
);
"""


class SqliteStore:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nimbus-store")

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._db is not None, "store is not open"
            return fn(self._db)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(SCHEMA)
            return db

        self._db = await asyncio.get_running_loop().run_in_executor(self._pool, connect)

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._pool, db.close)
        self._pool.shutdown(wait=True)

    async def load(self) -> list[FunctionRecord]:
        def q(db: sqlite3.Connection) -> list[FunctionRecord]:
            rows = db.execute(
                "SELECT f.name, f.created_at, v.number, v.spec, v.code_sha256, v.layer_sha256,"
                " v.created_at, f.uid FROM functions f JOIN versions v"
                " ON v.name = f.name AND v.number = f.latest ORDER BY f.name"
            ).fetchall()
            return [FunctionRecord(r[0], r[1], _version(r[2:])) for r in rows]

        return await self._run(q)

    async def publish(
        self,
        spec: FunctionSpec,
        code_sha256: str,
        layer_sha256: str | None,
        *,
        create: bool,
        uid: int | None = None,
    ) -> FunctionRecord:
        now = time.time()
        given_uid = uid
        spec_json = orjson.dumps(spec.model_dump(mode="json")).decode()

        def tx(db: sqlite3.Connection) -> FunctionRecord:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute(
                    "SELECT created_at, latest, uid FROM functions WHERE name = ?", (spec.name,)
                ).fetchone()
                if create and row is not None:
                    raise ResourceConflict(
                        f"function {spec.name!r} already exists; update it with "
                        f"PUT /v1/functions/{spec.name} (or `nimbus deploy`)"
                    )
                if not create and row is None:
                    raise ResourceNotFound(f"function {spec.name!r} does not exist")
                if row is None:
                    created_at, number = now, 1
                    uid = given_uid if given_uid is not None else _next_uid(db)
                    db.execute(
                        "INSERT INTO functions (name, created_at, latest, uid) VALUES (?, ?, ?, ?)",
                        (spec.name, now, number, uid),
                    )
                else:
                    created_at, number, uid = row[0], row[1] + 1, row[2]
                    db.execute(
                        "UPDATE functions SET latest = ? WHERE name = ?", (number, spec.name)
                    )
                db.execute(
                    "INSERT INTO versions"
                    " (name, number, spec, code_sha256, layer_sha256, created_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (spec.name, number, spec_json, code_sha256, layer_sha256, now),
                )
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            version = Version(spec, number, code_sha256, layer_sha256, now, uid)
            return FunctionRecord(spec.name, created_at, version)

        return await self._run(tx)

    async def reserve_uid(self) -> int:
        def tx(db: sqlite3.Connection) -> int:
            db.execute("BEGIN IMMEDIATE")
            try:
                uid = _next_uid(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return uid

        return await self._run(tx)

    async def versions(self, name: str) -> list[Version]:
        def q(db: sqlite3.Connection) -> list[Version]:
            rows = db.execute(
                "SELECT v.number, v.spec, v.code_sha256, v.layer_sha256, v.created_at, f.uid"
                " FROM versions v JOIN functions f ON f.name = v.name"
                " WHERE v.name = ? ORDER BY v.number",
                (name,),
            ).fetchall()
            if not rows:
                raise ResourceNotFound(f"function {name!r} does not exist")
            return [_version(r) for r in rows]

        return await self._run(q)

    async def referenced(self) -> set[str]:
        def q(db: sqlite3.Connection) -> set[str]:
            rows = db.execute("SELECT DISTINCT code_sha256, layer_sha256 FROM versions")
            return {h for row in rows for h in row if h}

        return await self._run(q)

    async def delete(self, name: str) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("DELETE FROM trigger_state WHERE function = ?", (name,))
                db.execute("DELETE FROM versions WHERE name = ?", (name,))
                cur = db.execute("DELETE FROM functions WHERE name = ?", (name,))
                if cur.rowcount == 0:
                    raise ResourceNotFound(f"function {name!r} does not exist")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise

        await self._run(tx)

    # -- trigger state -------------------------------------------------------------------
    async def trigger_states(self) -> dict[tuple[str, str], TriggerState]:
        def q(db: sqlite3.Connection) -> dict[tuple[str, str], TriggerState]:
            rows = db.execute(
                "SELECT function, name, created_at, last_fire, fingerprint FROM trigger_state"
            ).fetchall()
            return {
                (r[0], r[1]): TriggerState(
                    r[0], r[1], float(r[2]), None if r[3] is None else float(r[3]), r[4]
                )
                for r in rows
            }

        return await self._run(q)

    async def save_trigger_state(
        self,
        function: str,
        name: str,
        *,
        created_at: float,
        last_fire: float | None,
        fingerprint: str = "",
    ) -> None:
        def tx(db: sqlite3.Connection) -> None:
            # One statement, so one implicit transaction; nothing for a deleted function.
            db.execute(
                "INSERT INTO trigger_state (function, name, created_at, last_fire, fingerprint)"
                " SELECT ?, ?, ?, ?, ? WHERE EXISTS (SELECT 1 FROM functions WHERE name = ?)"
                " ON CONFLICT (function, name) DO UPDATE SET created_at = excluded.created_at,"
                " last_fire = excluded.last_fire, fingerprint = excluded.fingerprint",
                (function, name, created_at, last_fire, fingerprint, function),
            )

        await self._run(tx)

    async def delete_trigger_state(self, function: str, name: str) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM trigger_state WHERE function = ? AND name = ?", (function, name)
            )

        await self._run(tx)


#: Sandbox uids start here, far above any regular user's.
FIRST_UID = 200_000


def _next_uid(db: sqlite3.Connection) -> int:
    row = db.execute("SELECT next FROM uids").fetchone()
    if row is None:
        uid = FIRST_UID
        db.execute("INSERT INTO uids (next) VALUES (?)", (uid + 1,))
    else:
        uid = int(row[0])
        db.execute("UPDATE uids SET next = ?", (uid + 1,))
    return uid


def _version(row: tuple[object, ...] | list[object]) -> Version:
    number, spec_json, code, layer, created, uid = row
    spec = FunctionSpec.model_validate(orjson.loads(str(spec_json)))
    return Version(
        spec,
        int(str(number)),
        str(code),
        None if layer is None else str(layer),
        float(str(created)),
        int(str(uid)),
    )
