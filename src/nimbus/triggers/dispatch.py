"""From messages to invocations, for one trigger: batching, bounded concurrency,
retries, acknowledgement and dead-lettering.

``Dispatcher.emit`` is the ``emit`` a source runs with. Messages are grouped into
batches (``batch_size``, or what arrived within ``batch_window``; always one message
with ``shape: iot``); each batch is one synchronous invocation through the one
:class:`~nimbus.invoke.Invoker`, with the event of the trigger's shape
(:mod:`nimbus.triggers.records`). At most ``max_concurrency`` batches run at once;
while they all do, ``emit`` does not return, so the source stops taking messages from
the broker (back-pressure: nothing piles up in Nimbus).

Outcome of a batch (:func:`~nimbus.triggers.outcome.judge` decides which records failed):

* success: every message is acked (and, for request-reply, the result is the reply);
* function error: retried ``max_retries`` times with backoff, holding the messages
  unacked; then each is dead-lettered (the broker's own mechanism where the
  trigger has one, else the function's ``async.on_failure``/``dead_letter``
  destinations with Lambda's record) and acked;
* a partial batch response (``{"batchItemFailures": [...]}``, with
  ``report_batch_item_failures``): the records it names are retried like that, alone,
  and the others acked at once; one that names no record of the batch fails it all;
* throttled (every instance busy): waited out and tried again; not a failure;
* the function deleted, or Nimbus stopping: nothing is acked, the broker redelivers;
* too deep a chain of triggered invocations (``nimbus-depth`` ≥ ``max_depth``):
  not invoked, logged, dead-lettered (Lambda's recursive loop detection).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol

from nimbus.errors import NimbusError, ResourceNotFound, TooManyRequests
from nimbus.models import Account, InvokeResult
from nimbus.triggers import records
from nimbus.triggers.outcome import judge
from nimbus.triggers.records import Target
from nimbus.triggers.sources.base import Message, Status
from nimbus.triggers.specs import EventTrigger

log = logging.getLogger("nimbus.triggers")

#: Longest wait between two tries of a throttled batch, seconds.
MAX_THROTTLE_WAIT = 1.0
MAX_RETRY_WAIT = 60.0


class InvokePath(Protocol):
    async def invoke(
        self, name: str, event: bytes, *, request_id: uuid.UUID | None = None
    ) -> InvokeResult: ...


#: Nimbus's dead-letter destination: ``(function, event, condition, attempts, result)``
#: → whether a destination took it.
DeadLetters = Callable[[str, bytes, str, int, InvokeResult | None], Awaitable[bool]]


class Dispatcher:
    """Turns one trigger's messages into invocations of its function."""

    def __init__(
        self,
        function: str,
        trigger: str,
        spec: EventTrigger,
        invoker: InvokePath,
        dead_letters: DeadLetters,
        status: Status,
        *,
        account: Account,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.function = function
        self.trigger = trigger
        self.spec = spec
        self._invoker = invoker
        self._dead_letters = dead_letters
        self.status = status
        self._sleep = sleep
        self.target = Target.of(spec, function, trigger, account)
        self._batch_size = 1 if self.target.one_at_a_time else spec.batch_size
        self._report = spec.report_batch_item_failures and self.target.reports_items
        self._slots = asyncio.Semaphore(spec.max_concurrency)
        self._batch: list[Message] = []
        self._window: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._flushing = asyncio.Lock()

    # -- the source's side -------------------------------------------------------------
    async def emit(self, message: Message) -> None:
        """Take one message; returns when the trigger has room for the next one."""
        self.status.received += 1
        self._batch.append(message)
        if len(self._batch) >= self._batch_size or self.spec.batch_window == 0:
            await self.flush()
        elif self._window is None:
            loop = asyncio.get_running_loop()
            self._window = loop.call_later(self.spec.batch_window, self._window_closed)

    def _window_closed(self) -> None:
        self._window = None
        task = asyncio.get_running_loop().create_task(self.flush())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def flush(self) -> None:
        """Start the batch collected so far (waiting for a free slot first)."""
        async with self._flushing:
            if self._window is not None:
                self._window.cancel()
                self._window = None
            if not self._batch:
                return
            await self._slots.acquire()
            batch, self._batch = self._batch, []
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @property
    def in_flight(self) -> int:
        return self.spec.max_concurrency - self._slots._value

    async def close(self, grace: float) -> None:
        """Stop: let running invocations finish (up to ``grace``), then cancel them;
        messages not acked by then are left to the broker to redeliver."""
        if self._window is not None:
            self._window.cancel()
            self._window = None
        self._batch.clear()
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            for task in pending:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    # -- one batch ---------------------------------------------------------------------
    async def _run(self, batch: list[Message]) -> None:
        try:
            await self._deliver(batch)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception(
                "trigger %s of %s: delivering a batch failed", self.trigger, self.function
            )
        finally:
            self._slots.release()

    async def _deliver(self, batch: list[Message]) -> None:
        deep = [m for m in batch if m.depth >= self.spec.max_depth]
        if deep:
            self.status.recursion_stopped += len(deep)
            log.warning(
                "trigger %s of %s: recursive loop stopped: %d message(s) %d or more triggered "
                "invocations deep (max_depth %d); not invoking, dead-lettering them",
                self.trigger,
                self.function,
                len(deep),
                self.spec.max_depth,
                self.spec.max_depth,
            )
            await self._dead_letter(deep, self._event(deep), "RecursiveInvocationDetected", 0, None)
            batch = [m for m in batch if m.depth < self.spec.max_depth]
            if not batch:
                return
        attempts = 0
        while True:
            event = self._event(batch, attempts + 1)
            try:
                result = await self._invoker.invoke(self.function, event)
            except TooManyRequests:
                await self._sleep(MAX_THROTTLE_WAIT)
                continue
            except ResourceNotFound:
                return  # the function is gone; its trigger stops, the broker keeps these
            except NimbusError as e:  # e.g. the batch is over the payload limit
                if len(batch) > 1:  # in halves, each as far as it goes
                    half = len(batch) // 2
                    await self._deliver(batch[:half])
                    await self._deliver(batch[half:])
                    return
                log.warning("trigger %s of %s: %s", self.trigger, self.function, e.message)
                await self._dead_letter(batch, event, "InvalidRequest", attempts, None)
                return
            attempts += 1
            outcome = judge(result.error, result.body, {m.id for m in batch}, report=self._report)
            if outcome.kind == "succeeded":
                await self._succeed(batch, result)
                return
            if outcome.kind == "partial":
                done = [m for m in batch if m.id not in outcome.failed_ids]
                batch = [m for m in batch if m.id in outcome.failed_ids]
                await self._ack(done)
            elif result.error is None:  # a partial batch response that names no record
                log.warning(
                    "trigger %s of %s: the whole batch of %d failed: %s",
                    self.trigger,
                    self.function,
                    len(batch),
                    outcome.reason,
                )
            if attempts > self.spec.max_retries:
                self.status.failed += len(batch)
                event = self._event(batch, attempts)
                await self._dead_letter(batch, event, "RetriesExhausted", attempts, result)
                return
            self.status.retried += len(batch)
            wait = min(MAX_RETRY_WAIT, self.spec.retry_backoff * 2 ** (attempts - 1))
            await self._sleep(wait)

    def _event(self, batch: list[Message], attempt: int = 1) -> bytes:
        return records.event(self.target, batch, attempt)

    async def _succeed(self, batch: list[Message], result: InvokeResult) -> None:
        if len(batch) == 1 and batch[0].reply is not None:
            await batch[0].reply(result.body)
        await self._ack(batch)

    async def _ack(self, batch: list[Message]) -> None:
        for message in batch:
            await message.ack()
        self.status.succeeded += len(batch)

    async def _dead_letter(
        self,
        batch: list[Message],
        event: bytes,
        condition: str,
        attempts: int,
        result: InvokeResult | None,
    ) -> None:
        native = [m for m in batch if m.dead_letter is not None]
        for message in native:
            assert message.dead_letter is not None
            await message.dead_letter()
        rest = [m for m in batch if m.dead_letter is None]
        if rest:
            taken = await self._dead_letters(self.function, event, condition, attempts, result)
            if not taken:
                log.warning(
                    "trigger %s of %s: %d message(s) failed (%s) and the function has no "
                    "async.on_failure or dead_letter destination; they are dropped",
                    self.trigger,
                    self.function,
                    len(rest),
                    condition,
                )
            for message in rest:
                await message.ack()
        self.status.dead_lettered += len(batch)
