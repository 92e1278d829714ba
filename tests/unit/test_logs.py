"""The function log store: ordering, filters, persistence, retention, follow, ``since``."""

from __future__ import annotations

import asyncio
import itertools
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nimbus.errors import InvalidParameterValue
from nimbus.observability.logs import FLUSH_INTERVAL, LogRecord, LogStore, parse_since

NOW = 1_795_000_000.0


def run(body: Callable[[LogStore], Awaitable[None]], path: Path, **kwargs: int) -> None:
    async def main() -> None:
        store = LogStore(path, **kwargs)
        await store.open()
        try:
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


async def settle() -> None:
    """Long enough for at least one flush."""
    await asyncio.sleep(FLUSH_INTERVAL * 3)


def messages(records: list[LogRecord]) -> list[str]:
    return [r.message for r in records]


def stored_rows(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        (n,) = conn.execute("SELECT count(*) FROM logs").fetchone()
    conn.close()
    return int(n)


def test_emit_and_query_in_order_with_filters(tmp_path: Path) -> None:
    async def body(store: LogStore) -> None:
        store.emit("hello", 1, "i1", "", "init")
        for i in range(5):
            store.emit("hello", 1, "i1", f"r{i}", f"line {i}")
        store.emit("other", 2, "i2", "r0", "not mine")
        await settle()
        store.emit("hello", 2, "i3", "r9", "late")  # still buffered

        records = await store.query("hello")
        assert messages(records) == ["init", *[f"line {i}" for i in range(5)], "late"]
        seqs = [r.seq for r in records]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
        assert {r.function for r in records} == {"hello"}
        assert records[-1].version == 2 and records[-1].instance == "i3"
        assert records[0].to_wire() == {
            "seq": records[0].seq,
            "time": records[0].time,
            "version": 1,
            "instance": "i1",
            "request_id": "",
            "message": "init",
            "platform": False,
        }

        # limit: the latest N, ascending; across the flushed/buffered boundary too.
        assert messages(await store.query("hello", limit=3)) == ["line 3", "line 4", "late"]
        assert messages(await store.query("hello", limit=1)) == ["late"]
        assert await store.query("hello", limit=0) == []
        # after: strictly after a seq.
        assert messages(await store.query("hello", after=seqs[4])) == ["line 4", "late"]
        assert await store.query("hello", after=seqs[-1]) == []
        # request_id, alone and with limit.
        assert messages(await store.query("hello", request_id="r2")) == ["line 2"]
        assert messages(await store.query("hello", request_id="")) == ["init"]
        assert messages(await store.query("other")) == ["not mine"]
        assert await store.query("nobody") == []
        # since: time >= since.
        assert messages(await store.query("hello", since=records[-1].time)) == ["late"]
        assert len(await store.query("hello", since=records[0].time)) == 7
        assert await store.query("hello", since=records[-1].time + 3600) == []

    run(body, tmp_path / "logs.db")


def test_emit_only_buffers_and_query_sees_the_buffer(tmp_path: Path) -> None:
    path = tmp_path / "logs.db"

    async def body(store: LogStore) -> None:
        store.emit("f", 1, "i", "r", "a")
        store.emit("f", 1, "i", "r", "b")
        assert stored_rows(path) == 0  # no await yet: nothing can have been written
        assert messages(await store.query("f")) == ["a", "b"]
        await settle()
        assert stored_rows(path) == 2
        assert messages(await store.query("f")) == ["a", "b"]

    run(body, path)


def test_records_persist_and_seq_keeps_increasing(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "logs.db"
    first: list[LogRecord] = []

    async def write(store: LogStore) -> None:
        for i in range(3):
            store.emit("f", 1, "i", "", f"a{i}")
        store.emit("g", 1, "i", "", "last")
        first.extend(await store.query("f"))

    async def reopen(store: LogStore) -> None:
        assert await store.query("f") == first  # close flushed the buffer
        # The newest record is deleted: its seq must still never be reused.
        await store.delete_function("g")
        store.emit("f", 1, "i", "", "b0")

    async def check(store: LogStore) -> None:
        records = await store.query("f")
        assert messages(records) == ["a0", "a1", "a2", "b0"]
        assert records[-1].seq > first[-1].seq + 1

    run(write, path)
    run(reopen, path)
    run(check, path)


def test_close_during_a_flush_still_writes_everything(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "logs.db"

    async def body(store: LogStore) -> None:
        write = store._db_write

        def slow_write(batch: list[tuple[int, float, str, int, str, str, str]]) -> list[str]:
            time.sleep(FLUSH_INTERVAL * 2)  # on the worker thread
            return write(batch)

        monkeypatch.setattr(store, "_db_write", slow_write)
        store.emit("f", 1, "i", "", "first")
        await asyncio.sleep(FLUSH_INTERVAL * 1.5)  # "first" is being written now
        store.emit("f", 1, "i", "", "second")

    run(body, path)
    run(lambda store: check_messages(store, "f", ["first", "second"]), path)


async def check_messages(store: LogStore, function: str, expected: list[str]) -> None:
    assert messages(await store.query(function)) == expected


def test_retention_keeps_the_latest_records(tmp_path: Path) -> None:
    path = tmp_path / "logs.db"

    async def fill(store: LogStore) -> None:
        for i in range(25):
            store.emit("f", 1, "i", "", f"m{i}")
        store.emit("g", 1, "i", "", "other")
        await settle()
        assert messages(await store.query("f")) == [f"m{i}" for i in range(15, 25)]
        for i in range(25, 30):
            store.emit("f", 1, "i", "", f"m{i}")

    async def more(store: LogStore) -> None:
        # A new store counts lazily, then trims.
        assert messages(await store.query("f")) == [f"m{i}" for i in range(20, 30)]
        for i in range(30, 33):
            store.emit("f", 1, "i", "", f"m{i}")
        await settle()
        assert messages(await store.query("f")) == [f"m{i}" for i in range(23, 33)]
        assert messages(await store.query("g")) == ["other"]

    run(fill, path, max_records_per_function=10)
    run(more, path, max_records_per_function=10)
    assert stored_rows(path) == 11


def test_delete_function_removes_flushed_and_buffered_records(tmp_path: Path) -> None:
    async def body(store: LogStore) -> None:
        store.emit("f", 1, "i", "", "flushed")
        store.emit("g", 1, "i", "", "kept")
        await settle()
        store.emit("f", 1, "i", "", "buffered")
        await store.delete_function("f")
        assert await store.query("f") == []
        await settle()
        assert await store.query("f") == []
        assert messages(await store.query("g")) == ["kept"]
        store.emit("f", 2, "i", "", "again")
        assert messages(await store.query("f")) == ["again"]

    run(body, tmp_path / "logs.db")


async def take(stream: AsyncIterator[LogRecord], n: int) -> list[LogRecord]:
    got: list[LogRecord] = []
    async for record in stream:
        got.append(record)
        if len(got) == n:
            break
    return got


def test_follow_backlog_then_live_without_gaps_or_duplicates(tmp_path: Path) -> None:
    async def body(store: LogStore) -> None:
        total = 600
        for i in range(100):
            store.emit("f", 1, "i", "", f"m{i}")
        await settle()
        for i in range(100, 150):  # some of the backlog is still buffered
            store.emit("f", 1, "i", "", f"m{i}")

        async def produce() -> None:
            for i in range(150, total):
                store.emit("f", 1, "i", "", f"m{i}")
                store.emit("noise", 1, "i", "", "x")
                if i % 50 == 0:
                    await asyncio.sleep(FLUSH_INTERVAL / 2)
                elif i % 7 == 0:
                    await asyncio.sleep(0)

        producer = asyncio.create_task(produce())
        async with aclosing(store.follow("f")) as stream:
            got = await asyncio.wait_for(take(stream, total), 5)
        await producer
        assert messages(got) == [f"m{i}" for i in range(total)]
        assert all(a.seq < b.seq for a, b in itertools.pairwise(got))

    run(body, tmp_path / "logs.db")


def test_follow_filters_after_since_and_request_id(tmp_path: Path) -> None:
    async def body(store: LogStore) -> None:
        for i in range(5):
            store.emit("f", 1, "i", f"r{i % 2}", f"m{i}")
        existing = await store.query("f")

        async with aclosing(store.follow("f", after=existing[2].seq)) as stream:
            assert messages(await take(stream, 2)) == ["m3", "m4"]
            store.emit("f", 1, "i", "r0", "m5")
            assert messages(await asyncio.wait_for(take(stream, 1), 2)) == ["m5"]

        async with aclosing(store.follow("f", request_id="r1")) as stream:
            store.emit("f", 1, "i", "r0", "m6")
            store.emit("f", 1, "i", "r1", "m7")
            assert messages(await asyncio.wait_for(take(stream, 3), 2)) == ["m1", "m3", "m7"]

        future = existing[-1].time + 3600
        async with aclosing(store.follow("f", since=future)) as stream:
            pending = asyncio.ensure_future(take(stream, 1))
            await settle()
            assert not pending.done()
            pending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await pending

    run(body, tmp_path / "logs.db")


def test_follow_backlog_is_capped_without_since_or_after(tmp_path: Path) -> None:
    async def body(store: LogStore) -> None:
        for i in range(1200):
            store.emit("f", 1, "i", "", f"m{i}")
        await settle()
        async with aclosing(store.follow("f")) as stream:
            got = await take(stream, 1000)
            assert got[0].message == "m200" and got[-1].message == "m1199"
            store.emit("f", 1, "i", "", "new")
            assert messages(await asyncio.wait_for(take(stream, 1), 2)) == ["new"]
        async with aclosing(store.follow("f", after=0)) as stream:
            assert len(await take(stream, 1201)) == 1201

    run(body, tmp_path / "logs.db")


def test_follow_ends_when_the_store_closes(tmp_path: Path) -> None:
    async def main() -> None:
        store = LogStore(tmp_path / "logs.db")
        await store.open()
        store.emit("f", 1, "i", "", "before")

        async def consume() -> list[str]:
            return [r.message async for r in store.follow("f")]

        follower = asyncio.create_task(consume())
        await settle()
        store.emit("f", 1, "i", "", "during")
        await store.close()
        got = await asyncio.wait_for(follower, 2)
        assert got[0] == "before" and set(got) <= {"before", "during"}
        await store.close()  # idempotent
        store.emit("f", 1, "i", "", "after close")  # dropped, no error
        assert [r async for r in store.follow("f")] == []
        with pytest.raises(RuntimeError):
            await store.query("f")

    asyncio.run(main())


def test_parse_since_epoch_iso_and_durations() -> None:
    assert parse_since("1795000000", NOW) == 1_795_000_000.0
    assert parse_since("1795000000.5", NOW) == 1_795_000_000.5
    expected = datetime(2026, 11, 27, 5, 0, tzinfo=UTC).timestamp()
    assert parse_since("2026-11-27T05:00:00Z", NOW) == expected
    assert parse_since("2026-11-27T05:00:00+00:00", NOW) == expected
    assert parse_since("2026-11-27T07:00:00+02:00", NOW) == expected
    assert parse_since("2026-11-27T05:00:00", NOW) == expected  # naive is UTC
    assert parse_since("2026-11-27T05:00:00.250Z", NOW) == expected + 0.25
    assert parse_since("30s", NOW) == NOW - 30
    assert parse_since("10m", NOW) == NOW - 600
    assert parse_since("2h", NOW) == NOW - 7200
    assert parse_since("1d", NOW) == NOW - 86400


@pytest.mark.parametrize("value", ["xyz", "", "10x", "-5m", "m", "1e9", "2026-13-01T00:00:00Z"])
def test_parse_since_rejects_anything_else(value: str) -> None:
    with pytest.raises(InvalidParameterValue) as info:
        parse_since(value, NOW)
    assert info.value.message == (
        f"since: expected epoch seconds, an ISO 8601 time, or a duration like 10m (got {value!r})"
    )


def test_parse_since_error_message_is_exact() -> None:
    with pytest.raises(InvalidParameterValue, match=r"^since: expected epoch seconds") as info:
        parse_since("xyz", NOW)
    assert str(info.value) == (
        "since: expected epoch seconds, an ISO 8601 time, or a duration like 10m (got 'xyz')"
    )


def test_long_lines_are_trimmed_by_bytes_too(tmp_path: Path) -> None:
    async def run() -> None:
        store = LogStore(tmp_path / "logs.db", max_bytes_per_function=100_000)
        await store.open()
        try:
            for i in range(50):
                store.emit("f", 1, "i", "r", f"{i:03d}" + "x" * 10_000)
            await asyncio.sleep(FLUSH_INTERVAL * 4)  # flushed (and trimmed) by now
            records = await store.query("f", limit=10_000)
            assert sum(len(r.message) for r in records) <= 100_000
            assert records[-1].message.startswith("049")  # the newest survive
        finally:
            await store.close()

    asyncio.run(run())
