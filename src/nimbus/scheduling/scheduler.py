"""The scheduler: who gets which instance, when one starts, when one stops.

Each function version has a :class:`_Pool`. ``acquire()`` takes a warm idle
instance, else starts one (scale from zero) while the function's
``scaling.max`` and the node's ``max_instances`` allow, else waits in a
bounded queue, else refuses with :class:`~nimbus.errors.TooManyRequests`.
``release()`` hands the instance straight to the oldest waiter, or back to the
idle list, frozen (:meth:`Instance.freeze`) until its next invocation thaws it.
A background loop applies :func:`decide` once a second: idle instances past
``keep_warm`` are stopped, so an idle function costs no process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from nimbus.errors import TooManyRequests
from nimbus.executor.core import Executor, InitFailed, Instance, State
from nimbus.models import Version
from nimbus.scheduling.autoscaler import IdleInstance, PoolState, decide

log = logging.getLogger("nimbus.scheduler")

PoolKey = tuple[str, int]


@dataclass(frozen=True, slots=True)
class PoolCounts:
    idle: int = 0
    busy: int = 0
    starting: int = 0

    @property
    def total(self) -> int:
        return self.idle + self.busy + self.starting


class _Pool:
    __slots__ = ("busy", "generation", "idle", "retired", "stale", "starting", "version", "waiters")

    def __init__(self, version: Version) -> None:
        self.version = version
        # Most recently used last: we take from the end, so the others age and idle out.
        self.idle: list[Instance] = []
        self.busy: set[Instance] = set()
        self.starting = 0
        self.waiters: deque[asyncio.Future[Instance | None]] = deque()
        self.retired = False
        #: Bumped by :meth:`Scheduler.drain`; instances of an older one are ``stale``:
        #: they finish their invocation and stop.
        self.generation = 0
        self.stale: set[Instance] = set()

    @property
    def total(self) -> int:
        return len(self.idle) + len(self.busy) + self.starting

    def state(self) -> PoolState:
        return PoolState(
            idle=tuple(IdleInstance(i.id, i.last_used) for i in self.idle),
            busy=len(self.busy),
            starting=self.starting,
            waiting=len(self.waiters),
            retired=self.retired,
        )


class Scheduler:
    def __init__(
        self,
        executor: Executor,
        *,
        max_instances: int,
        queue_depth: int,
        queue_timeout: float,
        clock: Callable[[], float] = time.monotonic,
        tick: float = 1.0,
    ) -> None:
        self._executor = executor
        self._max_instances = max_instances
        self._queue_depth = queue_depth
        self._queue_timeout = queue_timeout
        self._clock = clock
        self._tick = tick
        self._pools: dict[PoolKey, _Pool] = {}
        self._total = 0
        self._stopping: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- admission --------------------------------------------------------------------
    async def acquire(self, version: Version) -> Instance:
        """An instance of ``version``, busy and ours until :meth:`release`.

        Raises ``TooManyRequests`` when none can be had in time and
        :class:`~nimbus.executor.InitFailed` when a new instance's init fails.
        """
        pool = self._pool(version)
        if pool.idle:
            inst = pool.idle.pop()
            inst.state = State.BUSY
            pool.busy.add(inst)
            if not pool.idle:
                self._apply(pool, self._clock())  # the last idle one: maybe a spare
            return inst
        if self._can_start(pool):
            return await self._start(pool)
        if len(pool.waiters) >= self._queue_depth:
            raise TooManyRequests(
                f"function {version.name!r} is at its concurrency limit "
                f"({version.spec.scaling.max}) and {len(pool.waiters)} requests are waiting",
                retry_after=1,
            )
        waiter: asyncio.Future[Instance | None] = asyncio.get_running_loop().create_future()
        pool.waiters.append(waiter)
        try:
            async with asyncio.timeout(self._queue_timeout):
                served = await waiter
        except TimeoutError:
            self._abandon(pool, waiter)
            raise TooManyRequests(
                f"function {version.name!r} had no free instance within {self._queue_timeout:g} s",
                retry_after=1,
            ) from None
        except asyncio.CancelledError:
            self._abandon(pool, waiter)
            raise
        if served is None:  # a slot was reserved for us: start our own instance
            return await self._start(pool, reserved=True)
        return served

    def _abandon(self, pool: _Pool, waiter: asyncio.Future[Instance | None]) -> None:
        """A waiter gave up; if it had already been served, undo that."""
        with contextlib.suppress(ValueError):
            pool.waiters.remove(waiter)
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            inst = waiter.result()
            if inst is None:
                pool.starting -= 1
                self._total -= 1
                self._wake_for_capacity()
            else:
                self.release(inst)

    def release(self, inst: Instance) -> None:
        """Give an instance back after an invocation (dead ones are cleaned up)."""
        pool = self._pools.get((inst.version.name, inst.version.number))
        if pool is None or inst not in pool.busy:
            self._stop_in_background(inst)
            return
        if not inst.alive or pool.retired or inst in pool.stale:
            pool.stale.discard(inst)
            pool.busy.discard(inst)
            self._forget(inst)
            self._stop_in_background(inst)
            self._wake_for_capacity()
            return
        while pool.waiters:
            waiter = pool.waiters.popleft()
            if not waiter.done():
                waiter.set_result(inst)  # stays busy: handed over directly
                return
        pool.busy.discard(inst)
        scaling = inst.version.spec.scaling
        if scaling.keep_warm == 0 and pool.total >= scaling.min:
            self._forget(inst)
            self._stop_in_background(inst)
            self._wake_for_capacity()
            return
        inst.state = State.IDLE
        inst.last_used = self._clock()
        pool.idle.append(inst)
        # Its invocation is over, output and all (Instance.invoke waited). Frozen a loop
        # turn later, once the caller has written its response; skipped if it is busy again.
        asyncio.get_running_loop().call_soon(inst.freeze)

    # -- lifecycle ---------------------------------------------------------------------
    def retire(self, name: str, keep: int | None = None) -> None:
        """Retire every pool of ``name`` except version ``keep``: idle instances stop
        now, busy ones when they are released, waiters are told to retry."""
        for (fname, number), pool in list(self._pools.items()):
            if fname != name or number == keep:
                continue
            pool.retired = True
            for inst in pool.idle:
                self._forget(inst)
                self._stop_in_background(inst)
            pool.idle.clear()
            while pool.waiters:
                waiter = pool.waiters.popleft()
                if not waiter.done():
                    waiter.set_exception(
                        TooManyRequests(f"function {name!r} was updated; retry", retry_after=0)
                    )
            if pool.total == 0:
                del self._pools[(fname, number)]
        self._wake_for_capacity()

    def drain(self, name: str) -> None:
        """Replace every instance of ``name`` without refusing anyone: idle instances
        stop now, busy and starting ones after their invocation; new requests start new
        instances (a secret they read changed, say)."""
        for (fname, _), pool in self._pools.items():
            if fname != name:
                continue
            pool.generation += 1
            pool.stale.update(pool.busy)
            for inst in pool.idle:
                self._forget(inst)
                self._stop_in_background(inst)
            pool.idle.clear()
        self._wake_for_capacity()

    def counts(self, name: str) -> PoolCounts:
        idle = busy = starting = 0
        for (fname, _), pool in self._pools.items():
            if fname == name:
                idle += len(pool.idle)
                busy += len(pool.busy)
                starting += pool.starting
        return PoolCounts(idle, busy, starting)

    def instances(self) -> Iterator[Instance]:
        for pool in self._pools.values():
            yield from pool.idle
            yield from pool.busy

    @property
    def total(self) -> int:
        return self._total

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run(), name="autoscaler")

    async def close(self) -> None:
        """Stop the loop and every instance; wait until their processes are gone."""
        self._closed = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        victims = list(self.instances())
        for pool in self._pools.values():
            pool.retired = True
            pool.idle.clear()
            for waiter in pool.waiters:
                if not waiter.done():
                    waiter.set_exception(TooManyRequests("Nimbus is shutting down", retry_after=1))
        for inst in victims:
            self._stop_in_background(inst)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    def ensure(self, version: Version) -> None:
        """Make sure a pool exists for ``version`` (so ``scaling.min`` is honoured
        before its first request); a no-op for functions that scale to zero."""
        if version.spec.scaling.min > 0:
            self._pool(version)

    def prepare(self, version: Version) -> None:
        """A version was just published: let the executor get ready for its first
        instance (its function zygote)."""
        prepare = getattr(self._executor, "prepare", None)
        if prepare is not None:
            prepare(version)

    async def tick(self) -> None:
        """Apply one round of scaling decisions (the loop calls this every second)."""
        now = self._clock()
        for key, pool in list(self._pools.items()):
            self._apply(pool, now)
            if (
                pool.total == 0
                and not pool.waiters
                and (pool.retired or pool.version.spec.scaling.min == 0)
            ):
                del self._pools[key]
        self._wake_for_capacity()

    # -- internals ---------------------------------------------------------------------
    def _apply(self, pool: _Pool, now: float) -> None:
        decision = decide(pool.state(), pool.version.spec.scaling, now)
        if decision.stop:
            doomed = set(decision.stop)
            for inst in [i for i in pool.idle if i.id in doomed]:
                pool.idle.remove(inst)
                self._forget(inst)
                self._stop_in_background(inst)
        for _ in range(decision.start):
            if not self._can_start(pool):
                break
            self._prewarm(pool)

    def _pool(self, version: Version) -> _Pool:
        key = (version.name, version.number)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(version)
        return pool

    def _can_start(self, pool: _Pool) -> bool:
        if pool.retired or self._closed:
            return False
        if pool.total >= pool.version.spec.scaling.max:
            return False
        if self._total < self._max_instances:
            return True
        return self._evict_one(pool)

    def _evict_one(self, needy: _Pool) -> bool:
        """At the node cap: stop the least recently used idle instance of another pool."""
        candidates = [
            (inst.last_used, id(p), inst, p)
            for p in self._pools.values()
            if p is not needy
            for inst in p.idle
        ]
        if not candidates:
            return False
        _, _, inst, pool = min(candidates, key=lambda c: (c[0], c[1]))
        pool.idle.remove(inst)
        self._forget(inst)
        self._stop_in_background(inst)
        return True

    async def _start(self, pool: _Pool, *, reserved: bool = False) -> Instance:
        if not reserved:
            pool.starting += 1
            self._total += 1
        generation = pool.generation
        try:
            inst = await self._executor.start(pool.version)
        except BaseException:
            pool.starting -= 1
            self._total -= 1
            self._wake_for_capacity()
            raise
        pool.starting -= 1
        inst.state = State.BUSY
        pool.busy.add(inst)
        if pool.generation != generation:  # drained while it started: serve once, then stop
            pool.stale.add(inst)
        return inst

    def _prewarm(self, pool: _Pool) -> None:
        async def warm() -> None:
            try:
                inst = await self._start(pool)
            except InitFailed as e:
                log.warning("prewarming %s failed: %s", pool.version.name, e.error_type)
                return
            inst.prewarmed()  # its init happened before any request: the first one is warm
            self.release(inst)

        task = asyncio.get_running_loop().create_task(warm())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _forget(self, inst: Instance) -> None:
        self._total -= 1

    def _stop_in_background(self, inst: Instance) -> None:
        task = asyncio.get_running_loop().create_task(inst.stop())
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _wake_for_capacity(self) -> None:
        """Capacity freed: reserve a start for waiters (of any pool) that can now have one."""
        for pool in self._pools.values():
            while (
                pool.waiters
                and not pool.retired
                and self._total < self._max_instances
                and pool.total < pool.version.spec.scaling.max
            ):
                waiter = pool.waiters.popleft()
                if waiter.done():
                    continue
                pool.starting += 1
                self._total += 1
                waiter.set_result(None)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            try:
                await self.tick()
            except Exception:  # the loop must survive anything one round does
                log.exception("autoscaler round failed")
