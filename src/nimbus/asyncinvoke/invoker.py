"""``AsyncInvoker``: accepts invocations into the durable queue and runs them.

See the package docstring for what happens after an attempt; the decisions
themselves are in :mod:`nimbus.asyncinvoke.decisions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from nimbus.asyncinvoke.decisions import (
    AGE_EXCEEDED,
    INTERRUPTED,
    NOT_FOUND,
    NOT_INVOKED,
    SERVICE_ERROR,
    THROTTLED,
    TOO_LARGE,
    GiveUp,
    Retry,
    Succeed,
    decide,
    destination_record,
    error_json,
    expired,
    function_cap,
    invoke_count,
    lease_length,
    trigger_failure_record,
)
from nimbus.asyncinvoke.delivery import Deliveries, Poster
from nimbus.errors import NimbusError, RequestTooLarge, ResourceNotFound, TooManyRequests
from nimbus.models import Account, FunctionRecord, InvokeResult, Version
from nimbus.outbound import OutboundPolicy
from nimbus.queue import Invocation, Lease, Queue, Status
from nimbus.queue.base import SUCCEEDED

if TYPE_CHECKING:
    from nimbus.observability.logs import LogRecord

log = logging.getLogger("nimbus.async")

#: How often due work is looked for when nothing woke the dispatcher (seconds): the
#: retries of a previous process and leases that expired when it died.
POLL_INTERVAL = 1.0
#: How often finished invocations past their retention are purged (seconds).
PURGE_INTERVAL = 300.0


# ------------------------------------------------------------------------- boundaries


class FunctionLookup(Protocol):
    """What the async invoker needs of :class:`~nimbus.functions.Functions`."""

    def current(self, name: str) -> Version: ...

    def all(self) -> list[FunctionRecord]: ...


class InvokePath(Protocol):
    """What it needs of :class:`~nimbus.invoke.Invoker`."""

    async def invoke(
        self, name: str, event: bytes, *, request_id: uuid.UUID | None = None
    ) -> InvokeResult: ...


class LogReader(Protocol):
    """What it needs of :class:`~nimbus.observability.logs.LogStore`."""

    async def query(
        self,
        function: str,
        *,
        since: float | None = None,
        after: int | None = None,
        limit: int = 1000,
        request_id: str | None = None,
    ) -> list[LogRecord]: ...


# ---------------------------------------------------------------------------- invoker


class AsyncInvoker:
    """Accepts asynchronous invocations and runs them (see the package docstring)."""

    def __init__(
        self,
        queue: Queue,
        functions: FunctionLookup,
        invoker: InvokePath,
        logs: LogReader | None = None,
        *,
        max_payload: int = 1024 * 1024,
        max_concurrency: int = 64,
        retention: float = 86400.0,
        queue_timeout: float = 10.0,
        grace: float = 30.0,
        poll_interval: float = POLL_INTERVAL,
        clock: Callable[[], float] = time.time,
        post: Poster | None = None,
        rand: Callable[[], float] = random.random,
        account: Account | None = None,
        outbound: OutboundPolicy | None = None,
    ) -> None:
        self._account = account or Account()
        self.queue = queue
        self._functions = functions
        self._invoker = invoker
        self._logs = logs
        self.max_payload = max_payload
        self.max_concurrency = max(1, max_concurrency)
        self.retention = retention
        self._queue_timeout = queue_timeout
        self._grace = grace
        self._poll_interval = poll_interval
        self._clock = clock
        self._rand = rand
        #: Where callbacks and URL destinations may go (public addresses, and what the
        #: operator allows).
        self.outbound = outbound or OutboundPolicy()
        self._deliveries = Deliveries(post, self.outbound)
        # Attempts running now (holding, or about to hold, an instance), per function.
        self._busy: Counter[str] = Counter()
        self._busy_total = 0
        # Functions that may have due work: leased for first, by name.
        self._hot: set[str] = set()
        self._wake = asyncio.Event()
        self._workers: dict[asyncio.Task[None], Lease] = {}
        self._timers: set[asyncio.TimerHandle] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._closing = False
        self._last_purge = 0.0
        self._last_probe = float("-inf")

    # -- lifecycle ----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the queue without running anything (tests drive :meth:`run_once`)."""
        await self.queue.open()

    async def start(self) -> None:
        """Open the queue and start the dispatcher."""
        await self.queue.open()
        await self._deliveries.open()
        self._closing = False
        self._last_purge = self._clock()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="nimbus-async-dispatch")

    async def close(self) -> None:
        """Stop leasing, give running attempts ``grace`` seconds, put the rest back, close.

        An attempt cancelled here is queued again at once (outcome ``Interrupted``);
        if even that cannot be written, its lease expires and it is delivered again.
        """
        self._closing = True
        self._wake.set()
        if self._dispatcher is not None:
            # Let it finish its round: a lease() cancelled while committing would still
            # commit, and those invocations would wait for their leases to expire.
            done, _ = await asyncio.wait([self._dispatcher], timeout=5.0)
            if not done:
                self._dispatcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._dispatcher
            self._dispatcher = None
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._workers:
            _, pending = await asyncio.wait(list(self._workers), timeout=self._grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        await self._deliveries.close(min(self._grace, 5.0))
        await self.queue.close()

    # -- accepting ----------------------------------------------------------------------

    def function(self, name: str) -> Version:
        """The current version of ``name`` (``ResourceNotFound``): 404 before reading a body."""
        return self._functions.current(name)

    async def submit(
        self,
        function: str,
        payload: bytes,
        *,
        idempotency_key: str | None = None,
        source: str = "api",
        headers: dict[str, str] | None = None,
    ) -> tuple[Invocation, bool]:
        """Durably accept an invocation: (the invocation, whether it is new).

        ``ResourceNotFound`` for an unknown function and ``RequestTooLarge`` over
        ``max_payload``, before anything is stored. With an ``idempotency_key``
        submitted for the same function within ``retention``, nothing is stored
        and the first invocation comes back with ``False``.
        """
        self._functions.current(function)
        if len(payload) > self.max_payload:
            raise RequestTooLarge(
                f"payload is {len(payload)} bytes; the limit for an asynchronous invocation is "
                f"{self.max_payload} bytes"
            )
        invocation, created = await self.queue.submit(
            function,
            payload,
            now=self._clock(),
            idempotency_key=idempotency_key,
            retention=self.retention,
            source=source,
            headers=headers,
        )
        if created:
            self._poke(function)
        return invocation, created

    async def running(self, function: str, source: str) -> int:
        """Invocations of ``function`` from ``source`` that are queued or running."""
        count = 0
        for status in ("queued", "running"):
            found = await self.queue.list(function=function, status=status, limit=1 << 30)
            count += sum(1 for inv in found if inv.source == source)
        return count

    # -- reading and cancelling (the API) -----------------------------------------------

    async def get(self, invocation_id: str) -> Invocation:
        return await self.queue.get(invocation_id)

    async def list_invocations(
        self, *, function: str | None = None, status: Status | None = None, limit: int = 100
    ) -> list[Invocation]:
        """Invocations newest first."""
        return await self.queue.list(function=function, status=status, limit=limit)

    async def cancel(self, invocation_id: str) -> Invocation:
        """Cancel a queued invocation (``ResourceConflict`` once it runs or finished)."""
        return await self.queue.cancel(invocation_id, now=self._clock())

    async def attempt_logs(self, invocation: Invocation) -> dict[str, list[LogRecord]]:
        """Each attempt's log records, by the attempt's request id."""
        out: dict[str, list[LogRecord]] = {}
        for attempt in invocation.attempts:
            if self._logs is None:
                out[attempt.request_id] = []
                continue
            out[attempt.request_id] = await self._logs.query(
                invocation.function,
                request_id=attempt.request_id,
                since=attempt.started_at - 5.0,  # narrows the scan; clocks agree on one node
                limit=10_000,
            )
        return out

    async def delete_function(self, function: str) -> None:
        """A function was deleted: drop its invocations, whatever their state."""
        await self.queue.delete_function(function)
        self._hot.discard(function)

    # -- the dispatcher -----------------------------------------------------------------

    def _poke(self, function: str | None = None) -> None:
        if function is not None:
            self._hot.add(function)
        self._wake.set()

    async def _dispatch(self) -> None:
        while not self._closing:
            self._wake.clear()
            try:
                leased = await self.run_once()
            except Exception:
                # The queue failed (a full disk?): say so and try again later.
                log.exception("leasing asynchronous invocations failed")
                leased = 0
            if leased:
                await asyncio.sleep(0)  # let the workers just started take their first step
                continue
            now = self._clock()
            if now - self._last_purge >= PURGE_INTERVAL:
                self._last_purge = now
                self._deliveries.spawn(self._purge(now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._poll_interval)

    async def run_once(self) -> int:
        """One round of leasing: start a worker for each lease; return how many.

        Hot functions (work was submitted, a retry came due, a worker finished) are
        leased for up to their remaining room. Once per ``poll_interval`` one
        invocation of any other function not at its cap is probed for, so work
        nobody announced (a previous process's retries and expired leases) is found
        too; its function becomes hot.
        """
        free = self.max_concurrency - self._busy_total
        if free <= 0:
            return 0
        now = self._clock()
        at_cap = {f for f, n in self._busy.items() if n > 0 and n >= self._cap(f)}
        hot = set(self._hot)
        calls: list[tuple[str | None, int, Awaitable[list[Lease]]]] = []
        for name in sorted(hot - at_cap):
            room = min(self._cap(name) - self._busy[name], free)
            if room <= 0:
                continue
            free -= room
            calls.append(
                (
                    name,
                    room,
                    self.queue.lease(
                        now=now, lease_for=self._lease_for, limit=room, functions=[name]
                    ),
                )
            )
        if free > 0 and now - self._last_probe >= self._poll_interval:
            # Restricted to the functions to look at (not excluding the others): with
            # the queue's (function, status, not_before) index this never walks a
            # backlog it would have to skip.
            self._last_probe = now
            quiet = [r.name for r in self._functions.all() if r.name not in hot | at_cap]
            if quiet:
                calls.append(
                    (
                        None,
                        1,
                        self.queue.lease(
                            now=now, lease_for=self._lease_for, limit=1, functions=quiet
                        ),
                    )
                )
        results = await asyncio.gather(*(c for _, _, c in calls), return_exceptions=True)
        started = 0
        failure: BaseException | None = None
        for (function, room, _), result in zip(calls, results, strict=True):
            if isinstance(result, BaseException):
                failure = result
                continue
            for lease in result:
                self._start(lease)
                started += 1
                if function is None:
                    self._hot.add(lease.invocation.function)
            if function is not None and len(result) < room:
                self._hot.discard(function)  # drained for now
        if failure is not None and not started:
            raise failure
        return started

    def _cap(self, function: str) -> int:
        try:
            return function_cap(self._functions.current(function).spec)
        except ResourceNotFound:
            return 1

    def _lease_for(self, function: str) -> float:
        # Called on the queue's thread: a dict lookup of an immutable version.
        try:
            return lease_length(self._functions.current(function).spec, self._queue_timeout)
        except ResourceNotFound:
            return 60.0

    def _start(self, lease: Lease) -> None:
        function = lease.invocation.function
        self._busy[function] += 1
        self._busy_total += 1
        task = asyncio.create_task(self._work(lease), name=f"nimbus-async-{lease.invocation.id}")
        self._workers[task] = lease

    # -- one attempt --------------------------------------------------------------------

    async def _work(self, lease: Lease) -> None:
        function = lease.invocation.function
        held = True

        def release() -> None:
            # The instance is free: another attempt may start while this one's outcome commits.
            nonlocal held
            if held:
                held = False
                self._busy[function] -= 1
                if self._busy[function] <= 0:
                    del self._busy[function]
                self._busy_total -= 1
                self._poke(function)

        try:
            await self._attempt(lease, release)
        except asyncio.CancelledError:
            release()
            with contextlib.suppress(Exception):
                now = self._clock()
                await self.queue.retry(
                    lease,
                    now=now,
                    not_before=now,
                    outcome=INTERRUPTED,
                    error=error_json(INTERRUPTED, "Nimbus shut down while the attempt ran"),
                    function_error=False,
                )
            raise
        except Exception:
            # Writing the outcome failed: the lease expires and the attempt is delivered again.
            log.exception("asynchronous invocation %s: the attempt failed", lease.invocation.id)
        finally:
            release()
            self._workers.pop(asyncio.current_task(), None)  # type: ignore[arg-type]

    async def _attempt(self, lease: Lease, release: Callable[[], None]) -> None:
        invocation = lease.invocation
        name = invocation.function
        try:
            version = self._functions.current(name)
        except ResourceNotFound:
            release()
            await self._give_up(lease, None, GiveUp(False, None), NOT_FOUND, None)
            return
        config = version.spec.async_
        if expired(invocation.created_at, config, self._clock()):
            release()
            await self._give_up(
                lease, version, GiveUp(True, "EventAgeExceeded"), AGE_EXCEEDED, None
            )
            return
        outcome, body = await self._invoke(name, invocation.payload, lease.request_id)
        release()
        now = self._clock()
        decision = decide(
            outcome=outcome,
            attempt=lease.attempt,
            function_errors=invocation.function_errors,
            created_at=invocation.created_at,
            config=config,
            now=now,
            rand=self._rand,
        )
        if isinstance(decision, Succeed):
            await self._succeed(lease, version, body)
        elif isinstance(decision, Retry):
            retried = await self.queue.retry(
                lease,
                now=now,
                not_before=decision.not_before,
                outcome=outcome,
                error=body,
                function_error=decision.function_error,
            )
            if retried is not None:
                self._retry_at(name, decision.not_before)
        else:
            await self._give_up(lease, version, decision, outcome, body)

    async def _invoke(self, name: str, payload: bytes, request_id: str) -> tuple[str, bytes]:
        """Run the attempt: (its outcome, the result or error body). Never raises but
        for cancellation."""
        try:
            result = await self._invoker.invoke(name, payload, request_id=uuid.UUID(request_id))
        except ResourceNotFound as e:
            return NOT_FOUND, error_json(e.code, e.message)
        except TooManyRequests as e:
            return THROTTLED, error_json(e.code, e.message)
        except RequestTooLarge as e:
            return TOO_LARGE, error_json(e.code, e.message)
        except NimbusError as e:
            log.warning("asynchronous invocation of %s: %s", name, e.message)
            return SERVICE_ERROR, error_json(e.code, e.message)
        except Exception as e:
            log.exception("asynchronous invocation of %s failed in Nimbus", name)
            return SERVICE_ERROR, error_json("ServiceException", f"{type(e).__name__}: {e}")
        if result.error is None:
            return SUCCEEDED, result.body
        return result.error, result.body

    def _retry_at(self, function: str, when: float) -> None:
        """Wake the dispatcher for ``function`` once the clock reaches ``when``."""
        # The loop's timers run on the monotonic clock and may fire a little early;
        # leasing before ``when`` would find nothing due, so re-arm until it is.
        if self._closing:
            return  # it is in the queue: the next process finds it
        delay = when - self._clock()
        if delay <= 0:
            self._poke(function)
            return

        def fire() -> None:
            self._timers.discard(handle)
            self._retry_at(function, when)

        handle = asyncio.get_running_loop().call_later(delay + 0.001, fire)
        self._timers.add(handle)

    async def _succeed(self, lease: Lease, version: Version, body: bytes) -> None:
        invocation = lease.invocation
        target = version.spec.async_.on_success
        record = None
        if target is not None:
            record = destination_record(
                invocation,
                "Success",
                self._clock(),
                invoke_count=invoke_count(invocation),
                version=version.number,
                outcome=SUCCEEDED,
                response=body,
                account=self._account,
            )
            await self._to_function(target, record, invocation, "on_success")
        final = await self.queue.succeed(lease, body, now=self._clock())
        if final is None:
            return  # stale: it was redelivered, or its function deleted
        if target is not None and record is not None:
            self._to_url(target, record)
        self._callback(final, body, 200)

    async def _give_up(
        self,
        lease: Lease,
        version: Version | None,
        decision: GiveUp,
        outcome: str,
        body: bytes | None,
    ) -> None:
        invocation = lease.invocation
        now = self._clock()
        error: bytes | None
        if outcome == AGE_EXCEEDED:
            # Nothing ran now: the record carries the last attempt that did, if any.
            error = invocation.error or error_json(
                AGE_EXCEEDED,
                f"the event is older than max_event_age "
                f"({version.spec.async_.max_event_age if version else '?'} s)",
            )
            last = next((a for a in reversed(invocation.attempts) if a.error is not None), None)
            response = last.error if last is not None else None
            response_outcome = last.outcome if last is not None else None
            count = invoke_count(invocation) - 1  # the attempt being closed never ran
        else:
            error = body
            response, response_outcome = body, outcome
            count = invoke_count(invocation) - (1 if outcome in NOT_INVOKED else 0)
        targets: list[tuple[str, str]] = []
        record = None
        if decision.dead_letter and version is not None and decision.condition is not None:
            config = version.spec.async_
            targets = [
                (kind, target)
                for kind, target in (
                    ("on_failure", config.on_failure),
                    ("dead_letter", config.dead_letter),
                )
                if target is not None
            ]
            record = destination_record(
                invocation,
                decision.condition,
                now,
                invoke_count=max(0, count),
                version=version.number,
                outcome=response_outcome,
                account=self._account,
                response=response,
            )
            for kind, target in targets:
                await self._to_function(target, record, invocation, kind)
        final = await self.queue.fail(
            lease, now=self._clock(), outcome=outcome, error=error, dead_letter=decision.dead_letter
        )
        if final is None or not decision.dead_letter:
            return
        if record is not None:
            for _, target in targets:
                self._to_url(target, record)
        self._callback(final, error or b"", 500)

    # -- destinations and callbacks -----------------------------------------------------

    async def _to_function(
        self, target: str, record: dict[str, Any], invocation: Invocation, kind: str
    ) -> None:
        if not target.startswith("function:"):
            return
        name = target.removeprefix("function:")
        payload = orjson.dumps(record)
        if len(payload) > self.max_payload and "responsePayload" in record:
            record = {**record, "responsePayload": None, "responsePayloadTruncated": True}
            payload = orjson.dumps(record)
        try:
            await self.submit(
                name,
                payload,
                idempotency_key=f"{invocation.id}:{kind}",
                source=f"destination:{invocation.function}",
            )
        except NimbusError as e:
            log.warning(
                "asynchronous invocation %s: %s destination %s: %s",
                invocation.id,
                kind,
                target,
                e.message,
            )

    async def dead_letter_event(
        self,
        function: str,
        event: bytes,
        condition: str,
        attempts: int,
        result: InvokeResult | None,
    ) -> bool:
        """Send a trigger's given-up event to ``function``'s ``async.on_failure`` and
        ``dead_letter`` destinations; whether it had any."""
        try:
            version = self._functions.current(function)
        except ResourceNotFound:
            return False
        config = version.spec.async_
        targets = [
            (kind, target)
            for kind, target in (
                ("on_failure", config.on_failure),
                ("dead_letter", config.dead_letter),
            )
            if target is not None
        ]
        if not targets:
            return False
        request_id = result.request_id if result is not None else str(uuid.uuid4())
        record = trigger_failure_record(
            function,
            request_id,
            condition,
            self._clock(),
            payload=event,
            invoke_count=attempts,
            version=version.number,
            response=result.body if result is not None else None,
            account=self._account,
        )
        body = orjson.dumps(record)
        for kind, target in targets:
            if target.startswith("function:"):
                try:
                    await self.submit(
                        target.removeprefix("function:"),
                        body,
                        idempotency_key=f"{request_id}:{kind}",
                        source=f"destination:{function}",
                    )
                except NimbusError as e:
                    log.warning(
                        "trigger of %s: %s destination %s: %s", function, kind, target, e.message
                    )
            else:
                self._to_url(target, record)
        return True

    def _to_url(self, target: str, record: dict[str, Any]) -> None:
        if target.startswith("function:"):
            return
        self._deliveries.send(target, orjson.dumps(record), {"content-type": "application/json"})

    def _callback(self, invocation: Invocation, body: bytes, status: int) -> None:
        url = invocation.headers.get("x-callback-url")
        if not url:
            return
        headers = {
            "content-type": "application/json",
            "x-nimbus-invocation-id": invocation.id,
            "x-call-id": invocation.id,
            "x-function-name": invocation.function,
            "x-function-status": str(status),
        }
        self._deliveries.send(url, body, headers)

    async def _purge(self, now: float) -> None:
        try:
            gone = await self.queue.purge(older_than=now - self.retention)
        except Exception:
            log.exception("purging finished asynchronous invocations failed")
            return
        if gone:
            log.info("purged %d finished asynchronous invocations", gone)

    # -- introspection (tests, metrics) -------------------------------------------------

    @property
    def busy(self) -> Mapping[str, int]:
        """Attempts running now, per function."""
        return dict(self._busy)

    def pending_tasks(self) -> Sequence[asyncio.Task[None]]:
        """Workers and deliveries still running (tests wait for them)."""
        return [*self._workers, *self._deliveries.pending]
