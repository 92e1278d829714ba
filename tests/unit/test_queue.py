"""The ``Queue`` protocol's behaviour, the same cases against ``MemoryQueue`` and
``SqliteQueue``, with a synthetic clock (plain numbers); and ``backoff``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from nimbus.errors import ResourceConflict, ResourceNotFound
from nimbus.queue import LEASE_EXPIRED, MemoryQueue, Queue, SqliteQueue, backoff

Body = Callable[[Queue], Awaitable[None]]
Run = Callable[[Body], None]


@pytest.fixture(params=["memory", "sqlite"])
def run(request: pytest.FixtureRequest, tmp_path: Path) -> Run:
    """Run ``body(queue)`` in a fresh event loop against an open, empty queue."""

    def make() -> Queue:
        return MemoryQueue() if request.param == "memory" else SqliteQueue(tmp_path / "q.db")

    def runner(body: Body) -> None:
        async def main() -> None:
            queue = make()
            await queue.open()
            try:
                await body(queue)
            finally:
                await queue.close()

        asyncio.run(main())

    return runner


def test_submit_then_get(run: Run) -> None:
    async def body(q: Queue) -> None:
        inv, created = await q.submit(
            "f", b'{"a":1}', now=10.0, source="gateway", headers={"x-callback-url": "http://x"}
        )
        assert created
        assert inv.function == "f" and inv.payload == b'{"a":1}' and inv.status == "queued"
        assert inv.created_at == inv.updated_at == inv.not_before == 10.0
        assert inv.attempts == () and inv.function_errors == 0
        assert inv.result is None and inv.error is None and inv.idempotency_key is None
        assert inv.source == "gateway" and inv.headers == {"x-callback-url": "http://x"}
        assert len(inv.id) == 36
        assert await q.get(inv.id) == inv
        other, _ = await q.submit("f", b"{}", now=11.0)
        assert other.id != inv.id and other.source == "api" and other.headers == {}
        with pytest.raises(ResourceNotFound):
            await q.get("nope")

    run(body)


def test_idempotency_key(run: Run) -> None:
    async def body(q: Queue) -> None:
        first, created = await q.submit("f", b"1", now=0.0, idempotency_key="k", retention=100)
        assert created and first.idempotency_key == "k"
        again, created = await q.submit("f", b"2", now=99.0, idempotency_key="k", retention=100)
        assert not created and again.id == first.id and again.payload == b"1"
        # The window is the first submission's, whatever a later call passes.
        again, created = await q.submit("f", b"3", now=99.5, idempotency_key="k", retention=1)
        assert not created and again.id == first.id
        # Same key, another function: unrelated.
        other, created = await q.submit("g", b"4", now=50.0, idempotency_key="k")
        assert created and other.id != first.id
        assert len(await q.list()) == 2
        # After the window: a new invocation, which then owns the key.
        second, created = await q.submit("f", b"5", now=100.0, idempotency_key="k", retention=100)
        assert created and second.id != first.id
        again, created = await q.submit("f", b"6", now=150.0, idempotency_key="k")
        assert not created and again.id == second.id
        # The key survives the invocation finishing.
        _, lease = await q.lease(now=150.0, lease_for=30, limit=5, functions=["f"])
        assert lease.invocation.id == second.id
        await q.succeed(lease, b"ok", now=151.0)
        again, created = await q.submit("f", b"7", now=152.0, idempotency_key="k")
        assert not created and again.id == second.id and again.status == "succeeded"
        assert len(await q.list()) == 3

    run(body)


def test_lease_delivers_due_invocations_oldest_first(run: Run) -> None:
    async def body(q: Queue) -> None:
        a, _ = await q.submit("f", b"a", now=1.0)
        b, _ = await q.submit("f", b"b", now=2.0)
        c, _ = await q.submit("f", b"c", now=2.0)
        d, _ = await q.submit("f", b"d", now=3.0)
        assert await q.lease(now=0.5, lease_for=60) == []
        leases = await q.lease(now=2.0, lease_for=60, limit=10)
        assert [le.invocation.id for le in leases] == [a.id, b.id, c.id]
        first = leases[0]
        assert first.attempt == 1 and first.expires_at == 62.0 and first.token
        inv = first.invocation
        assert inv.status == "running" and inv.updated_at == 2.0
        (attempt,) = inv.attempts
        assert attempt.number == 1 and attempt.started_at == 2.0
        assert attempt.ended_at is None and attempt.outcome is None and attempt.error is None
        assert first.request_id == attempt.request_id and len(attempt.request_id) == 36
        assert len({le.token for le in leases}) == 3
        assert len({le.request_id for le in leases}) == 3
        assert (await q.get(a.id)) == inv
        # Running ones are not delivered again while their lease holds.
        (only,) = await q.lease(now=5.0, lease_for=60, limit=10)
        assert only.invocation.id == d.id
        assert await q.lease(now=6.0, lease_for=60) == []

    run(body)


def test_lease_limit(run: Run) -> None:
    async def body(q: Queue) -> None:
        ids = [(await q.submit("f", b"x", now=float(i)))[0].id for i in range(5)]
        assert await q.lease(now=10.0, lease_for=60, limit=0) == []
        got = [le.invocation.id for le in await q.lease(now=10.0, lease_for=60, limit=2)]
        assert got == ids[:2]
        got = [le.invocation.id for le in await q.lease(now=10.0, lease_for=60)]
        assert got == ids[2:3]
        got = [le.invocation.id for le in await q.lease(now=10.0, lease_for=60, limit=100)]
        assert got == ids[3:]

    run(body)


def test_not_before_after_retry_orders_by_due_time(run: Run) -> None:
    async def body(q: Queue) -> None:
        a, _ = await q.submit("f", b"a", now=0.0)
        (lease,) = await q.lease(now=0.0, lease_for=60)
        await q.retry(
            lease, now=1.0, not_before=20.0, outcome="Unhandled", error=b"e", function_error=True
        )
        b, _ = await q.submit("f", b"b", now=5.0)
        got = [le.invocation.id for le in await q.lease(now=19.9, lease_for=60, limit=10)]
        assert got == [b.id]
        (again,) = await q.lease(now=20.0, lease_for=60, limit=10)
        assert again.invocation.id == a.id and again.attempt == 2

    run(body)


def test_functions_and_exclude_filters(run: Run) -> None:
    async def body(q: Queue) -> None:
        f, _ = await q.submit("f", b"", now=0.0)
        g, _ = await q.submit("g", b"", now=1.0)
        h, _ = await q.submit("h", b"", now=2.0)
        assert await q.lease(now=5.0, lease_for=60, functions=[]) == []
        assert await q.lease(now=5.0, lease_for=60, functions=["zzz"]) == []
        got = await q.lease(now=5.0, lease_for=60, limit=10, functions={"g", "h"}, exclude=["h"])
        assert [le.invocation.id for le in got] == [g.id]
        lengths = {"f": 10.0, "h": 30.0}
        got = await q.lease(now=5.0, lease_for=lengths.__getitem__, limit=10, exclude=("g",))
        assert [(le.invocation.id, le.expires_at) for le in got] == [(f.id, 15.0), (h.id, 35.0)]

    run(body)


def test_expired_lease_is_redelivered_with_a_lease_expired_attempt(run: Run) -> None:
    async def body(q: Queue) -> None:
        inv, _ = await q.submit("f", b"x", now=0.0)
        (first,) = await q.lease(now=1.0, lease_for=10)
        assert await q.lease(now=10.9, lease_for=10) == []
        (second,) = await q.lease(now=12.0, lease_for=10)
        assert second.invocation.id == inv.id
        assert second.attempt == 2 and second.token != first.token
        assert second.expires_at == 22.0 and second.request_id != first.request_id
        lost, current = second.invocation.attempts
        assert lost.number == 1 and lost.outcome == LEASE_EXPIRED
        assert lost.started_at == 1.0 and lost.ended_at == 11.0  # when the lease ran out
        assert lost.request_id == first.request_id
        assert current.number == 2 and current.ended_at is None
        assert second.invocation.function_errors == 0
        # The first worker wakes up: its token is stale.
        assert await q.succeed(first, b"late", now=13.0) is None
        done = await q.succeed(second, b"ok", now=14.0)
        assert done is not None and done.status == "succeeded" and done.result == b"ok"
        assert [a.outcome for a in done.attempts] == [LEASE_EXPIRED, "succeeded"]

    run(body)


def test_expired_leases_come_first_when_they_expired_earlier(run: Run) -> None:
    async def body(q: Queue) -> None:
        a, _ = await q.submit("f", b"a", now=0.0)
        await q.lease(now=0.0, lease_for=5)  # expires at 5
        b, _ = await q.submit("f", b"b", now=7.0)
        got = [le.invocation.id for le in await q.lease(now=8.0, lease_for=5, limit=10)]
        assert got == [a.id, b.id]

    run(body)


def test_a_lease_that_ran_out_but_was_not_redelivered_can_still_finish(run: Run) -> None:
    # A lease that ran out but was not delivered again is still the current one:
    # the worker finished, so its result is kept.
    async def body(q: Queue) -> None:
        await q.submit("f", b"x", now=0.0)
        (lease,) = await q.lease(now=0.0, lease_for=1)
        done = await q.succeed(lease, b"ok", now=100.0)
        assert done is not None and done.status == "succeeded"
        assert await q.lease(now=200.0, lease_for=1) == []

    run(body)


def test_stale_tokens_change_nothing(run: Run) -> None:
    async def body(q: Queue) -> None:
        inv, _ = await q.submit("f", b"x", now=0.0)
        (lease,) = await q.lease(now=0.0, lease_for=60)
        done = await q.succeed(lease, b"ok", now=1.0)
        assert done is not None
        assert await q.succeed(lease, b"again", now=2.0) is None
        assert (
            await q.retry(
                lease, now=2.0, not_before=2.0, outcome="Crash", error=None, function_error=True
            )
            is None
        )
        assert await q.fail(lease, now=2.0, outcome="Crash", error=None, dead_letter=True) is None
        assert await q.get(inv.id) == done

    run(body)


def test_retry_counts_function_errors(run: Run) -> None:
    async def body(q: Queue) -> None:
        inv, _ = await q.submit("f", b"x", now=0.0)
        (lease,) = await q.lease(now=0.0, lease_for=60)
        after = await q.retry(
            lease, now=1.0, not_before=3.0, outcome="Unhandled", error=b'{"e":1}',
            function_error=True,
        )  # fmt: skip
        assert after is not None
        assert after.status == "queued" and after.not_before == 3.0 and after.updated_at == 1.0
        assert after.function_errors == 1 and after.error == b'{"e":1}'
        (attempt,) = after.attempts
        assert (attempt.ended_at, attempt.outcome, attempt.error) == (1.0, "Unhandled", b'{"e":1}')
        assert await q.lease(now=2.9, lease_for=60) == []
        (lease,) = await q.lease(now=3.0, lease_for=60)
        after = await q.retry(
            lease, now=4.0, not_before=4.0, outcome="Throttled", error=b"t", function_error=False
        )
        assert after is not None and after.function_errors == 1
        (lease,) = await q.lease(now=4.0, lease_for=60)
        assert lease.attempt == 3
        done = await q.succeed(lease, b"r", now=5.0)
        assert done is not None
        assert done.status == "succeeded" and done.result == b"r" and done.error is None
        assert [a.outcome for a in done.attempts] == ["Unhandled", "Throttled", "succeeded"]
        assert [a.number for a in done.attempts] == [1, 2, 3]
        assert done.function_errors == 1
        assert await q.get(inv.id) == done

    run(body)


@pytest.mark.parametrize(("dead_letter", "status"), [(True, "dead-lettered"), (False, "failed")])
def test_fail(run: Run, dead_letter: bool, status: str) -> None:
    async def body(q: Queue) -> None:
        await q.submit("f", b"x", now=0.0)
        (lease,) = await q.lease(now=0.0, lease_for=60)
        out = await q.fail(
            lease, now=2.0, outcome="Timeout", error=b"slow", dead_letter=dead_letter
        )
        assert out is not None
        assert out.status == status and out.error == b"slow" and out.updated_at == 2.0
        assert out.function_errors == 0
        (attempt,) = out.attempts
        assert (attempt.ended_at, attempt.outcome, attempt.error) == (2.0, "Timeout", b"slow")
        assert await q.lease(now=1000.0, lease_for=60) == []

    run(body)


def test_cancel_rules(run: Run) -> None:
    async def body(q: Queue) -> None:
        a, _ = await q.submit("f", b"a", now=0.0)
        cancelled = await q.cancel(a.id, now=1.0)
        assert cancelled.status == "cancelled" and cancelled.updated_at == 1.0
        assert await q.lease(now=5.0, lease_for=60) == []
        with pytest.raises(ResourceConflict) as e:
            await q.cancel(a.id, now=2.0)
        assert e.value.message == (
            f"invocation {a.id} is cancelled; only queued invocations can be cancelled"
        )
        with pytest.raises(ResourceNotFound):
            await q.cancel("nope", now=2.0)

        b, _ = await q.submit("f", b"b", now=3.0)
        (lease,) = await q.lease(now=3.0, lease_for=60)
        with pytest.raises(ResourceConflict, match="is running; only queued"):
            await q.cancel(b.id, now=4.0)
        assert (await q.get(b.id)).status == "running"
        # Waiting for a retry is queued: it can be cancelled, and the worker's token is spent.
        await q.retry(lease, now=5.0, not_before=50.0, outcome="Crash", error=None,
                      function_error=False)  # fmt: skip
        assert (await q.cancel(b.id, now=6.0)).status == "cancelled"
        assert await q.succeed(lease, b"", now=7.0) is None

    run(body)


def test_cancel_of_a_running_invocation_with_an_expired_lease_is_refused(run: Run) -> None:
    async def body(q: Queue) -> None:
        a, _ = await q.submit("f", b"a", now=0.0)
        await q.lease(now=0.0, lease_for=1)
        with pytest.raises(ResourceConflict):
            await q.cancel(a.id, now=10.0)

    run(body)


def test_list_newest_first_with_filters(run: Run) -> None:
    async def body(q: Queue) -> None:
        a, _ = await q.submit("f", b"", now=1.0)
        b, _ = await q.submit("g", b"", now=2.0)
        c, _ = await q.submit("f", b"", now=3.0)
        d, _ = await q.submit("f", b"", now=3.0)
        await q.cancel(c.id, now=4.0)
        assert [i.id for i in await q.list()] == [d.id, c.id, b.id, a.id]
        assert [i.id for i in await q.list(function="f")] == [d.id, c.id, a.id]
        assert [i.id for i in await q.list(status="queued")] == [d.id, b.id, a.id]
        assert [i.id for i in await q.list(function="f", status="cancelled")] == [c.id]
        assert [i.id for i in await q.list(limit=2)] == [d.id, c.id]
        assert [i.id for i in await q.list(before=3.0)] == [b.id, a.id]
        assert [i.id for i in await q.list(function="f", before=3.0, limit=5)] == [a.id]
        assert await q.list(function="nope") == []
        (lease,) = await q.lease(now=5.0, lease_for=60, functions=["f"])
        listed = (await q.list(status="running"))[0]
        assert listed == lease.invocation and len(listed.attempts) == 1

    run(body)


def test_stats(run: Run) -> None:
    async def body(q: Queue) -> None:
        assert await q.stats(now=0.0) == {}
        for i in range(4):
            await q.submit("f", b"", now=float(i))
        await q.submit("g", b"", now=10.0)
        leases = await q.lease(now=3.0, lease_for=5, limit=3, functions=["f"])
        await q.succeed(leases[0], b"", now=4.0)
        await q.fail(leases[1], now=4.0, outcome="Crash", error=None, dead_letter=True)
        zero = {
            "queued": 0, "running": 0, "succeeded": 0, "failed": 0, "dead-lettered": 0,
            "cancelled": 0, "due": 0, "lease_expired": 0,
        }  # fmt: skip
        assert await q.stats(now=4.0) == {
            "f": {**zero, "queued": 1, "running": 1, "succeeded": 1, "dead-lettered": 1, "due": 1},
            "g": {**zero, "queued": 1},
        }
        stats = await q.stats(now=10.0)
        assert stats["f"]["lease_expired"] == 1 and stats["g"]["due"] == 1

    run(body)


def test_purge(run: Run) -> None:
    async def body(q: Queue) -> None:
        old, _ = await q.submit("f", b"", now=0.0)
        (lease,) = await q.lease(now=0.0, lease_for=60)
        await q.succeed(lease, b"", now=1.0)
        cancelled, _ = await q.submit("f", b"", now=2.0)
        await q.cancel(cancelled.id, now=3.0)
        recent, _ = await q.submit("f", b"", now=4.0)
        (lease,) = await q.lease(now=4.0, lease_for=60)
        await q.fail(lease, now=50.0, outcome="Crash", error=None, dead_letter=False)
        queued, _ = await q.submit("f", b"", now=5.0)
        keyed, _ = await q.submit("f", b"", now=6.0, idempotency_key="k", retention=100.0)
        await q.cancel(keyed.id, now=7.0)

        assert await q.purge(older_than=10.0) == 2  # old, cancelled
        remaining = {i.id for i in await q.list()}
        assert remaining == {recent.id, queued.id, keyed.id}
        with pytest.raises(ResourceNotFound):
            await q.get(old.id)
        # Inside its idempotency window a finished invocation stays, so the key still dedupes.
        assert await q.purge(older_than=100.0) == 1  # recent
        again, created = await q.submit("f", b"", now=100.0, idempotency_key="k")
        assert not created and again.id == keyed.id
        # Once the window closed, the invocation and its key go.
        assert await q.purge(older_than=106.0) == 1
        again, created = await q.submit("f", b"", now=107.0, idempotency_key="k")
        assert created and again.id != keyed.id
        assert {i.id for i in await q.list()} == {queued.id, again.id}

    run(body)


def test_delete_function(run: Run) -> None:
    async def body(q: Queue) -> None:
        await q.submit("f", b"", now=0.0, idempotency_key="k")
        await q.submit("f", b"", now=1.0)
        keep, _ = await q.submit("g", b"", now=2.0)
        (lease,) = await q.lease(now=3.0, lease_for=60, functions=["f"])
        await q.delete_function("f")
        assert [i.id for i in await q.list()] == [keep.id]
        assert await q.succeed(lease, b"", now=4.0) is None
        assert set(await q.stats(now=4.0)) == {"g"}
        _, created = await q.submit("f", b"", now=5.0, idempotency_key="k")
        assert created
        await q.delete_function("never-existed")

    run(body)


def test_concurrent_leases_never_share_an_invocation(run: Run) -> None:
    async def body(q: Queue) -> None:
        for i in range(20):
            await q.submit("f", b"", now=float(i))
        batches = await asyncio.gather(
            *(q.lease(now=100.0, lease_for=60, limit=3) for _ in range(10))
        )
        ids = [le.invocation.id for batch in batches for le in batch]
        assert len(ids) == 20 and len(set(ids)) == 20

    run(body)


# -- backoff -------------------------------------------------------------------


def test_backoff_is_exponential_and_capped() -> None:
    def mid() -> float:
        return 0.5  # no jitter

    assert [backoff(n, rand=mid) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 16.0]
    assert backoff(3, base=0.5, factor=3.0, rand=mid) == 4.5
    assert backoff(10, rand=mid) == 300.0
    assert backoff(10, cap=60.0, rand=mid) == 60.0
    assert backoff(100_000, rand=mid) == 300.0  # no overflow


def test_backoff_jitter() -> None:
    assert backoff(4, rand=lambda: 0.0) == pytest.approx(7.2)
    assert backoff(4, rand=lambda: 0.999999) == pytest.approx(8.8, rel=1e-5)
    assert backoff(4, jitter=0.0, rand=lambda: 0.0) == 8.0
    # Jitter never pushes past the cap.
    assert backoff(20, rand=lambda: 0.999999) == 300.0
    assert backoff(20, rand=lambda: 0.0) == pytest.approx(270.0)
    assert 7.2 <= backoff(4) <= 8.8


def test_backoff_rejects_attempt_zero() -> None:
    with pytest.raises(ValueError):
        backoff(0)
