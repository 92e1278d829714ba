"""The scheduler's admission logic and the autoscaler's decisions, with a fake executor
and a synthetic clock (the real executor is covered end to end)."""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import pytest

from nimbus.errors import TooManyRequests
from nimbus.executor.core import InitFailed, State
from nimbus.models import FunctionSpec, ScalingSpec, Version
from nimbus.scheduling import IdleInstance, PoolState, Scheduler, decide


def version(name: str = "f", number: int = 1, **scaling: Any) -> Version:
    spec = FunctionSpec(name=name, scaling=ScalingSpec(**scaling))
    return Version(spec, number, "0" * 64, None, 0.0)


class FakeInstance:
    _ids = itertools.count()

    def __init__(self, version: Version) -> None:
        self.id = f"i{next(self._ids)}"
        self.version = version
        self.state = State.IDLE
        self.last_used = 0.0
        self.stopped = False
        #: The state the instance was in each time the scheduler froze it.
        self.freezes: list[State] = []

    def prewarmed(self) -> None:
        pass

    def freeze(self) -> None:
        self.freezes.append(self.state)

    @property
    def alive(self) -> bool:
        return self.state is not State.DEAD

    async def stop(self) -> None:
        self.stopped = True
        self.state = State.DEAD


class FakeExecutor:
    def __init__(self, fail: bool = False) -> None:
        self.started: list[FakeInstance] = []
        self.fail = fail
        self.gate: asyncio.Event | None = None

    async def start(self, version: Version) -> FakeInstance:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise InitFailed(b"{}", 1.0, "Runtime.ImportModuleError")
        inst = FakeInstance(version)
        self.started.append(inst)
        return inst


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(executor: FakeExecutor | None = None, **kw: Any) -> tuple[Scheduler, FakeExecutor, Clock]:
    ex = executor or FakeExecutor()
    clock = Clock()
    params = {"max_instances": 100, "queue_depth": 10, "queue_timeout": 5.0, **kw}
    return Scheduler(ex, clock=clock, **params), ex, clock  # type: ignore[arg-type]


# -- decide ---------------------------------------------------------------------------------


def test_decide_stops_instances_idle_past_keep_warm_oldest_first() -> None:
    state = PoolState(
        idle=(IdleInstance("a", 0), IdleInstance("b", 50), IdleInstance("c", 90)),
        busy=0,
        starting=0,
        waiting=0,
    )
    d = decide(state, ScalingSpec(keep_warm=40), now=100)
    assert d.stop == ("a", "b")
    assert d.start == 0


def test_decide_keeps_min_instances_and_starts_up_to_min() -> None:
    state = PoolState(
        idle=(IdleInstance("a", 0), IdleInstance("b", 0)), busy=0, starting=0, waiting=0
    )
    assert decide(state, ScalingSpec(min=1, keep_warm=10), now=100).stop == ("a",)
    empty = PoolState(idle=(), busy=1, starting=0, waiting=0)
    assert decide(empty, ScalingSpec(min=3), now=0).start == 2


def test_decide_retired_pool_stops_all_idle_and_starts_nothing() -> None:
    state = PoolState(idle=(IdleInstance("a", 99),), busy=1, starting=0, waiting=0, retired=True)
    d = decide(state, ScalingSpec(min=5), now=100)
    assert d == type(d)(stop=("a",), start=0)


# -- admission ------------------------------------------------------------------------------


def test_scale_from_zero_then_reuse_warm_instance() -> None:
    async def run() -> None:
        s, ex, _ = make()
        v = version()
        a = await s.acquire(v)
        assert len(ex.started) == 1 and a.state is State.BUSY
        s.release(a)
        assert s.counts("f").idle == 1
        b = await s.acquire(v)
        assert b is a and len(ex.started) == 1

    asyncio.run(run())


def test_an_instance_is_frozen_when_it_goes_idle_not_when_handed_to_a_waiter() -> None:
    async def run() -> None:
        s, _, _ = make(queue_depth=1)
        v = version(max=1)
        held = await s.acquire(v)
        assert held.freezes == []  # started for a request: never frozen before it
        waiter = asyncio.create_task(s.acquire(v))
        await asyncio.sleep(0)
        s.release(held)
        assert await waiter is held
        await asyncio.sleep(0)
        assert held.freezes == []  # no idle moment: nothing to freeze
        s.release(held)
        await asyncio.sleep(0)  # a loop turn later: after the caller's response
        assert held.freezes == [State.IDLE]  # frozen only once idle

    asyncio.run(run())


