"""The one invoke path. The gateway, the API, the CLI (and later triggers and the
async queue) all call :meth:`Invoker.invoke`; limits, logging of init failures
and metrics live here, once.
"""

from __future__ import annotations

import os
import time
import uuid

from nimbus.errors import RequestTooLarge, TooManyRequests
from nimbus.executor.core import InitFailed
from nimbus.executor.platformlog import PlatformLog
from nimbus.functions import Functions
from nimbus.models import InvokeContext, InvokeResult, Version
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
        self,
        name: str,
        event: bytes,
        *,
        request_id: uuid.UUID | None = None,
        context: InvokeContext | None = None,
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
        trace = (context.trace_id if context is not None else None) or new_trace_id()
        try:
            inst = await self._scheduler.acquire(version)
        except TooManyRequests:
            self._metrics.throttled(name)
            raise
        except InitFailed as e:
            result = InvokeResult(rid_text, e.body, error="Init", init_ms=e.init_ms, cold=True)
            self._log_init_failure(version, result)
            self._metrics.observe(name, result)
            return result
        try:
            result = await inst.invoke(rid_text, rid.bytes, event, trace, context)
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

    def _log_init_failure(self, version: Version, r: InvokeResult) -> None:
        platform = PlatformLog(version.spec, version.number)
        lines = [platform.start(r.request_id), *platform.trailer(r)]
        for line in lines:
            if line is not None:
                self._logs.emit(version.name, version.number, "", r.request_id, line, True)


def new_trace_id(now: float | None = None) -> str:
    """An X-Ray trace header for an invocation that came without one, as Lambda makes
    them: ``Root=1-<epoch seconds, hex>-<96 random bits>;Parent=<64>;Sampled=0``."""
    seconds = int(time.time() if now is None else now)
    bits = os.urandom(20).hex()
    return f"Root=1-{seconds:08x}-{bits[:24]};Parent={bits[24:]};Sampled=0"
