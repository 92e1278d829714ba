"""The schedule runner with a synthetic clock, a fake async invoker (an in-memory
queue: submits are recorded, ``running()`` counts from them) and an in-memory
store; plus the trigger state of the real ``SqliteStore`` across a reopen.

The decisions themselves (cron, DST, catch-up arithmetic) are tested in
test_schedule.py; here: that the loop applies them, persists, survives restarts
and crashes, and applies the overlap policies through the queue.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from nimbus.errors import ResourceNotFound, ServiceException
from nimbus.models import FunctionRecord, TriggerState, Version, parse_spec
from nimbus.queue import Invocation, MemoryQueue, Status
from nimbus.store import FunctionStore, MemoryStore, SqliteStore
from nimbus.triggers.runner import ScheduleRunner, event_id, idempotency_key

UTC = "UTC"


def at(wall: str, tz: str = UTC) -> float:
    return datetime.fromisoformat(wall).replace(tzinfo=ZoneInfo(tz)).timestamp()


def iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


T0 = at("2026-01-05T00:00:00")


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeFunctions:
    """The registry's surface the runner uses, over a real FunctionStore."""

    def __init__(self, store: FunctionStore) -> None:
        self.store = store
        self.records: dict[str, FunctionRecord] = {}
        self.listeners: list[Callable[[str], None]] = []

    def all(self) -> list[FunctionRecord]:
        return [self.records[k] for k in sorted(self.records)]

    def current(self, name: str) -> Version:
        if name not in self.records:
            raise ResourceNotFound(f"function {name!r} does not exist")
        return self.records[name].current

    def subscribe(self, listener: Callable[[str], None]) -> None:
        self.listeners.append(listener)

    async def deploy(self, name: str, *triggers: dict[str, Any]) -> Version:
        spec = parse_spec({"name": name, "triggers": list(triggers)})
        record = await self.store.publish(spec, "0" * 64, None, create=name not in self.records)
        self.records[name] = record
        for listener in self.listeners:
            listener(name)
        return record.current

    async def delete(self, name: str) -> None:
        await self.store.delete(name)
        del self.records[name]
        for listener in self.listeners:
            listener(name)


class FakeAsync:
    """``AsyncInvoker``'s surface over a ``MemoryQueue``; nothing runs the invocations."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.queue = MemoryQueue()
        self.submits: list[tuple[Invocation, bool]] = []
        self.fail: Exception | None = None

    async def submit(
        self,
        function: str,
        payload: bytes,
        *,
        idempotency_key: str | None = None,
        source: str = "api",
        headers: dict[str, str] | None = None,
    ) -> tuple[Invocation, bool]:
        if self.fail is not None:
            raise self.fail
        result = await self.queue.submit(
            function,
            payload,
            now=self.clock(),
            idempotency_key=idempotency_key,
            source=source,
            headers=headers,
        )
        self.submits.append(result)
        return result

    async def running(self, function: str, source: str) -> int:
        if self.fail is not None:
            raise self.fail
        statuses: tuple[Status, ...] = ("queued", "running")
        found = [
            i
            for status in statuses
            for i in await self.queue.list(function=function, status=status, limit=100_000)
            if i.source == source
        ]
        return len(found)

    async def invocations(self, function: str | None = None) -> list[Invocation]:
        """Every invocation, oldest first."""
        return list(reversed(await self.queue.list(function=function, limit=100_000)))

    async def events(self, function: str | None = None) -> list[dict[str, Any]]:
        return [json.loads(i.payload) for i in await self.invocations(function)]

    async def times(self, function: str | None = None) -> list[str]:
        return [e["time"] for e in await self.events(function)]


class World:
    """A node's worth of fakes around one runner; ``restart()`` makes a new runner."""

    def __init__(
        self, store: FunctionStore | None = None, t0: float = T0, clock: Clock | None = None
    ) -> None:
        self.clock = clock if clock is not None else Clock(t0)
        self.store: FunctionStore = store if store is not None else MemoryStore(self.clock)
        self.functions = FakeFunctions(self.store)
        self.invoker = FakeAsync(self.clock)
        self.runner = self._new_runner()

    def _new_runner(self) -> ScheduleRunner:
        self.functions.listeners.clear()
        return ScheduleRunner(self.functions, self.invoker, self.store, clock=self.clock)

    async def restart(self) -> None:
        """A new runner (as after a restart) reading the same store."""
        self.runner = self._new_runner()
        await self.runner.load()

    async def drive(self, until: float) -> None:
        """Run passes at now and at every next due time up to ``until``; end at ``until``."""
        while True:
            next_at = await self.runner.step()
            if next_at > until:
                break
            self.clock.t = next_at
        self.clock.t = until

    async def state(self, function: str, trigger: str) -> TriggerState | None:
        return (await self.store.trigger_states()).get((function, trigger))