def test_a_prewarmed_instance_is_frozen_once_its_init_is_done() -> None:
    async def run() -> None:
        s, ex, _ = make()
        s.ensure(version(min=1))
        await s.tick()
        for _ in range(100):  # loop turns, not time: the prewarm is a task of the loop
            if s.counts("f").idle == 1:
                break
            await asyncio.sleep(0)
        assert s.counts("f").idle == 1
        await asyncio.sleep(0)  # the freeze comes a loop turn after the release
        assert ex.started[0].freezes == [State.IDLE]

    asyncio.run(run())


def test_max_instances_per_function_then_queue_then_429() -> None:
    async def run() -> None:
        s, ex, _ = make(queue_depth=1, queue_timeout=0.2)
        v = version(max=1)
        held = await s.acquire(v)
        waiter = asyncio.create_task(s.acquire(v))
        await asyncio.sleep(0)
        with pytest.raises(TooManyRequests) as refused:
            await s.acquire(v)  # queue (depth 1) is full
        assert refused.value.retry_after >= 1
        s.release(held)
        assert await waiter is held  # handed straight to the waiter
        with pytest.raises(TooManyRequests, match="within"):
            await s.acquire(v)  # waits 0.2 s, nobody releases
        assert len(ex.started) == 1

    asyncio.run(run())


def test_node_cap_evicts_idle_instance_of_another_function() -> None:
    async def run() -> None:
        s, _ex, _ = make(max_instances=1)
        a = await s.acquire(version("a"))
        s.release(a)
        b = await s.acquire(version("b"))
        assert b.version.name == "b"
        await asyncio.sleep(0)
        assert a.stopped and s.total == 1

    asyncio.run(run())


def test_node_cap_with_everything_busy_queues_until_capacity_frees() -> None:
    async def run() -> None:
        s, _ex, _ = make(max_instances=1, queue_timeout=2)
        a = await s.acquire(version("a"))
        waiting = asyncio.create_task(s.acquire(version("b")))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        a.state = State.DEAD  # e.g. it timed out and was killed
        s.release(a)
        b = await waiting
        assert b.version.name == "b" and s.total == 1

    asyncio.run(run())


def test_init_failure_frees_the_slot() -> None:
    async def run() -> None:
        s, _ex, _ = make(FakeExecutor(fail=True))
        with pytest.raises(InitFailed):
            await s.acquire(version())
        assert s.total == 0 and s.counts("f").total == 0

    asyncio.run(run())


def test_idle_instances_stop_after_keep_warm_and_pool_goes_to_zero() -> None:
    async def run() -> None:
        s, _ex, clock = make()
        v = version(keep_warm=60)
        inst = await s.acquire(v)
        s.release(inst)
        clock.now += 59
        await s.tick()
        assert not inst.stopped
        clock.now += 1
        await s.tick()
        await asyncio.sleep(0)
        assert inst.stopped and s.total == 0 and s.counts("f").total == 0

    asyncio.run(run())


def test_keep_warm_zero_stops_on_release() -> None:
    async def run() -> None:
        s, _ex, _ = make()
        inst = await s.acquire(version(keep_warm=0))
        s.release(inst)
        await asyncio.sleep(0)
        assert inst.stopped and s.total == 0

    asyncio.run(run())


def test_min_instances_are_prewarmed_by_tick() -> None:
    async def run() -> None:
        s, _ex, _ = make()
        v = version(min=2)
        s._pool(v)  # a deployed function with min > 0 has a pool
        await s.tick()
        await asyncio.sleep(0.01)
        assert s.counts("f").idle == 2

    asyncio.run(run())


