"""The function log store: every line a function prints, kept per function, followable.

Records live in their own SQLite database (WAL), apart from the state database,
so a chatty function never slows down deploys or invocations bookkeeping.

The hot path is :meth:`LogStore.emit`: it assigns the record its ``seq`` and
appends a tuple to an in-memory buffer, nothing else. A background task moves
the buffer to SQLite every :data:`FLUSH_INTERVAL` seconds with one
``executemany``, on one dedicated worker thread that owns the connection and
does *all* the SQLite work, so the event loop never waits on the disk.

Ordering is exact because ``seq`` is assigned in memory at ``emit()`` time and
the worker thread runs its jobs first in, first out. A reader snapshots the
unflushed buffer and submits its SELECT in the same event-loop step, so every
record is seen exactly once: either it is still in the snapshot, or its INSERT
was submitted to the worker before the SELECT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, TypeVar

from nimbus.errors import InvalidParameterValue

__all__ = ["FLUSH_INTERVAL", "FOLLOW_BACKLOG", "LogRecord", "LogStore", "parse_since"]

#: Seconds between two flushes of the buffer to SQLite (and wake-ups of followers).
FLUSH_INTERVAL: Final = 0.05
#: How many existing records :meth:`LogStore.follow` replays when given neither
#: ``since`` nor ``after``.
FOLLOW_BACKLOG: Final = 1000
#: Records a follower reads per SELECT while catching up.
_PAGE: Final = 1000

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

# (seq, time, function, version, instance, request_id, message): LogRecord's field order.
_Row = tuple[int, float, str, int, str, str, str, int]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS logs (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    time       REAL    NOT NULL,
    function   TEXT    NOT NULL,
    version    INTEGER NOT NULL,
    instance   TEXT    NOT NULL,
    request_id TEXT    NOT NULL,
    message    TEXT    NOT NULL,
    platform   INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS logs_function_seq ON logs (function, seq);
CREATE INDEX IF NOT EXISTS logs_function_time ON logs (function, time);
"""
_COLUMNS = "seq, time, function, version, instance, request_id, message, platform"
_INSERT = f"INSERT INTO logs ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
# Delete everything older than the ``cap``-th newest record of a function; the
# subquery walks the (function, seq) index from the newest end.
_TRIM = (
    "DELETE FROM logs WHERE function = ? AND seq < "
    "(SELECT seq FROM logs WHERE function = ? ORDER BY seq DESC LIMIT 1 OFFSET ?)"
)


@dataclass(frozen=True, slots=True)
class LogRecord:
    """One line of a function's output (or one of Nimbus's START/END/REPORT lines)."""

    seq: int
    time: float
    function: str
    version: int
    instance: str
    request_id: str
    message: str
    #: Written by Nimbus (START, END, REPORT, INIT_REPORT, ``[nimbus]`` notes), not by
    #: the function: a function that prints a line like those cannot pass it off as one.
    platform: int = 0

    def to_wire(self) -> dict[str, Any]:
        """The record as the API serves it (the function is implied by the URL)."""
        return {
            "seq": self.seq,
            "time": self.time,
            "version": self.version,
            "instance": self.instance,
            "request_id": self.request_id,
            "message": self.message,
            "platform": bool(self.platform),
        }


def _matches(
    row: _Row, function: str, since: float | None, after: int | None, request_id: str | None
) -> bool:
    return (
        row[2] == function
        and (since is None or row[1] >= since)
        and (after is None or row[0] > after)
        and (request_id is None or row[5] == request_id)
    )


