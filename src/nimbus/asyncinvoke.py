"""Asynchronous invocations: accept durably, run at least once, retry, dead-letter.

CONTRACT (being implemented): the gateway's ``/async-function/…``, the API's
``X-Nimbus-Invocation-Type: Event`` and schedule triggers all call
:meth:`AsyncInvoker.submit`; its workers lease from the durable
:class:`~nimbus.queue.Queue` and run each invocation through the one
:class:`~nimbus.invoke.Invoker`.
"""

from __future__ import annotations

from nimbus.queue import Invocation, Queue


class AsyncInvoker:
    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    async def start(self) -> None:
        await self.queue.open()

    async def close(self) -> None:
        await self.queue.close()

    async def submit(
        self,
        function: str,
        payload: bytes,
        *,
        idempotency_key: str | None = None,
        source: str = "api",
        headers: dict[str, str] | None = None,
    ) -> tuple[Invocation, bool]:
        """Durably accept an invocation: (the invocation, whether it is new)."""
        raise NotImplementedError  # being written

    async def running(self, function: str, source: str) -> int:
        """Invocations of ``function`` from ``source`` that are queued or running."""
        raise NotImplementedError  # being written
