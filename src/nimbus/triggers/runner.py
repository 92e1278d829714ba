"""``ScheduleRunner``: the one loop that fires schedule triggers through the async path.

The decisions are pure and live in :mod:`nimbus.triggers.schedule`; this module
applies them. It is the only place that reads the clock for schedules (the clock
is injected: tests move a synthetic one and call :meth:`ScheduleRunner.step`).

Each pass, for every schedule trigger of every function's current version:

1. its state (``created_at``, ``last_fire``) comes from the store; a trigger seen
   for the first time, or whose schedule or time zone changed, starts afresh
   with ``created_at`` = the time of the version that introduced it;
2. ``decide(spec, last_fire=, created_at=, now=)`` says which run is due;
3. :func:`~nimbus.triggers.schedule.overlap_action` against the trigger's runs
   still queued or running says fire, skip, or replace (cancel the queued ones
   of this trigger, then fire; a *running* one cannot be cancelled, so it
   keeps running alongside the new one);
4. the run is submitted to the :class:`~nimbus.asyncinvoke.AsyncInvoker` with an
   idempotency key derived from (function, trigger, scheduled time);
5. only then is ``last_fire`` persisted.

Why submit before persisting: a crash (kill -9) between the two makes the next
pass decide the same due time again and submit it again with the same key, which
the durable queue deduplicates. Persisting first would lose that run instead. So
a scheduled time is neither dropped nor run twice across restarts (the queue
keeps keys for its retention window, 24 h). The event's ``id`` is a uuid5 of the
key, so a run also recognises a duplicate delivery by itself.

A pass ends by sleeping until the earliest next fire time, at most
:data:`MAX_SLEEP` (so a wall clock that jumps is noticed soon); a function being
published or deleted wakes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import orjson

from nimbus.errors import InvalidParameterValue, NimbusError, ResourceNotFound
from nimbus.models import Account, FunctionRecord, TriggerState, Version
from nimbus.queue import Invocation, Queue
from nimbus.store import TriggerStateStore
from nimbus.triggers.schedule import (
    DEFAULT_GRACE,
    Fire,
    ScheduleSpec,
    decide,
    overlap_action,
    parse_schedule,
    scheduled_event,
)

log = logging.getLogger("nimbus.triggers")

#: The longest the loop sleeps between passes, seconds.
MAX_SLEEP = 1.0
#: Event ids are uuid5 of the idempotency key in this namespace.
EVENT_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "nimbus:schedule-trigger")


class FunctionSource(Protocol):
    """What the runner needs of :class:`nimbus.functions.Functions`."""

    def all(self) -> list[FunctionRecord]: ...

    def current(self, name: str) -> Version: ...

    def subscribe(self, listener: Callable[[str], None]) -> None: ...


class AsyncSubmitter(Protocol):
    """What the runner needs of :class:`nimbus.asyncinvoke.AsyncInvoker`."""

    @property
    def queue(self) -> Queue: ...

    async def submit(
        self,
        function: str,
        payload: bytes,
        *,
        idempotency_key: str | None = None,
        source: str = "api",
        headers: dict[str, str] | None = None,
    ) -> tuple[Invocation, bool]: ...

    async def running(self, function: str, source: str) -> int: ...


def source_of(trigger: str) -> str:
    """The ``source`` of the invocations a trigger submits."""
    return f"schedule:{trigger}"


def idempotency_key(function: str, trigger: str, scheduled_for: float) -> str:
    """The key a run is submitted with: one per (function, trigger, scheduled time)."""
    return f"schedule:{function}:{trigger}:{round(scheduled_for * 1000)}"


def event_id(key: str) -> str:
    """The event's ``id``: the same for every submission of the same run."""
    return str(uuid.uuid5(EVENT_NAMESPACE, key))


def fingerprint(spec: ScheduleSpec) -> str:
    """What, when it changes, makes a trigger start afresh: its schedule and time zone."""
    return f"{spec.schedule}\n{spec.timezone}"


