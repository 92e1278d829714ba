"""One running instance of one function version, and the invocation of it.

An :class:`Instance` owns its process, its socket (:class:`Channel`) and its
output pipe (:class:`OutputReader`). ``invoke()`` sends one event, enforces the
timeout by killing the instance, and turns every outcome (result, exception,
timeout, crash) into an :class:`InvokeResult` in Lambda's shape. It also writes
the ``START``/``END``/``REPORT`` lines, which only it can order correctly with
the function's own output.

Between invocations an idle instance is frozen (:meth:`Instance.freeze`, by
whoever keeps it idle): as in Lambda, nothing an invocation left running (a
thread, a child, a timer) runs after its reply. ``invoke()`` thaws it right
before it sends the event.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from enum import Enum

import orjson

from nimbus.executor.launcher import InstanceProcess
from nimbus.executor.output import Emit, OutputReader
from nimbus.executor.platformlog import PlatformLog
from nimbus.executor.protocol import ERROR, INVOKE, RESULT, Channel, Frame, InstanceGone
from nimbus.models import ErrorKind, InvokeContext, InvokeResult, Version


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
        init_ms: float | None,
        *,
        restore_ms: float | None = None,
        platform: PlatformLog | None = None,
        arn: str = "",
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
        self.platform = platform or PlatformLog(version.spec, version.number)
        #: The function's ARN, as its handler's ``context`` shows it.
        self.arn = arn
        #: Reported (then cleared) with the first invocation: that one was a cold start,
        #: with an init of its own, or a restore (a fork of an initialised zygote).
        self._init_ms: float | None = init_ms
        self._restore_ms: float | None = restore_ms
        self._cold = True
        self._frozen = False

    @property
    def init_ms(self) -> float | None:
        """The init this instance ran itself (None for a fork of a function zygote)."""
        return self._init_ms

    def prewarmed(self) -> None:
        """Started ahead of demand: no invocation waited for its start (as with Lambda's
        provisioned concurrency, no ``Init Duration`` is reported)."""
        self._init_ms = self._restore_ms = None
        self._cold = False

    def ran_init(self, init_ms: float) -> None:
        """The first invocation waited for an init that ran for this instance elsewhere
        (its function zygote's, started for it): report that init, not the fork."""
        self._init_ms, self._restore_ms = init_ms, None

    def freeze(self) -> None:
        """Idle: stop everything the instance runs until the next :meth:`invoke` (its
        cgroup's freezer; nothing happens without one). Only an idle instance: by then
        :meth:`invoke` has its last reply and output sentinel (or gave up waiting for
        the sentinel after a second), so that invocation's output is complete."""
        if self.state is State.IDLE and not self._frozen:
            self._frozen = True
            self.process.freeze()

    def emit_line(self, line: str) -> None:
        """A line of the platform's in this instance's log, outside any invocation."""
        self._emit("", line, True)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.state is not State.DEAD

    async def invoke(
        self,
        request_id: str,
        rid_bytes: bytes,
        event: bytes,
        trace_id: str = "",
        context: InvokeContext | None = None,
    ) -> InvokeResult:
        """Run one invocation. Never raises for anything the function did."""
        spec = self.version.spec
        self.state = State.BUSY
        if self._frozen:
            # One write to a cgroup file, no await: the event below waits in the socket
            # until the instance runs again.
            self._frozen = False
            self.process.thaw()
        self.invocations += 1
        loop = asyncio.get_running_loop()
        ctx = self._output.open(request_id)
        start = self.platform.start(request_id)
        if start is not None:
            self._emit(request_id, start, True)
        timeout = spec.timeout
        # The invocation before its event (see bootstrap.py): trace id, ARN, and the rest
        # as JSON only when there is any.
        meta = f"{trace_id}\n{self.arn}\n".encode()
        if context is not None and (context.client_context or context.identity):
            extra: dict[str, object] = {}
            if context.client_context is not None:
                extra["client_context"] = context.client_context
            if context.identity is not None:
                extra["identity"] = context.identity
            meta += orjson.dumps(extra)
        started = time.perf_counter()
        reply = self._channel.send(INVOKE, rid_bytes, time.time() + timeout, event, meta)
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
                self._emit(request_id, f"{message}\nRuntime.OutOfMemory", True)
            else:
                error = "Crash"
                body = error_body("Runtime.ExitError", message, request_id)
                self._emit(request_id, message, True)
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
        init_ms, restore_ms, cold = self._init_ms, self._restore_ms, self._cold
        self._init_ms = self._restore_ms = None
        self._cold = False
        result = InvokeResult(
            request_id=request_id,
            body=body,
            error=error,
            duration_ms=duration,
            max_memory_mb=math.ceil(memory_kib / 1024),
            init_ms=init_ms,
            restore_ms=restore_ms,
            cold=cold,
        )
        trailer = self.platform.trailer(result)
        if quiet:
            self._output.close_quietly(ctx, trailer)
        else:
            self._output.finish(ctx, trailer)
        if not ctx.done.done():
            # The shim wrote its sentinel before replying: this is at most a loop turn or two,
            # unless the instance died or a child of it holds the pipe open.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(ctx.done), 1.0)
        if self.state is State.BUSY:
            self.state = State.IDLE
            self.last_used = time.monotonic()
        return result

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
