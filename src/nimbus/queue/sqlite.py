"""``SqliteQueue``: the embedded durable queue, one SQLite database on one worker thread.

Durability: WAL with ``synchronous=FULL``, so a call that changed the queue returns
only after its transaction's commit was fsync'd; a ``kill -9`` at any point loses
nothing that was acknowledged. Leases are rows too, so a ``running`` invocation of
a previous process is redelivered once its lease expires.

Group commit: every write (submit, lease, succeed, …) is queued on the event loop
and a single flusher task applies everything that queued up while the previous
transaction was committing as one transaction — one fsync for many callers. Each
write runs in its own savepoint, so one that raises (``cancel`` of a running
invocation) is rolled back alone, and each caller's future resolves only after
the commit that holds its write. Reads go straight to the worker thread.
"""

from __future__ import annotations

import asyncio
import builtins
import sqlite3
import uuid
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import orjson

from nimbus.errors import ResourceConflict, ResourceNotFound
from nimbus.queue.base import (
    FINISHED,
    LEASE_EXPIRED,
    STATUSES,
    SUCCEEDED,
    Attempt,
    Invocation,
    Lease,
    Queue,
    Status,
)

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS invocations (
    seq             INTEGER PRIMARY KEY,
    id              TEXT NOT NULL UNIQUE,
    function        TEXT NOT NULL,
    payload         BLOB NOT NULL,
    status          TEXT NOT NULL,
    created_at      REAL NOT NULL,
    updated_at      REAL NOT NULL,
    not_before      REAL NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    function_errors INTEGER NOT NULL DEFAULT 0,
    result          BLOB,
    error           BLOB,
    idempotency_key TEXT,
    -- The end of the idempotency window, fixed by the first submission.
    idempotency_expires REAL,
    source          TEXT NOT NULL,
    headers         BLOB,
    lease_token     TEXT,
    lease_expires   REAL
);
-- The lease query walks this in order (the rowid, seq, is the tie-break).
CREATE INDEX IF NOT EXISTS invocations_due ON invocations (status, not_before);
CREATE INDEX IF NOT EXISTS invocations_function ON invocations (function, created_at);
-- lease(functions=[...]) (per-function concurrency caps) walks this: without it the
-- planner reads every row the function ever had (finished ones too) for its running ones.
CREATE INDEX IF NOT EXISTS invocations_function_due ON invocations (function, status, not_before);
CREATE INDEX IF NOT EXISTS invocations_idempotency ON invocations (function, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS attempts (
    invocation  INTEGER NOT NULL,
    number      INTEGER NOT NULL,
    started_at  REAL NOT NULL,
    ended_at    REAL,
    outcome     TEXT,
    request_id  TEXT NOT NULL,
    error       BLOB,
    PRIMARY KEY (invocation, number)
) WITHOUT ROWID;
"""

_COLUMNS = (
    "seq, id, function, payload, status, created_at, updated_at, attempts, function_errors,"
    " not_before, result, error, idempotency_key, source, headers"
)

#: Most writes applied in one transaction: bounds the latency a batch adds.
MAX_BATCH = 1024


@dataclass(slots=True)
class _Write:
    fn: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]


class SqliteQueue:
    """The ``Queue`` protocol on a SQLite database of its own (``<data_dir>/queue.db``)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._db: sqlite3.Connection | None = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[_Write] = []
        self._flusher: asyncio.Task[None] | None = None

    # -- plumbing ---------------------------------------------------------------

    async def open(self) -> None:
        def connect() -> sqlite3.Connection:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA busy_timeout=5000")
            db.executescript(SCHEMA)
            return db

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nimbus-queue")
        self._db = await asyncio.get_running_loop().run_in_executor(self._pool, connect)

    async def close(self) -> None:
        while self._flusher is not None:
            await asyncio.shield(self._flusher)
        if self._pool is None:
            return
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.get_running_loop().run_in_executor(self._pool, db.close)
        self._pool.shutdown(wait=True)
        self._pool = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("queue is not open")
        return self._db

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._pool is None:
            raise RuntimeError("queue is not open")
        return await asyncio.get_running_loop().run_in_executor(
            self._pool, lambda: fn(self._conn())
        )

    async def _write(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Apply ``fn`` in the next group commit; return once that commit is durable."""
        if self._pool is None:
            raise RuntimeError("queue is not open")
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._pending.append(_Write(fn, future))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="nimbus-queue-flush")
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        batch: list[_Write] = []
        try:
            while self._pending:
                batch = self._pending[:MAX_BATCH]
                del self._pending[:MAX_BATCH]
                try:
                    outcomes = await loop.run_in_executor(self._pool, self._apply, batch)
                except Exception as e:  # the transaction failed as a whole: no write holds
                    outcomes = [(False, e)] * len(batch)
                for w, (ok, value) in zip(batch, outcomes, strict=True):
                    if w.future.done():  # the caller gave up; its write stands anyway
                        continue
                    if ok:
                        w.future.set_result(value)
                    else:
                        w.future.set_exception(value)
                batch = []
        except BaseException:
            # Cancelled (the loop is shutting down): whether the batch in flight
            # committed is unknown, and nothing queued behind it will run.
            for w in [*batch, *self._pending]:
                if not w.future.done():
                    w.future.set_exception(RuntimeError("queue writer stopped"))
            self._pending.clear()
            raise
        finally:
            self._flusher = None

    def _apply(self, batch: Sequence[_Write]) -> builtins.list[tuple[bool, Any]]:
        db = self._conn()
        outcomes: list[tuple[bool, Any]] = []
        db.execute("BEGIN IMMEDIATE")
        try:
            for w in batch:
                db.execute("SAVEPOINT w")
                try:
                    outcomes.append((True, w.fn(db)))
                except Exception as e:
                    db.execute("ROLLBACK TO w")
                    outcomes.append((False, e))
                db.execute("RELEASE w")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return outcomes

    # -- the protocol -------------------------------------------------------------

    async def submit(
        self,
        function: str,
        payload: bytes,
        *,
        now: float,
        idempotency_key: str | None = None,
        retention: float = 86400.0,
        source: str = "api",
        headers: dict[str, str] | None = None,
    ) -> tuple[Invocation, bool]:
        # Everything that can be built (and fail) is built here, on the event loop,
        # so the transaction only inserts.
        invocation = Invocation(
            id=str(uuid.uuid4()),
            function=function,
            payload=payload,
            status="queued",
            created_at=now,
            updated_at=now,
            attempts=(),
            function_errors=0,
            not_before=now,
            result=None,
            error=None,
            idempotency_key=idempotency_key,
            source=source,
            headers=dict(headers or {}),
        )
        row = (
            invocation.id,
            function,
            payload,
            now,
            now,
            now,
            idempotency_key,
            None if idempotency_key is None else now + retention,
            source,
            orjson.dumps(headers) if headers else None,
        )

        def tx(db: sqlite3.Connection) -> tuple[Invocation, bool]:
            if idempotency_key is not None:
                first = db.execute(
                    f"SELECT {_COLUMNS} FROM invocations"
                    " WHERE function = ? AND idempotency_key = ? AND idempotency_expires > ?"
                    " ORDER BY seq DESC LIMIT 1",
                    (function, idempotency_key, now),
                ).fetchone()
                if first is not None:
                    return _load(db, [first])[0], False
            db.execute(
                "INSERT INTO invocations (id, function, payload, status, created_at, updated_at,"
                " not_before, idempotency_key, idempotency_expires, source, headers)"
                " VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                row,
            )
            return invocation, True

        return await self._write(tx)

    async def lease(
        self,
        *,
        now: float,
        lease_for: Callable[[str], float] | float,
        limit: int = 1,
        functions: Collection[str] | None = None,
        exclude: Collection[str] = (),
    ) -> builtins.list[Lease]:
        if limit <= 0 or (functions is not None and not functions):
            return []
        where, params = "", []
        if functions is not None:
            where += f" AND function IN ({_marks(functions)})"
            params += list(functions)
        if exclude:
            where += f" AND function NOT IN ({_marks(exclude)})"
            params += list(exclude)

        def tx(db: sqlite3.Connection) -> builtins.list[Lease]:
            # Two index walks (few rows are running), merged by how long each has been due.
            expired = db.execute(
                "SELECT lease_expires, seq, function, attempts FROM invocations"
                f" WHERE status = 'running' AND lease_expires <= ?{where}"
                " ORDER BY lease_expires, seq LIMIT ?",
                (now, *params, limit),
            ).fetchall()
            queued = db.execute(
                "SELECT not_before, seq, function, attempts FROM invocations"
                f" WHERE status = 'queued' AND not_before <= ?{where}"
                " ORDER BY not_before, seq LIMIT ?",
                (now, *params, limit),
            ).fetchall()
            chosen = sorted(expired + queued)[:limit]
            running = {r[1] for r in expired}
            grants: dict[int, tuple[str, int, float]] = {}
            for due, seq, function, attempts in chosen:
                if seq in running:
                    db.execute(
                        "UPDATE attempts SET ended_at = ?, outcome = ?"
                        " WHERE invocation = ? AND number = ?",
                        (due, LEASE_EXPIRED, seq, attempts),
                    )
                length = lease_for if isinstance(lease_for, int | float) else lease_for(function)
                number, token, expires = attempts + 1, uuid.uuid4().hex, now + length
                db.execute(
                    "INSERT INTO attempts (invocation, number, started_at, request_id)"
                    " VALUES (?, ?, ?, ?)",
                    (seq, number, now, str(uuid.uuid4())),
                )
                db.execute(
                    "UPDATE invocations SET status = 'running', attempts = ?, lease_token = ?,"
                    " lease_expires = ?, updated_at = ? WHERE seq = ?",
                    (number, token, expires, now, seq),
                )
                grants[seq] = (token, number, expires)
            if not grants:
                return []
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM invocations WHERE seq IN ({_marks(grants)})",
                list(grants),
            ).fetchall()
            by_seq = {r[0]: r for r in rows}
            invocations = _load(db, [by_seq[seq] for seq in grants])
            return [Lease(inv, *grants[seq]) for seq, inv in zip(grants, invocations, strict=True)]

        return await self._write(tx)

    async def _finish(
        self,
        lease: Lease,
        now: float,
        outcome: str,
        error: bytes | None,
        assignments: str,
        values: tuple[object, ...],
    ) -> Invocation | None:
        def tx(db: sqlite3.Connection) -> Invocation | None:
            row = db.execute(
                "SELECT seq, attempts FROM invocations"
                " WHERE id = ? AND status = 'running' AND lease_token = ?",
                (lease.invocation.id, lease.token),
            ).fetchone()
            if row is None:
                return None
            seq, attempts = row
            db.execute(
                "UPDATE attempts SET ended_at = ?, outcome = ?, error = ?"
                " WHERE invocation = ? AND number = ?",
                (now, outcome, error, seq, attempts),
            )
            db.execute(
                f"UPDATE invocations SET {assignments}, lease_token = NULL, lease_expires = NULL,"
                " updated_at = ? WHERE seq = ?",
                (*values, now, seq),
            )
            return _load_one(db, "seq = ?", seq)

        return await self._write(tx)

    async def succeed(self, lease: Lease, result: bytes, *, now: float) -> Invocation | None:
        return await self._finish(
            lease,
            now,
            SUCCEEDED,
            None,
            "status = 'succeeded', result = ?, error = NULL",
            (result,),
        )

    async def retry(
        self,
        lease: Lease,
        *,
        now: float,
        not_before: float,
        outcome: str,
        error: bytes | None,
        function_error: bool,
    ) -> Invocation | None:
        return await self._finish(
            lease,
            now,
            outcome,
            error,
            "status = 'queued', error = ?, not_before = ?, function_errors = function_errors + ?",
            (error, not_before, int(function_error)),
        )

    async def fail(
        self,
        lease: Lease,
        *,
        now: float,
        outcome: str,
        error: bytes | None,
        dead_letter: bool,
    ) -> Invocation | None:
        status: Status = "dead-lettered" if dead_letter else "failed"
        return await self._finish(
            lease, now, outcome, error, "status = ?, error = ?", (status, error)
        )

    async def cancel(self, invocation_id: str, *, now: float) -> Invocation:
        def tx(db: sqlite3.Connection) -> Invocation:
            row = db.execute(
                "SELECT seq, status FROM invocations WHERE id = ?", (invocation_id,)
            ).fetchone()
            if row is None:
                raise _not_found(invocation_id)
            if row[1] != "queued":
                raise ResourceConflict(
                    f"invocation {invocation_id} is {row[1]}; "
                    "only queued invocations can be cancelled"
                )
            db.execute(
                "UPDATE invocations SET status = 'cancelled', updated_at = ? WHERE seq = ?",
                (now, row[0]),
            )
            return _load_one(db, "seq = ?", row[0])

        return await self._write(tx)

    async def get(self, invocation_id: str) -> Invocation:
        def q(db: sqlite3.Connection) -> Invocation:
            try:
                return _load_one(db, "id = ?", invocation_id)
            except LookupError:
                raise _not_found(invocation_id) from None

        return await self._read(q)

    async def list(
        self,
        *,
        function: str | None = None,
        status: Status | None = None,
        limit: int = 100,
        before: float | None = None,
    ) -> builtins.list[Invocation]:
        where: list[str] = ["1"]
        params: list[object] = []
        if function is not None:
            where.append("function = ?")
            params.append(function)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        if before is not None:
            where.append("created_at < ?")
            params.append(before)

        def q(db: sqlite3.Connection) -> builtins.list[Invocation]:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM invocations WHERE {' AND '.join(where)}"
                " ORDER BY created_at DESC, seq DESC LIMIT ?",
                (*params, max(0, limit)),
            ).fetchall()
            return _load(db, rows)

        return await self._read(q)

    async def stats(self, *, now: float) -> dict[str, dict[str, int]]:
        def q(db: sqlite3.Connection) -> dict[str, dict[str, int]]:
            rows = db.execute(
                "SELECT function, status, COUNT(*),"
                " SUM(status = 'queued' AND not_before <= ?),"
                " SUM(status = 'running' AND lease_expires <= ?)"
                " FROM invocations GROUP BY function, status",
                (now, now),
            ).fetchall()
            out: dict[str, dict[str, int]] = {}
            for function, status, count, due, expired in rows:
                counts = out.setdefault(
                    function, {**dict.fromkeys(STATUSES, 0), "due": 0, "lease_expired": 0}
                )
                counts[status] = count
                counts["due"] += due
                counts["lease_expired"] += expired
            return out

        return await self._read(q)

    async def purge(self, *, older_than: float) -> int:
        finished = ", ".join(f"'{s}'" for s in sorted(FINISHED))
        condition = (
            f"status IN ({finished}) AND updated_at < ?"
            " AND (idempotency_expires IS NULL OR idempotency_expires <= ?)"
        )

        def tx(db: sqlite3.Connection) -> int:
            db.execute(
                "DELETE FROM attempts WHERE invocation IN"
                f" (SELECT seq FROM invocations WHERE {condition})",
                (older_than, older_than),
            )
            return db.execute(
                f"DELETE FROM invocations WHERE {condition}", (older_than, older_than)
            ).rowcount

        return await self._write(tx)

    async def delete_function(self, function: str) -> None:
        def tx(db: sqlite3.Connection) -> None:
            db.execute(
                "DELETE FROM attempts WHERE invocation IN"
                " (SELECT seq FROM invocations WHERE function = ?)",
                (function,),
            )
            db.execute("DELETE FROM invocations WHERE function = ?", (function,))

        await self._write(tx)


def _marks(values: Collection[object]) -> str:
    return ", ".join("?" * len(values))


def _not_found(invocation_id: str) -> ResourceNotFound:
    return ResourceNotFound(f"invocation {invocation_id!r} does not exist")


def _load_one(db: sqlite3.Connection, where: str, value: object) -> Invocation:
    row = db.execute(f"SELECT {_COLUMNS} FROM invocations WHERE {where}", (value,)).fetchone()
    if row is None:
        raise LookupError(value)
    return _load(db, [row])[0]


def _load(db: sqlite3.Connection, rows: Sequence[Sequence[Any]]) -> list[Invocation]:
    """Invocations from ``_COLUMNS`` rows (in their order), with their attempts."""
    attempts: dict[int, list[Attempt]] = {r[0]: [] for r in rows}
    if any(r[7] for r in rows):
        for a in db.execute(
            "SELECT invocation, number, started_at, ended_at, outcome, request_id, error"
            f" FROM attempts WHERE invocation IN ({_marks(attempts)})"
            " ORDER BY invocation, number",
            list(attempts),
        ):
            attempts[a[0]].append(Attempt(*a[1:]))
    return [
        Invocation(
            id=r[1],
            function=r[2],
            payload=r[3],
            status=cast(Status, r[4]),
            created_at=r[5],
            updated_at=r[6],
            attempts=tuple(attempts[r[0]]),
            function_errors=r[8],
            not_before=r[9],
            result=r[10],
            error=r[11],
            idempotency_key=r[12],
            source=r[13],
            headers=orjson.loads(r[14]) if r[14] else {},
        )
        for r in rows
    ]


if TYPE_CHECKING:

    def _conforms(queue: SqliteQueue) -> Queue:
        return queue