def test_retire_stops_idle_now_and_busy_on_release_and_refuses_waiters() -> None:
    async def run() -> None:
        s, _ex, _ = make(queue_timeout=2)
        v1 = version(number=1, max=2)
        busy = await s.acquire(v1)
        idle = await s.acquire(v1)
        s.release(idle)
        s.retire("f", keep=2)
        await asyncio.sleep(0)
        assert idle.stopped and not busy.stopped
        s.release(busy)
        await asyncio.sleep(0)
        assert busy.stopped and s.total == 0
        fresh = await s.acquire(version(number=2))
        assert fresh.version.number == 2

    asyncio.run(run())


def test_drain_replaces_every_instance_without_refusing_anyone() -> None:
    async def run() -> None:
        s, ex, _ = make()
        v1 = version(number=1, max=3)
        busy = await s.acquire(v1)
        idle = await s.acquire(v1)
        ex.gate = asyncio.Event()  # a third one is starting when the drain comes
        starting = asyncio.create_task(s.acquire(v1))
        await asyncio.sleep(0)
        s.release(idle)
        s.drain("f")
        await asyncio.sleep(0)
        assert idle.stopped and not busy.stopped
        # The same version keeps serving: a new request gets a new instance.
        ex.gate.set()
        late = await starting
        fresh = await s.acquire(v1)
        assert fresh not in (busy, idle, late) and not fresh.stopped
        for inst in (busy, late):  # both began before the drain: they serve, then stop
            s.release(inst)
        s.release(fresh)
        await asyncio.sleep(0)
        assert busy.stopped and late.stopped and not fresh.stopped
        assert await s.acquire(v1) is fresh

    asyncio.run(run())


def test_waiter_that_times_out_after_being_served_gives_instance_back() -> None:
    async def run() -> None:
        s, _ex, _ = make(queue_timeout=5)
        v = version(max=1)
        held = await s.acquire(v)
        task = asyncio.create_task(s.acquire(v))
        await asyncio.sleep(0)
        s.release(held)  # served...
        task.cancel()  # ...but the caller went away before running
        with pytest.raises(asyncio.CancelledError):
            await task
        assert s.counts("f").idle == 1 and s.counts("f").busy == 0

    asyncio.run(run())


def test_close_stops_everything() -> None:
    async def run() -> None:
        s, _ex, _ = make()
        a = await s.acquire(version("a"))
        b = await s.acquire(version("b"))
        s.release(b)
        await s.close()
        assert a.stopped and b.stopped

    asyncio.run(run())


def test_decide_keeps_one_spare_while_busy() -> None:
    busy = PoolState(idle=(), busy=3, starting=0, waiting=0)
    assert decide(busy, ScalingSpec(max=10), now=0).start == 1
    # Not when one is already starting or idle, not at max, not for keep_warm 0.
    assert (
        decide(PoolState(idle=(), busy=3, starting=1, waiting=0), ScalingSpec(), now=0).start == 0
    )
    assert (
        decide(PoolState(idle=(), busy=10, starting=0, waiting=0), ScalingSpec(max=10), now=0).start
        == 0
    )
    assert decide(busy, ScalingSpec(keep_warm=0), now=0).start == 0
    idle = PoolState(idle=(IdleInstance("a", 0),), busy=3, starting=0, waiting=0)
    assert decide(idle, ScalingSpec(), now=0).start == 0


def test_taking_the_last_idle_instance_prewarms_a_spare() -> None:
    async def run() -> None:
        s, ex, _ = make()
        v = version(max=5)
        a = await s.acquire(v)  # a cold start, nothing more
        s.release(a)
        await asyncio.sleep(0.01)
        assert len(ex.started) == 1
        assert await s.acquire(v) is a  # takes the last idle one: a spare starts
        await asyncio.sleep(0.01)
        assert len(ex.started) == 2 and s.counts("f").idle == 1
        b = await s.acquire(v)  # takes the spare: another spare starts
        await asyncio.sleep(0.01)
        assert b is not a and len(ex.started) == 3 and s.counts("f").idle == 1

    asyncio.run(run())


def test_ensure_makes_a_pool_for_min_instances() -> None:
    async def run() -> None:
        s, _, _ = make()
        s.ensure(version("zero"))
        s.ensure(version("two", min=2))
        await s.tick()
        await asyncio.sleep(0.01)
        assert s.counts("zero").total == 0 and s.counts("two").idle == 2

    asyncio.run(run())