def run(body: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(body())


def every(period: float, start: float, end: float) -> list[str]:
    """ISO times start, start+period, ... up to end (inclusive)."""
    out, t = [], start
    while t <= end:
        out.append(iso(t))
        t += period
    return out


# -- firing ----------------------------------------------------------------------------


def test_fires_at_the_right_times_and_persists_last_fire() -> None:
    async def body() -> None:
        w = World()
        await w.functions.deploy("f", {"type": "schedule", "schedule": "rate(1 minute)"})
        await w.drive(T0 + 330)
        assert await w.invoker.times("f") == every(60, T0 + 60, T0 + 300)
        state = await w.state("f", "schedule-0")
        assert state is not None
        assert (state.created_at, state.last_fire) == (T0, T0 + 300)
        # Each submission happened at its scheduled time, not later.
        assert [i.created_at for i in await w.invoker.invocations()] == [
            T0 + 60 * k for k in range(1, 6)
        ]

    run(body)


def test_the_event_and_the_submission() -> None:
    async def body() -> None:
        w = World()
        await w.functions.deploy(
            "f",
            {
                "type": "schedule",
                "schedule": "*/5 * * * *",
                "name": "tick",
                "payload": {"job": "report", "n": [1, 2]},
            },
        )
        await w.drive(T0 + 300)
        [invocation] = await w.invoker.invocations("f")
        key = idempotency_key("f", "tick", T0 + 300)
        assert invocation.source == "schedule:tick"
        assert invocation.idempotency_key == key
        event = json.loads(invocation.payload)
        assert event == {
            "version": "0",
            "id": event_id(key),
            "detail-type": "Scheduled Event",
            "source": "aws.events",
            "account": "000000000000",
            "time": "2026-01-05T00:05:00Z",
            "region": "us-east-1",
            "resources": ["arn:aws:events:us-east-1:000000000000:rule/f-tick"],
            "detail": {"job": "report", "n": [1, 2]},
        }

    run(body)


def test_several_functions_and_triggers() -> None:
    async def body() -> None:
        w = World()
        await w.functions.deploy(
            "a",
            {"type": "schedule", "schedule": "rate(1 minute)", "name": "fast"},
            {"type": "schedule", "schedule": "rate(2 minutes)", "name": "slow"},
        )
        await w.functions.deploy("b", {"type": "schedule", "schedule": "*/3 * * * *"})
        await w.drive(T0 + 360)
        sources = [(i.function, i.source) for i in await w.invoker.invocations()]
        assert sources.count(("a", "schedule:fast")) == 6
        assert sources.count(("a", "schedule:slow")) == 3
        assert sources.count(("b", "schedule:schedule-0")) == 2

    run(body)


# -- restarts and crashes --------------------------------------------------------------


def test_restart_neither_double_fires_nor_drops() -> None:
    async def body() -> None:
        w = World()
        await w.functions.deploy("f", {"type": "schedule", "schedule": "rate(1 minute)"})
        await w.drive(T0 + 150)
        await w.restart()
        await w.drive(T0 + 150)  # the same instant again: nothing new
        assert await w.invoker.times() == every(60, T0 + 60, T0 + 120)
        await w.restart()
        await w.drive(T0 + 330)
        assert await w.invoker.times() == every(60, T0 + 60, T0 + 300)
        assert all(created for _, created in w.invoker.submits)

    run(body)


class CrashingStore(MemoryStore):
    """A store whose next ``save_trigger_state`` calls die, as a kill -9 would."""

    crash = False

    async def save_trigger_state(self, function: str, name: str, **kw: Any) -> None:
        if self.crash:
            raise RuntimeError("killed")
        await super().save_trigger_state(function, name, **kw)


def test_crash_between_submit_and_persist_is_deduplicated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def body() -> None:
        clock = Clock(T0)
        store = CrashingStore(clock)
        w = World(store, clock=clock)
        await w.functions.deploy("f", {"type": "schedule", "schedule": "rate(1 minute)"})
        await w.drive(T0 + 59)
        clock.t = T0 + 60
        store.crash = True
        await w.runner.step()  # T0+60: submitted, then "killed" before the save
        assert [created for _, created in w.invoker.submits] == [True]
        state = await w.state("f", "schedule-0")
        assert state is not None and state.last_fire is None

        store.crash = False
        clock.t = T0 + 70
        await w.restart()
        await w.runner.step()  # decides T0+60 again: same key, the queue deduplicates
        assert [created for _, created in w.invoker.submits] == [True, False]
        assert await w.invoker.times() == [iso(T0 + 60)]
        state = await w.state("f", "schedule-0")
        assert state is not None and state.last_fire == T0 + 60
        await w.drive(T0 + 180)
        assert await w.invoker.times() == every(60, T0 + 60, T0 + 180)

    with caplog.at_level(logging.ERROR, "nimbus.triggers"):
        run(body)


def test_restart_with_the_sqlite_store(tmp_path: Path) -> None:
    async def body() -> None:
        store = SqliteStore(tmp_path / "nimbus.db")
        await store.open()
        w = World(store)
        version = await w.functions.deploy("f", {"type": "schedule", "schedule": "rate(1 minute)"})
        t0 = version.created_at  # SqliteStore stamps versions with the real clock
        w.clock.t = t0
        await w.drive(t0 + 150)
        await store.close()

        store = SqliteStore(tmp_path / "nimbus.db")  # the process restarted
        await store.open()
        w.store = store
        w.functions = FakeFunctions(store)
        w.functions.records = {r.name: r for r in await store.load()}
        await w.restart()
        state = await w.state("f", "schedule-0")
        assert state == TriggerState("f", "schedule-0", t0, t0 + 120, "rate(1 minute)\nUTC")
        await w.drive(t0 + 150)
        await w.drive(t0 + 240)
        assert await w.invoker.times() == every(60, t0 + 60, t0 + 240)
        assert all(created for _, created in w.invoker.submits)
        await store.close()

    run(body)


# -- downtime: catch_up ----------------------------------------------------------------


@pytest.mark.parametrize("catch_up", ["none", "once"])
def test_downtime(catch_up: str) -> None:
    async def body() -> None:
        w = World()
        await w.functions.deploy(
            "f", {"type": "schedule", "schedule": "rate(5 minutes)", "catch_up": catch_up}
        )
        await w.drive(T0 + 310)
        assert await w.invoker.times() == [iso(T0 + 300)]
        # Down from T0+310 to T0+1080: due times 600 and 900 pass; 900 is 180 s late.
        w.clock.t = T0 + 1080
        await w.restart()
        await w.drive(T0 + 1500)
        missed = [] if catch_up == "none" else [iso(T0 + 900)]
        assert await w.invoker.times() == [iso(T0 + 300), *missed, iso(T0 + 1200), iso(T0 + 1500)]
        state = await w.state("f", "schedule-0")
        assert state is not None and state.last_fire == T0 + 1500

    run(body)


def test_a_short_outage_within_the_grace_still_fires_the_latest() -> None:
    async def body() -> None:
        w = World()
        await w.functions.deploy("f", {"type": "schedule", "schedule": "rate(1 minute)"})
        await w.drive(T0 + 60)
        w.clock.t = T0 + 250  # 120 and 180 missed; 240 is 10 s late: current
        await w.restart()
        await w.drive(T0 + 300)
        assert await w.invoker.times() == [iso(T0 + 60), iso(T0 + 240), iso(T0 + 300)]

    run(body)


# -- overlap ---------------------------------------------------------------------------


async def _three_fires(overlap: str) -> World:
    w = World()
    await w.functions.deploy(
        "f", {"type": "schedule", "schedule": "rate(1 minute)", "overlap": overlap}
    )
    await w.drive(T0 + 180)  # nothing runs the invocations: each stays queued
    return w


def test_overlap_allow() -> None:
    async def body() -> None:
        w = await _three_fires("allow")
        assert [i.status for i in await w.invoker.invocations()] == ["queued"] * 3

    run(body)


def test_overlap_forbid_skips_while_a_run_is_going(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        w = await _three_fires("forbid")
        [first] = await w.invoker.invocations()
        assert json.loads(first.payload)["time"] == iso(T0 + 60)
        state = await w.state("f", "schedule-0")
        assert state is not None and state.last_fire == T0 + 180  # skipped, not retried
        [lease] = await w.invoker.queue.lease(now=w.clock.t, lease_for=60)
        await w.invoker.queue.succeed(lease, b"{}", now=w.clock.t)
        await w.drive(T0 + 240)
        assert await w.invoker.times() == [iso(T0 + 60), iso(T0 + 240)]

    with caplog.at_level(logging.INFO, "nimbus.triggers"):
        run(body)
    assert "skipped: 1 earlier run(s) still going (overlap: forbid)" in caplog.text


def test_overlap_replace_cancels_queued_runs() -> None:
    async def body() -> None:
        w = await _three_fires("replace")
        statuses = [
            (json.loads(i.payload)["time"], i.status) for i in await w.invoker.invocations()
        ]
        assert statuses == [
            (iso(T0 + 60), "cancelled"),
            (iso(T0 + 120), "cancelled"),
            (iso(T0 + 180), "queued"),
        ]

    run(body)


def test_overlap_replace_cannot_cancel_a_running_one() -> None:
    async def body() -> None:
        w = World()
        await w.functions.deploy(
            "f", {"type": "schedule", "schedule": "rate(1 minute)", "overlap": "replace"}
        )
        # Something else of this function is queued too: never touched.
        await w.invoker.submit("f", b"{}", source="api")
        await w.drive(T0 + 60)
        leases = await w.invoker.queue.lease(now=w.clock.t, lease_for=600, limit=10)
        assert len(leases) == 2  # both now running
        await w.drive(T0 + 120)
        by_source = [(i.source, i.status) for i in await w.invoker.invocations()]
        assert by_source == [
            ("api", "running"),
            ("schedule:schedule-0", "running"),
            ("schedule:schedule-0", "queued"),
        ]

    run(body)


def test_replace_after_a_crash_keeps_the_run_being_resubmitted() -> None:
    """The run submitted just before a crash is re-decided; replace must not cancel it."""

    async def body() -> None:
        clock = Clock(T0)
        store = CrashingStore(clock)
        w = World(store, clock=clock)
        await w.functions.deploy(
            "f", {"type": "schedule", "schedule": "rate(1 minute)", "overlap": "replace"}
        )
        await w.drive(T0 + 60 - 1)
        clock.t = T0 + 60
        store.crash = True
        await w.runner.step()
        store.crash = False
        clock.t = T0 + 61
        await w.restart()
        await w.runner.step()
        assert [i.status for i in await w.invoker.invocations()] == ["queued"]

    run(body)


# -- time zones and DST ----------------------------------------------------------------


def test_cron_in_a_time_zone() -> None:
    async def body() -> None:
        start = at("2026-01-05T00:00:00")
        w = World(t0=start)
        await w.functions.deploy(
            "f", {"type": "schedule", "schedule": "0 9 * * *", "timezone": "America/New_York"}
        )
        await w.drive(start + 3 * 86400)
        assert await w.invoker.times() == [
            "2026-01-05T14:00:00Z",
            "2026-01-06T14:00:00Z",
            "2026-01-07T14:00:00Z",
        ]

    run(body)


def test_dst_spring_forward_and_fall_back_through_the_runner() -> None:
    async def body() -> None:
        paris = "Europe/Paris"
        spec = {"type": "schedule", "schedule": "30 2 * * *", "timezone": paris}
        # Spring forward, 2026-03-29: 02:30 does not exist that day.
        start = at("2026-03-27T12:00:00", paris)
        w = World(t0=start)
        await w.functions.deploy("f", spec)
        await w.drive(at("2026-03-31T12:00:00", paris))
        assert await w.invoker.times() == [
            "2026-03-28T01:30:00Z",  # 02:30 CET
            "2026-03-30T00:30:00Z",  # 02:30 CEST
            "2026-03-31T00:30:00Z",
        ]
        # Fall back, 2026-10-25: 02:30 happens twice; it runs once, at the first.
        start = at("2026-10-24T12:00:00", paris)
        w = World(t0=start)
        await w.functions.deploy("f", spec)
        await w.drive(at("2026-10-26T12:00:00", paris))
        assert await w.invoker.times() == [
            "2026-10-25T00:30:00Z",  # 02:30 CEST; not again at 01:30Z (02:30 CET)
            "2026-10-26T01:30:00Z",
        ]

    run(body)


# -- changing triggers -----------------------------------------------------------------


def test_a_changed_schedule_starts_afresh() -> None:
    async def body() -> None:
        w = World()
        await w.functions.deploy(
            "f", {"type": "schedule", "schedule": "rate(1 minute)", "name": "t"}
        )
        await w.drive(T0 + 90)
        await w.functions.deploy(
            "f", {"type": "schedule", "schedule": "rate(10 minutes)", "name": "t"}
        )
        await w.drive(T0 + 1400)
        # Anchored to the change (T0+90), not to the trigger's first version.
        assert await w.invoker.times() == [iso(T0 + 60), iso(T0 + 690), iso(T0 + 1290)]
        state = await w.state("f", "t")
        assert state is not None and state.created_at == T0 + 90

    run(body)


def test_a_changed_payload_keeps_the_timing() -> None:
    async def body() -> None:
        w = World()
        base = {"type": "schedule", "schedule": "rate(1 minute)", "name": "t"}
        await w.functions.deploy("f", {**base, "payload": {"v": 1}})
        await w.drive(T0 + 90)
        await w.functions.deploy("f", {**base, "payload": {"v": 2}, "catch_up": "once"})
        await w.drive(T0 + 120)
        events = await w.invoker.events()
        assert [(e["time"], e["detail"]) for e in events] == [
            (iso(T0 + 60), {"v": 1}),
            (iso(T0 + 120), {"v": 2}),
        ]

    run(body)


def test_a_removed_trigger_stops_and_is_forgotten() -> None:
    async def body() -> None:
        w = World()
        await w.functions.deploy(
            "f",
            {"type": "schedule", "schedule": "rate(1 minute)", "name": "keep"},
            {"type": "schedule", "schedule": "rate(1 minute)", "name": "gone"},
        )
        await w.drive(T0 + 90)
        await w.functions.deploy(
            "f", {"type": "schedule", "schedule": "rate(1 minute)", "name": "keep"}
        )
        await w.drive(T0 + 200)
        assert await w.state("f", "gone") is None
        gone = [i for i in await w.invoker.invocations() if i.source == "schedule:gone"]
        assert len(gone) == 1
        # Back under the same name: a new trigger, anchored to when it came back.
        await w.functions.deploy(
            "f",
            {"type": "schedule", "schedule": "rate(1 minute)", "name": "keep"},
            {"type": "schedule", "schedule": "rate(1 minute)", "name": "gone"},
        )
        await w.drive(T0 + 300)
        gone = [i for i in await w.invoker.invocations() if i.source == "schedule:gone"]
        assert [json.loads(i.payload)["time"] for i in gone] == [iso(T0 + 60), iso(T0 + 260)]

    run(body)


def test_a_deleted_function_stops_and_a_new_one_starts_afresh() -> None:
    async def body() -> None:
        w = World()
        trigger = {"type": "schedule", "schedule": "rate(1 minute)"}
        await w.functions.deploy("f", trigger)
        await w.drive(T0 + 90)
        await w.functions.delete("f")
        assert await w.state("f", "schedule-0") is None
        await w.drive(T0 + 200)
        await w.functions.deploy("f", trigger)  # same name, a new function at T0+200
        await w.drive(T0 + 300)
        assert await w.invoker.times() == [iso(T0 + 60), iso(T0 + 260)]
        state = await w.state("f", "schedule-0")
        assert state is not None and state.created_at == T0 + 200

    run(body)


# -- failures --------------------------------------------------------------------------


def test_a_failed_submission_is_retried_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        w = World()
        await w.functions.deploy("f", {"type": "schedule", "schedule": "rate(1 minute)"})
        await w.drive(T0 + 59)
        w.invoker.fail = ServiceException("queue unavailable")
        for t in range(60, 70):
            w.clock.t = T0 + t
            assert await w.runner.step() == T0 + t + 1  # try again in a second
        state = await w.state("f", "schedule-0")
        assert state is not None and state.last_fire is None  # not dealt with yet
        w.invoker.fail = None
        await w.drive(T0 + 120)
        assert await w.invoker.times() == [iso(T0 + 60), iso(T0 + 120)]

    with caplog.at_level(logging.INFO, "nimbus.triggers"):
        run(body)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "queue unavailable" in warnings[0].getMessage()
    assert "submitting works again" in caplog.text


# -- the loop and the API's view -------------------------------------------------------


def test_the_loop_runs_and_wakes_on_a_deploy() -> None:
    async def body() -> None:
        w = World()
        w.runner = ScheduleRunner(w.functions, w.invoker, w.store, clock=w.clock, max_sleep=0.01)
        await w.runner.start()
        try:
            await w.functions.deploy("f", {"type": "schedule", "schedule": "rate(1 minute)"})
            w.clock.t = T0 + 60
            for _ in range(200):
                if await w.invoker.times():
                    break
                await asyncio.sleep(0.01)
            assert await w.invoker.times() == [iso(T0 + 60)]
        finally:
            await w.runner.close()

        # A long sleep is cut short by a deploy: the new trigger's state appears at once.
        w.functions.listeners.clear()
        w.runner = ScheduleRunner(w.functions, w.invoker, w.store, clock=w.clock, max_sleep=30)
        await w.runner.start()
        try:
            await asyncio.sleep(0.05)
            await w.functions.deploy("g", {"type": "schedule", "schedule": "rate(1 hour)"})
            for _ in range(100):
                if await w.state("g", "schedule-0") is not None:
                    break
                await asyncio.sleep(0.01)
            assert await w.state("g", "schedule-0") is not None
        finally:
            await w.runner.close()

    run(body)


def test_describe_gives_next_and_last_fire() -> None:
    async def body() -> None:
        w = World()
        version = await w.functions.deploy(
            "f",
            {"type": "schedule", "schedule": "rate(1 minute)", "name": "a"},
            {"type": "schedule", "schedule": "0 12 * * *", "name": "b"},
        )
        [a, b] = w.runner.describe(version)
        assert (a["name"], a["next_fire"], a["last_fire"]) == ("a", T0 + 60, None)
        assert (b["next_fire"], b["last_fire"]) == (at("2026-01-05T12:00:00"), None)
        assert a["schedule"] == "rate(1 minute)" and a["type"] == "schedule"
        await w.drive(T0 + 130)
        [a, b] = w.runner.describe(version)
        assert (a["next_fire"], a["last_fire"]) == (T0 + 180, T0 + 120)

    run(body)


# -- the store ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_trigger_state_in_the_store(kind: str, tmp_path: Path) -> None:
    async def body() -> None:
        def make() -> FunctionStore:
            return MemoryStore() if kind == "memory" else SqliteStore(tmp_path / "n.db")

        store = make()
        await store.open()
        for name in ("f", "g"):
            await store.publish(parse_spec({"name": name}), "0" * 64, None, create=True)
        assert await store.trigger_states() == {}
        await store.save_trigger_state("f", "a", created_at=1.5, last_fire=None, fingerprint="x")
        await store.save_trigger_state("f", "b", created_at=2.0, last_fire=3.25)
        await store.save_trigger_state("g", "a", created_at=4.0, last_fire=5.0)
        await store.save_trigger_state("f", "a", created_at=1.5, last_fire=61.5, fingerprint="x")
        await store.save_trigger_state("nope", "a", created_at=1.0, last_fire=None)  # ignored
        await store.delete_trigger_state("g", "a")
        await store.delete_trigger_state("g", "missing")
        expected = {
            ("f", "a"): TriggerState("f", "a", 1.5, 61.5, "x"),
            ("f", "b"): TriggerState("f", "b", 2.0, 3.25, ""),
        }
        assert await store.trigger_states() == expected
        if kind == "sqlite":
            await store.close()
            store = make()
            await store.open()
            assert await store.trigger_states() == expected
        await store.delete("f")
        assert await store.trigger_states() == {}
        await store.close()

    run(body)
