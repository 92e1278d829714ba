"""One running instance of one function version, and the invocation of it.

An :class:`Instance` owns its process, its socket (:class:`Channel`) and its
output pipe (:class:`OutputReader`). ``invoke()`` sends one event, enforces the
timeout by killing the instance, and turns every outcome (result, exception,
timeout, crash) into an :class:`InvokeResult` in Lambda's shape. It also writes
the ``START``/``END``/``REPORT`` lines, which only it can order correctly with
the function's own output.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections.abc import Callable
from enum import Enum

import orjson

from nimbus.executor.launcher import InstanceProcess
from nimbus.executor.output import OutputReader
from nimbus.executor.protocol import ERROR, INVOKE, RESULT, Channel, Frame, InstanceGone
from nimbus.models import ErrorKind, InvokeResult, Version

Emit = Callable[[str, str], None]


class State(Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"


def error_body(error_type: str, message: str, request_id: str = "") -> bytes:
    return orjson.dumps(
        {
            "errorMessage": message,
            "errorType": error_type,
            "requestId": request_id,
            "stackTrace": [],
        }
    )


def describe_exit(returncode: int | None) -> str:
    if returncode is None:
        return "Runtime exited without providing a reason"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        pretty = {
            "SIGSEGV": "segmentation fault",
            "SIGKILL": "killed",
            "SIGABRT": "aborted",
            "SIGTERM": "terminated",
            "SIGBUS": "bus error",
        }.get(name, name)
        return f"Runtime exited with error: signal: {pretty}"
    return f"Runtime exited with error: exit status {returncode}"


class Instance:
    """A started, initialised instance; serves one invocation at a time."""

    def __init__(
        self,
        instance_id: str,
        version: Version,
        process: InstanceProcess,
        channel: Channel,
        output: OutputReader,
        emit: Emit,
        init_ms: float,
    ) -> None:
        self.id = instance_id
        self.version = version
        self.process = process
        self.state = State.IDLE
        self.last_used = time.monotonic()
        self.invocations = 0
        self._channel = channel
        self._output = output
        self._emit = emit
        #: Reported (then cleared) with the first invocation: that one was a cold start.
        self._init_ms: float | None = init_ms

    def prewarmed(self) -> None:
        """Started ahead of demand: no invocation waited for its init (as with Lambda's
        provisioned concurrency, no ``Init Duration`` is reported)."""
        self._init_ms = None

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.state is not State.DEAD

    async def invoke(self, request_id: str, rid_bytes: bytes, event: bytes) -> InvokeResult:
        """Run one invocation. Never raises for anything the function did."""
        spec = self.version.spec
        self.state = State.BUSY
        self.invocations += 1
        loop = asyncio.get_running_loop()
        ctx = self._output.open(request_id)
        self._emit(request_id, f"START RequestId: {request_id} Version: {self.version.number}")
        timeout = spec.timeout
        started = time.perf_counter()
        reply = self._channel.send(INVOKE, rid_bytes, time.time() + timeout, event)
        timer = loop.call_later(timeout, expire, reply)
        error: ErrorKind | None = None
        memory_kib = 0
        quiet = False
        try:
            frame: Frame = await reply
        except asyncio.CancelledError:
            # The caller went away mid-invocation (shutdown, a cancelled task): the
            # instance is still running that invocation, so it cannot serve another.
            self.kill()
            raise
        except TimeoutError:
            self.kill()
            error, duration = "Timeout", timeout * 1000.0
            body = error_body(
                "Sandbox.Timedout", f"Task timed out after {timeout:.2f} seconds", request_id
            )
        except InstanceGone:
            duration = (time.perf_counter() - started) * 1000.0
            returncode = await self._reap()
            message = f"RequestId: {request_id} Error: {describe_exit(returncode)}"
            if self.process.oom_killed():
                error = "OutOfMemory"
                body = error_body("Runtime.OutOfMemory", message, request_id)
                self._emit(request_id, f"{message}\nRuntime.OutOfMemory")
            else:
                error = "Crash"
                body = error_body("Runtime.ExitError", message, request_id)
                self._emit(request_id, message)
        else:
            duration = frame.seconds * 1000.0
            memory_kib = frame.number
            body = frame.body
            quiet = frame.quiet
            if frame.kind == ERROR:
                error = "Unhandled"
            elif frame.kind != RESULT:
                self.kill()
                error = "Crash"
                body = error_body("Runtime.InvalidResponse", "unexpected frame from instance")
        finally:
            timer.cancel()
        init_ms, self._init_ms = self._init_ms, None
        result = InvokeResult(
            request_id=request_id,
            body=body,
            error=error,
            duration_ms=duration,
            max_memory_mb=math.ceil(memory_kib / 1024),
            init_ms=init_ms,
            cold=init_ms is not None,
        )
        if quiet:
            self._output.close_quietly(ctx, self._trailer(result))
        else:
            self._output.finish(ctx, self._trailer(result))
        if not ctx.done.done():
            # The shim wrote its sentinel before replying: this is at most a loop turn or two,
            # unless the instance died or a child of it holds the pipe open.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ctx.done), 1.0)
        if self.state is State.BUSY:
            self.state = State.IDLE
            self.last_used = time.monotonic()
        return result

    def _trailer(self, r: InvokeResult) -> list[str]:
        report = (
            f"REPORT RequestId: {r.request_id}\tDuration: {r.duration_ms:.2f} ms\t"
            f"Billed Duration: {r.billed_ms} ms\tMemory Size: {self.version.spec.memory} MB\t"
            f"Max Memory Used: {r.max_memory_mb} MB"
        )
        if r.init_ms is not None:
            report += f"\tInit Duration: {r.init_ms:.2f} ms"
        report += "\tStart: cold" if r.cold else "\tStart: warm"
        if r.error == "Timeout":
            report += "\tStatus: timeout"
        elif r.error in ("Crash", "OutOfMemory"):
            report += "\tStatus: error"
            if r.error == "OutOfMemory":
                report += "\tError Type: Runtime.OutOfMemory"
        return [f"END RequestId: {r.request_id}", report]

    async def _reap(self) -> int | None:
        self.state = State.DEAD
        try:
            return await asyncio.wait_for(self.process.wait(), 2.0)
        except TimeoutError:
            self.kill()
            return self.process.returncode

    def kill(self) -> None:
        """Kill the instance now (its whole process tree); cleanup continues in the background."""
        self.state = State.DEAD
        self._channel.close()
        self.process.kill()

    async def stop(self) -> None:
        """Kill and wait until the process is gone and its output is drained."""
        self.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 5.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._output.closed), 2.0)
        await self.process.cleanup()


def expire(fut: asyncio.Future[Frame]) -> None:
    """A timer's callback: fail a reply still awaited with TimeoutError."""
    if not fut.done():
        fut.set_exception(TimeoutError())