class ScheduleRunner:
    """Fires the schedule triggers of every function's current version. One asyncio task."""

    def __init__(
        self,
        functions: FunctionSource,
        async_invoker: AsyncSubmitter,
        store: TriggerStateStore,
        *,
        clock: Callable[[], float] = time.time,
        max_sleep: float = MAX_SLEEP,
        grace: float = DEFAULT_GRACE,
        account: Account | None = None,
    ) -> None:
        self._account = account or Account()
        self._functions = functions
        self._invoker = async_invoker
        self._store = store
        self._clock = clock
        self._max_sleep = max_sleep
        self._grace = grace
        #: The persisted states, mirrored (the runner is their only writer).
        self._states: dict[tuple[str, str], TriggerState] = {}
        #: Parsed triggers per function: (version number, version time, specs).
        self._specs: dict[str, tuple[int, float, tuple[ScheduleSpec, ...]]] = {}
        #: Triggers whose last submission failed (logged once until they recover).
        self._failing: set[tuple[str, str]] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        functions.subscribe(self._changed)

    # -- lifecycle ---------------------------------------------------------------------
    async def load(self) -> None:
        """Read the persisted states (``start`` does it; tests that drive ``step`` call it)."""
        self._states = await self._store.trigger_states()

    async def start(self) -> None:
        await self.load()
        self._task = asyncio.create_task(self._run(), name="nimbus-schedules")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _changed(self, name: str) -> None:
        """A function was published or deleted: look again now."""
        try:
            self._functions.current(name)
        except ResourceNotFound:
            # Deleted (the store dropped its states): a function created later under
            # the same name must not inherit them.
            for key in [k for k in self._states if k[0] == name]:
                del self._states[key]
            self._specs.pop(name, None)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                next_at = await self.step()
            except Exception:
                log.exception("schedule triggers: a pass failed; trying again")
                next_at = math.inf
            delay = min(self._max_sleep, max(0.0, next_at - self._clock()))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    # -- one pass ------------------------------------------------------------------------
    async def step(self) -> float:
        """Fire what is due now; return when something is next due (epoch seconds)."""
        now = self._clock()
        earliest = math.inf
        seen: set[tuple[str, str]] = set()
        for record in self._functions.all():
            for spec in self._parsed(record.current):
                seen.add((record.name, spec.name))
                try:
                    next_at = await self._step_one(record.current, spec, now)
                except Exception:
                    log.exception("schedule %s/%s: failed; trying again", record.name, spec.name)
                    next_at = now + self._max_sleep
                earliest = min(earliest, next_at)
        for key in [k for k in self._states if k not in seen]:
            # The trigger was removed; if it comes back, it starts afresh.
            await self._store.delete_trigger_state(*key)
            self._states.pop(key, None)
            self._failing.discard(key)
        return earliest

    async def _step_one(self, version: Version, spec: ScheduleSpec, now: float) -> float:
        function = version.name
        key = (function, spec.name)
        state = self._states.get(key)
        if state is None or state.fingerprint != fingerprint(spec):
            state = self._fresh(version, spec)
            await self._save(state)
        tick = decide(
            spec, last_fire=state.last_fire, created_at=state.created_at, now=now, grace=self._grace
        )
        for fire in tick.fires:
            if not await self._fire(function, spec, fire, now):
                # Not persisted: the next pass decides (and submits) the same run again.
                return now + self._max_sleep
        if tick.skipped:
            log.info(
                "schedule %s/%s: %d scheduled run(s) missed (catch_up: %s)",
                function,
                spec.name,
                tick.skipped,
                spec.catch_up,
            )
        if tick.last_fire != state.last_fire:
            await self._save(replace(state, last_fire=tick.last_fire))
        return tick.next_at

    async def _fire(self, function: str, spec: ScheduleSpec, fire: Fire, now: float) -> bool:
        """Start one run (or skip it, by the overlap policy); False if it could not be submitted."""
        source = source_of(spec.name)
        key = idempotency_key(function, spec.name, fire.scheduled_for)
        try:
            running = await self._invoker.running(function, source)
            action = overlap_action(spec, running=running)
            if action == "skip":
                log.info(
                    "schedule %s/%s: run for %s skipped: %d earlier run(s) still going "
                    "(overlap: forbid)",
                    function,
                    spec.name,
                    _iso(fire.scheduled_for),
                    running,
                )
                self._recovered(function, spec.name)
                return True
            if action == "replace":
                cancelled = await self._cancel_queued(function, source, keep=key, now=now)
                log.info(
                    "schedule %s/%s: replacing: cancelled %d queued run(s); %d running one(s) "
                    "cannot be cancelled and go on",
                    function,
                    spec.name,
                    cancelled,
                    max(0, running - cancelled),
                )
            event = scheduled_event(
                spec,
                trigger_arn_name=spec.name,
                function=function,
                fire=fire,
                event_id=event_id(key),
                account=self._account,
            )
            invocation, created = await self._invoker.submit(
                function, orjson.dumps(event), idempotency_key=key, source=source
            )
        except Exception as e:
            if (function, spec.name) not in self._failing:
                self._failing.add((function, spec.name))
                log.warning(
                    "schedule %s/%s: could not submit the run for %s (%s); trying again",
                    function,
                    spec.name,
                    _iso(fire.scheduled_for),
                    e.message if isinstance(e, NimbusError) else f"{type(e).__name__}: {e}",
                )
            return False
        self._recovered(function, spec.name)
        log.debug(
            "schedule %s/%s: run for %s is invocation %s%s",
            function,
            spec.name,
            _iso(fire.scheduled_for),
            invocation.id,
            "" if created else " (submitted before)",
        )
        return True

    async def _cancel_queued(self, function: str, source: str, *, keep: str, now: float) -> int:
        """Cancel this trigger's queued runs, except the one with key ``keep``; how many."""
        cancelled = 0
        before: float | None = None
        while True:
            page = await self._invoker.queue.list(
                function=function, status="queued", limit=100, before=before
            )
            for invocation in page:
                if invocation.source != source or invocation.idempotency_key == keep:
                    continue
                try:
                    await self._invoker.queue.cancel(invocation.id, now=now)
                    cancelled += 1
                except NimbusError:
                    pass  # it started (or finished) meanwhile
            if len(page) < 100:
                return cancelled
            before = page[-1].created_at

    def _recovered(self, function: str, trigger: str) -> None:
        if (function, trigger) in self._failing:
            self._failing.discard((function, trigger))
            log.info("schedule %s/%s: submitting works again", function, trigger)

    # -- state -------------------------------------------------------------------------
    def _fresh(self, version: Version, spec: ScheduleSpec) -> TriggerState:
        return TriggerState(
            function=version.name,
            name=spec.name,
            created_at=version.created_at,
            last_fire=None,
            fingerprint=fingerprint(spec),
        )

    def state(self, version: Version, spec: ScheduleSpec) -> TriggerState:
        """The state a trigger of ``version`` has (or will get on the next pass)."""
        state = self._states.get((version.name, spec.name))
        if state is None or state.fingerprint != fingerprint(spec):
            return self._fresh(version, spec)
        return state

    async def _save(self, state: TriggerState) -> None:
        await self._store.save_trigger_state(
            state.function,
            state.name,
            created_at=state.created_at,
            last_fire=state.last_fire,
            fingerprint=state.fingerprint,
        )
        self._states[state.function, state.name] = state

    def _parsed(self, version: Version) -> tuple[ScheduleSpec, ...]:
        cached = self._specs.get(version.name)
        if cached is not None and cached[:2] == (version.number, version.created_at):
            return cached[2]
        specs = []
        for raw in version.spec.triggers:
            if raw.get("type") != "schedule":
                continue
            try:
                specs.append(parse_schedule(raw))
            except InvalidParameterValue as e:
                # Validated at deploy; only a change in what is accepted can get here.
                log.warning("schedule %s/%s: ignored: %s", version.name, raw.get("name"), e)
        self._specs[version.name] = (version.number, version.created_at, tuple(specs))
        return tuple(specs)

    # -- for the API ---------------------------------------------------------------------
    def describe(self, version: Version, *, now: float | None = None) -> list[dict[str, Any]]:
        """``version``'s triggers as stored, each with ``next_fire`` and ``last_fire``
        (epoch seconds; ``last_fire`` None if it never fired)."""
        now = self._clock() if now is None else now
        specs = {s.name: s for s in self._parsed(version)}
        out = []
        for raw in version.spec.triggers:
            spec = specs.get(str(raw.get("name")))
            if spec is None:
                continue
            state = self.state(version, spec)
            tick = decide(
                spec,
                last_fire=state.last_fire,
                created_at=state.created_at,
                now=now,
                grace=self._grace,
            )
            next_at = tick.fires[0].scheduled_for if tick.fires else tick.next_at
            out.append({**raw, "next_fire": next_at, "last_fire": state.last_fire})
        return out


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))