class LogStore:
    """Function logs in a SQLite database at ``path``.

    At most ``max_records_per_function`` records are kept per function; the
    oldest go first. Trimming is amortised: a function is trimmed once it holds
    a tenth of the cap more than the cap, so between two flushes it may briefly
    hold up to 10 % more. Records emitted before :meth:`open` or after
    :meth:`close` has begun are dropped.
    """

    def __init__(
        self,
        path: Path,
        *,
        max_records_per_function: int = 100_000,
        max_bytes_per_function: int = 64 * 1024 * 1024,
    ) -> None:
        if max_records_per_function < 1:
            raise ValueError("max_records_per_function must be at least 1")
        self._byte_cap = max_bytes_per_function
        self._bytes: dict[str, int] = {}
        self._path = path
        self._cap = max_records_per_function
        self._slack = max(1, max_records_per_function // 10)
        self._state = "new"  # new -> open -> closing -> closed
        self._accepting = False
        self._next_seq = 1
        self._buffer: list[_Row] = []
        # One event per followed function, set (and dropped) when a flush wrote
        # records of that function, or when the store closes.
        self._wakeups: dict[str, asyncio.Event] = {}
        self._executor: ThreadPoolExecutor | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._closed = asyncio.Event()
        # Worker-thread state: touched only by jobs running on the executor.
        self._conn: sqlite3.Connection | None = None
        self._counts: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Create the schema if needed, continue the ``seq`` sequence, start flushing."""
        if self._state != "new":
            raise RuntimeError(f"LogStore cannot be opened: it is {self._state}")
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nimbus-logs")
        try:
            last_seq = await self._run(self._db_open)
        except BaseException:
            self._executor.shutdown(wait=True)
            self._state = "closed"
            raise
        self._next_seq = last_seq + 1
        self._state = "open"
        self._accepting = True
        self._flusher = asyncio.create_task(self._flush_loop(), name="nimbus-logs-flusher")

    async def close(self) -> None:
        """Flush what is buffered, end every follower, close the database. Idempotent."""
        if self._state == "new":
            self._state = "closed"
        if self._state == "closing":
            await self._closed.wait()
        if self._state != "open":
            return
        self._state = "closing"
        self._accepting = False
        self._stop.set()
        assert self._flusher is not None
        await self._flusher  # its last round flushes everything accepted so far
        self._state = "closed"
        for wakeup in self._wakeups.values():
            wakeup.set()
        self._wakeups.clear()
        assert self._executor is not None
        try:
            await self._run(self._db_close)
        finally:
            self._executor.shutdown(wait=True)
            self._closed.set()

    # -- writing -----------------------------------------------------------------

    def emit(
        self,
        function: str,
        version: int,
        instance: str,
        request_id: str,
        message: str,
        platform: bool = False,
    ) -> None:
        """Record one line (``platform``: Nimbus's own, not the function's). Called on the
        event loop for every line: it only buffers."""
        if not self._accepting:
            return
        seq = self._next_seq
        self._next_seq = seq + 1
        self._buffer.append(
            (seq, time.time(), function, version, instance, request_id, message, int(platform))
        )

    async def delete_function(self, function: str) -> None:
        """Forget every record of ``function``, buffered ones included."""
        self._check_readable()
        self._buffer = [row for row in self._buffer if row[2] != function]
        # FIFO worker: any INSERT of this function already submitted runs before the DELETE.
        await self._run(self._db_delete, function)

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), FLUSH_INTERVAL)
            # Read before flushing: close() may stop us while a flush is in flight,
            # and what was emitted meanwhile still needs a last round.
            stopping = self._stop.is_set()
            try:
                await self._flush()
            except Exception:
                # The batch is lost, but the store goes on: logs must never take Nimbus down.
                _log.exception("writing function logs to %s failed", self._path)
            if stopping:
                return

    async def _flush(self) -> None:
        if not self._buffer:
            return
        batch, self._buffer = self._buffer, []
        functions = await self._run(self._db_write, batch)
        for function in functions:
            wakeup = self._wakeups.pop(function, None)
            if wakeup is not None:
                wakeup.set()

    # -- reading -----------------------------------------------------------------

    async def query(
        self,
        function: str,
        *,
        since: float | None = None,
        after: int | None = None,
        limit: int = 1000,
        request_id: str | None = None,
    ) -> list[LogRecord]:
        """The latest ``limit`` records of ``function`` with ``time >= since`` and
        ``seq > after`` (and of one ``request_id``, if given), oldest first.

        Records not flushed yet are included.
        """
        self._check_readable()
        records, _ = await self._read(function, since, after, request_id, limit, latest=True)
        return records

    async def follow(
        self,
        function: str,
        *,
        since: float | None = None,
        after: int | None = None,
        request_id: str | None = None,
    ) -> AsyncGenerator[LogRecord, None]:
        """The matching existing records, then new ones as they are flushed, in ``seq`` order.

        The backlog is every record after ``after`` and/or since ``since``; with
        neither, the latest :data:`FOLLOW_BACKLOG` records. It runs until the
        consumer stops iterating (``aclose()``) or the store closes.
        """
        if self._state == "closed":
            return
        self._check_readable()
        last = after
        if after is None and since is None:
            records, last = await self._read(
                function, None, None, request_id, FOLLOW_BACKLOG, latest=True
            )
            for record in records:
                yield record
        while self._state != "closed":
            # Taken before reading, so a flush that lands during the read is not missed.
            wakeup = self._wakeups.get(function)
            if wakeup is None:
                wakeup = self._wakeups[function] = asyncio.Event()
            records, high_water = await self._read(
                function, since, last, request_id, _PAGE, latest=False
            )
            for record in records:
                yield record
            if len(records) == _PAGE:
                last = records[-1].seq  # more to catch up on
                continue
            # Everything up to high_water has been seen: later records have a larger seq.
            last = high_water
            if self._state == "closed":
                return
            await wakeup.wait()

    async def _read(
        self,
        function: str,
        since: float | None,
        after: int | None,
        request_id: str | None,
        limit: int,
        *,
        latest: bool,
    ) -> tuple[list[LogRecord], int]:
        """Matching records (the latest or the first ``limit``, ascending) and the
        highest ``seq`` assigned when they were read."""
        if limit < 1:
            return [], self._next_seq - 1
        # The buffer snapshot and the SELECT's submission happen in one event-loop
        # step (no await in between): see the module docstring.
        high_water = self._next_seq - 1
        buffered = [
            LogRecord(*row)
            for row in self._buffer
            if _matches(row, function, since, after, request_id)
        ]
        if latest and len(buffered) >= limit:
            return buffered[-limit:], high_water
        stored = await self._run(self._db_select, function, since, after, request_id, limit, latest)
        # Buffered records are newer than every stored one.
        records = stored + buffered
        return (records[-limit:] if latest else records[:limit]), high_water

    def _check_readable(self) -> None:
        if self._state not in ("open", "closing"):
            raise RuntimeError(f"LogStore is {self._state}")

    def _run(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        # Submits at once (run_in_executor is not a coroutine), which the ordering relies on.
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # -- worker thread -----------------------------------------------------------

    def _db(self) -> sqlite3.Connection:
        assert self._conn is not None, "LogStore database is not open"
        return self._conn

    def _db_open(self) -> int:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.executescript(_SCHEMA)
            columns = {row[1] for row in conn.execute("PRAGMA table_info(logs)")}
            if "platform" not in columns:  # a data dir from before platform lines were marked
                conn.execute("ALTER TABLE logs ADD COLUMN platform INTEGER NOT NULL DEFAULT 0")
            # sqlite_sequence remembers seqs whose records were trimmed or deleted since.
            (last_seq,) = conn.execute(
                "SELECT max(coalesce((SELECT max(seq) FROM logs), 0),"
                " coalesce((SELECT seq FROM sqlite_sequence WHERE name = 'logs'), 0))"
            ).fetchone()
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return int(last_seq)

    def _db_close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _db_write(self, batch: list[_Row]) -> list[str]:
        conn = self._db()
        added = Counter(row[2] for row in batch)
        added_bytes: Counter[str] = Counter()
        for row in batch:
            added_bytes[row[2]] += len(row[6])
        conn.execute("BEGIN")
        try:
            conn.executemany(_INSERT, batch)
            for function, n in added.items():
                count = self._counts.get(function)
                size = self._bytes.get(function)
                if count is None or size is None:
                    count, size = conn.execute(
                        "SELECT count(*), total(length(message)) FROM logs WHERE function = ?",
                        (function,),
                    ).fetchone()
                    count, size = int(count), int(size)
                else:
                    count += n
                    size += added_bytes[function]
                if count - self._cap >= self._slack:
                    count -= conn.execute(_TRIM, (function, function, self._cap - 1)).rowcount
                    size = -1  # recounted below
                while True:
                    if size < 0:
                        count, size = conn.execute(
                            "SELECT count(*), total(length(message)) FROM logs WHERE function = ?",
                            (function,),
                        ).fetchone()
                        count, size = int(count), int(size)
                    if size <= self._byte_cap or count <= 1:
                        break
                    # Over the byte budget (long lines): keep the newer half, then recount.
                    conn.execute(_TRIM, (function, function, max(1, count // 2) - 1))
                    size = -1
                self._counts[function] = count
                self._bytes[function] = size
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._counts.clear()  # may count rows that were rolled back; recount lazily
            self._bytes.clear()
            raise
        return list(added)

    def _db_delete(self, function: str) -> None:
        self._db().execute("DELETE FROM logs WHERE function = ?", (function,))
        self._counts.pop(function, None)
        self._bytes.pop(function, None)

    def _db_select(
        self,
        function: str,
        since: float | None,
        after: int | None,
        request_id: str | None,
        limit: int,
        latest: bool,
    ) -> list[LogRecord]:
        sql = f"SELECT {_COLUMNS} FROM logs WHERE function = ?"
        params: list[Any] = [function]
        if since is not None:
            sql += " AND time >= ?"
            params.append(since)
        if after is not None:
            sql += " AND seq > ?"
            params.append(after)
        if request_id is not None:
            sql += " AND request_id = ?"
            params.append(request_id)
        sql += f" ORDER BY seq {'DESC' if latest else 'ASC'} LIMIT ?"
        params.append(limit)
        records = [LogRecord(*row) for row in self._db().execute(sql, params)]
        if latest:
            records.reverse()
        return records


_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_EPOCH = re.compile(r"\d+(?:\.\d+)?")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(value: str, now: float) -> float:
    """Epoch seconds for the API's ``since`` parameter.

    Accepts epoch seconds (``1795000000``, ``1795000000.5``), an ISO 8601 time
    (``2026-11-27T05:00:00Z``, with an offset, or naive meaning UTC), or a
    duration back from ``now`` (``30s``, ``10m``, ``2h``, ``1d``).
    """
    text = value.strip()
    result: float | None = None
    if _EPOCH.fullmatch(text):
        result = float(text)
    elif match := _DURATION.fullmatch(text):
        result = now - float(match[1]) * _UNIT_SECONDS[match[2]]
    else:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            result = moment.timestamp()
    if result is None or not math.isfinite(result):
        raise InvalidParameterValue(
            "since: expected epoch seconds, an ISO 8601 time, "
            f"or a duration like 10m (got {value!r})"
        )
    return result
