"""What only the SQLite queue promises: durability across closes, restarts and
``kill -9``, leases that outlive their process, and group commit."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from nimbus.errors import ResourceConflict
from nimbus.queue import LEASE_EXPIRED, SqliteQueue


async def opened(path: Path) -> SqliteQueue:
    queue = SqliteQueue(path)
    await queue.open()
    return queue


def test_pragmas(tmp_path: Path) -> None:
    async def main() -> None:
        q = await opened(tmp_path / "q.db")
        db = q._conn()
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert db.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        assert db.execute("PRAGMA busy_timeout").fetchone() == (5000,)
        await q.close()

    asyncio.run(main())


def test_submitted_invocations_survive_close_and_reopen(tmp_path: Path) -> None:
    path = tmp_path / "data" / "queue.db"

    async def first() -> list[str]:
        q = await opened(path)
        a, _ = await q.submit("f", b'{"n":1}', now=1.0, idempotency_key="k", headers={"h": "v"})
        b, _ = await q.submit("g", b'{"n":2}', now=2.0, source="schedule:nightly")
        await q.close()
        return [a.id, b.id]

    async def second(ids: list[str]) -> None:
        q = await opened(path)
        a, b = [await q.get(i) for i in ids]
        assert (a.function, a.payload, a.status) == ("f", b'{"n":1}', "queued")
        assert a.headers == {"h": "v"}
        assert (b.source, b.created_at) == ("schedule:nightly", 2.0)
        _, created = await q.submit("f", b"", now=3.0, idempotency_key="k")
        assert not created
        await q.close()

    ids = asyncio.run(first())
    asyncio.run(second(ids))


def test_a_lease_of_a_previous_process_is_redelivered_after_it_expires(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"

    async def previous_process() -> tuple[str, str]:
        q = await opened(path)
        inv, _ = await q.submit("f", b"x", now=0.0)
        (lease,) = await q.lease(now=1.0, lease_for=60)
        await q.close()  # never acknowledged
        return inv.id, lease.token

    async def restarted(invocation_id: str, old_token: str) -> None:
        q = await opened(path)
        assert (await q.get(invocation_id)).status == "running"
        assert await q.lease(now=60.0, lease_for=60) == []
        (lease,) = await q.lease(now=61.0, lease_for=60)
        assert lease.invocation.id == invocation_id and lease.token != old_token
        assert lease.attempt == 2
        assert [a.outcome for a in lease.invocation.attempts] == [LEASE_EXPIRED, None]
        done = await q.succeed(lease, b"ok", now=62.0)
        assert done is not None and done.status == "succeeded"
        await q.close()

    asyncio.run(restarted(*asyncio.run(previous_process())))


def test_group_commit_batches_concurrent_submits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    transactions: list[int] = []

    async def main() -> None:
        q = await opened(tmp_path / "q.db")
        apply = q._apply

        def counting(batch: Any) -> Any:
            transactions.append(len(batch))
            return apply(batch)

        monkeypatch.setattr(q, "_apply", counting)
        results = await asyncio.gather(
            *(q.submit("f", str(i).encode(), now=float(i)) for i in range(200))
        )
        assert all(created for _, created in results)
        ids = [inv.id for inv, _ in results]
        assert len(set(ids)) == 200
        listed = await q.list(limit=1000)
        assert {i.id for i in listed} == set(ids)
        assert {i.payload for i in listed} == {str(i).encode() for i in range(200)}
        await q.close()

    asyncio.run(main())
    assert sum(transactions) == 200
    assert len(transactions) < 20, transactions  # one commit for many callers


def test_a_failing_write_does_not_undo_the_others_in_its_batch(tmp_path: Path) -> None:
    async def main() -> None:
        q = await opened(tmp_path / "q.db")
        running, _ = await q.submit("f", b"", now=0.0)
        await q.lease(now=0.0, lease_for=60)
        results = await asyncio.gather(
            q.submit("f", b"a", now=1.0),
            q.cancel(running.id, now=1.0),
            q.submit("f", b"b", now=1.0),
            return_exceptions=True,
        )
        assert isinstance(results[1], ResourceConflict)
        assert len(await q.list()) == 3
        assert (await q.get(running.id)).status == "running"
        await q.close()

    asyncio.run(main())


CHILD = """
import asyncio, sys
from pathlib import Path
from nimbus.queue import SqliteQueue

async def submitter(q, n):
    for i in range(n):
        inv, _ = await q.submit("f", b"{}", now=float(i))
        sys.stdout.write(inv.id + "\\n")
        sys.stdout.flush()

async def main():
    q = SqliteQueue(Path(sys.argv[1]))
    await q.open()
    await asyncio.gather(*(submitter(q, 100_000) for _ in range(8)))

asyncio.run(main())
"""


def test_every_acknowledged_submit_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "queue.db"
    child = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(path)],
        stdout=subprocess.PIPE,
        text=True,
    )
    acknowledged: list[str] = []
    try:
        assert child.stdout is not None
        while len(acknowledged) < 500:
            line = child.stdout.readline()
            assert line, "the child stopped early"
            acknowledged.append(line.strip())
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        if child.stdout is not None:
            child.stdout.close()

    db = sqlite3.connect(path)  # recovers the WAL the dead process left
    try:
        stored = {r[0] for r in db.execute("SELECT id FROM invocations")}
    finally:
        db.close()
    assert set(acknowledged) <= stored


def test_leasing_one_function_does_not_read_its_finished_history(tmp_path: Path) -> None:
    """Per-function leasing (``functions=[...]``) must cost the same whether the function
    has 10 or 3,000 finished invocations kept for their retention window."""

    async def steps(finished: int) -> int:
        q = await opened(tmp_path / f"q{finished}.db")
        try:
            await asyncio.gather(*(q.submit("f", b"{}", now=0.0) for _ in range(finished)))
            for lease in await q.lease(now=1.0, lease_for=30, limit=finished, functions=["f"]):
                await q.succeed(lease, b"{}", now=1.0)
            for _ in range(5):
                await q.submit("f", b"{}", now=2.0)
            await q.lease(now=3.0, lease_for=30, limit=2, functions=["f"])  # two running
            counted = 0

            def count() -> int:
                nonlocal counted
                counted += 1
                return 0

            q._conn().set_progress_handler(count, 100)  # every 100 VM instructions
            leased = await q.lease(now=4.0, lease_for=30, limit=2, functions=["f"])
            q._conn().set_progress_handler(None, 0)
            assert len(leased) == 2
            return counted
        finally:
            await q.close()

    small, large = asyncio.run(steps(10)), asyncio.run(steps(3000))
    assert large < small * 3 + 20, (small, large)
