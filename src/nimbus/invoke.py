"""The one invoke path. The gateway, the API, the CLI (and later triggers and the
async queue) all call :meth:`Invoker.invoke`; limits, logging of init failures
and metrics live here, once.
"""

from __future__ import annotations

import uuid

from nimbus.errors import RequestTooLarge, TooManyRequests
from nimbus.executor.core import InitFailed
from nimbus.functions import Functions
from nimbus.models import InvokeResult
from nimbus.observability.logs import LogStore
from nimbus.observability.metrics import Metrics
from nimbus.scheduling import Scheduler


class Invoker:
    def __init__(
        self,
        functions: Functions,
        scheduler: Scheduler,
        logs: LogStore,
        metrics: Metrics,
        *,
        max_payload: int,
    ) -> None:
        self._functions = functions
        self._scheduler = scheduler
        self._logs = logs
        self._metrics = metrics
        self.max_payload = max_payload
        #: Per function: [cold starts, warm starts] since this node started.
        self._starts: dict[str, list[int]] = {}

    async def invoke(
        self, name: str, event: bytes, *, request_id: uuid.UUID | None = None
    ) -> InvokeResult:
        """Run ``name`` on ``event`` (JSON bytes) synchronously.

        Raises ``ResourceNotFound``, ``RequestTooLarge`` and ``TooManyRequests``
        before any instance is touched; everything the *function* does (errors,
        timeouts, crashes, init failures) comes back as an :class:`InvokeResult`.
        """
        version = self._functions.current(name)
        if len(event) > self.max_payload:
            raise RequestTooLarge(
                f"payload is {len(event)} bytes; the limit for a synchronous invocation is "
                f"{self.max_payload} bytes"
            )
        rid = request_id or uuid.uuid4()
        rid_text = str(rid)
        try:
            inst = await self._scheduler.acquire(version)
        except TooManyRequests:
            self._metrics.throttled(name)
            raise
        except InitFailed as e:
            result = InvokeResult(rid_text, e.body, error="Init", init_ms=e.init_ms, cold=True)
            self._log_init_failure(version.name, version.number, version.spec.memory, result)
            self._metrics.observe(name, result)
            return result
        try:
            result = await inst.invoke(rid_text, rid.bytes, event)
        finally:
            self._scheduler.release(inst)
        self._metrics.observe(name, result)
        starts = self._starts.get(name)
        if starts is None:
            starts = self._starts[name] = [0, 0]
        starts[0 if result.cold else 1] += 1
        return result

    def starts(self, name: str) -> dict[str, int]:
        """How many invocations of ``name`` started an instance (cold) or found one (warm)."""
        cold, warm = self._starts.get(name, (0, 0))
        return {"cold": cold, "warm": warm}

    def _log_init_failure(self, name: str, number: int, memory: int, r: InvokeResult) -> None:
        emit = self._logs.emit
        emit(name, number, "", r.request_id, f"START RequestId: {r.request_id} Version: {number}")
        emit(name, number, "", r.request_id, f"END RequestId: {r.request_id}")
        emit(
            name,
            number,
            "",
            r.request_id,
            f"REPORT RequestId: {r.request_id}\tDuration: {r.duration_ms:.2f} ms\t"
            f"Billed Duration: {r.billed_ms} ms\tMemory Size: {memory} MB\t"
            f"Max Memory Used: 0 MB\tInit Duration: {r.init_ms or 0:.2f} ms\tStatus: error",
        )
