"""Capture an instance's stdout/stderr and attribute each line to its invocation.

An instance's fd 1 and 2 are one pipe. The shim writes a sentinel after its
init and after each invocation; everything before a sentinel belongs to the
oldest open :class:`OutputContext`. A context's trailer (``END``, ``REPORT``) is
emitted only when both its result and its sentinel have arrived, so a
function's lines never appear after its ``REPORT``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Protocol

from nimbus.executor.protocol import SENTINEL_PREFIX

#: A line longer than this is cut into pieces (a function printing without newlines).
MAX_LINE = 64 * 1024
#: Output kept between two invocations (from background threads or children).
ORPHAN_MAX = 1024 * 1024


class Emit(Protocol):
    """Where lines go: ``(request_id, message, platform=False)``; ``platform`` marks
    Nimbus's own lines (the trailer, notes), never the function's output."""

    def __call__(self, request_id: str, message: str, platform: bool = False) -> None: ...


class OutputContext:
    """The output of one invocation (or of the init, with ``request_id == ""``)."""

    __slots__ = ("_trailer", "done", "output_bytes", "request_id", "truncated")

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self.done: asyncio.Future[None] = loop.create_future()
        self.output_bytes = 0
        self.truncated = False
        self._trailer: list[str] | None = None


class OutputReader(asyncio.Protocol):
    """Reads the output pipe of one instance."""

    def __init__(self, emit: Emit, sentinel_token: bytes, max_bytes: int) -> None:
        self._emit = emit
        self._sentinel = SENTINEL_PREFIX + sentinel_token + b"\n"
        self._max_bytes = max_bytes
        self._buffer = bytearray()
        self._contexts: deque[OutputContext] = deque()
        # Output while no invocation is open (a thread still printing after its handler
        # returned): capped too, per gap between invocations.
        self._orphan_bytes = 0
        self.closed: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def open(self, request_id: str) -> OutputContext:
        """Start attributing output to a new invocation (after the previous one ends)."""
        ctx = OutputContext(request_id, asyncio.get_running_loop())
        self._orphan_bytes = 0
        if self.closed.done():
            ctx.done.set_result(None)
        self._contexts.append(ctx)
        return ctx

    def close_quietly(self, ctx: OutputContext, trailer: list[str]) -> None:
        """The instance wrote no sentinel: the pipe held nothing more of ``ctx``'s output
        when it replied, so what was read is all of it (a partial last line included)."""
        if self._contexts and self._contexts[0] is ctx:
            if self._buffer:
                self._lines(self._buffer, final=True)
                self._buffer.clear()
            ctx._trailer = trailer
            self._close_current()
        else:
            self.finish(ctx, trailer)

    def finish(self, ctx: OutputContext, trailer: list[str]) -> None:
        """Emit ``trailer`` once ``ctx``'s output is complete (now, or when it arrives)."""
        if ctx.done.done():
            for line in trailer:
                self._emit(ctx.request_id, line, True)
        else:
            ctx._trailer = trailer

    # -- asyncio.Protocol --------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        while True:
            idx = buf.find(self._sentinel)
            if idx < 0:
                break
            self._lines(buf[:idx], final=True)
            del buf[: idx + len(self._sentinel)]
            self._close_current()
        cut = buf.rfind(b"\n")
        if cut >= 0:
            self._lines(buf[: cut + 1], final=False)
            del buf[: cut + 1]
        elif len(buf) > MAX_LINE:
            self._lines(buf[:MAX_LINE], final=True)
            del buf[:MAX_LINE]

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._buffer:
            self._lines(self._buffer, final=True)
            self._buffer.clear()
        while self._contexts:
            self._close_current()
        if not self.closed.done():
            self.closed.set_result(None)

    # -- internals -----------------------------------------------------------------------
    def _close_current(self) -> None:
        if not self._contexts:
            return
        ctx = self._contexts.popleft()
        if ctx._trailer is not None:
            for line in ctx._trailer:
                self._emit(ctx.request_id, line, True)
            ctx._trailer = None
        if not ctx.done.done():
            ctx.done.set_result(None)

    def _lines(self, chunk: bytes | bytearray, *, final: bool) -> None:
        if not chunk:
            return
        ctx = self._contexts[0] if self._contexts else None
        rid = ctx.request_id if ctx is not None else ""
        if ctx is None:
            if self._orphan_bytes > ORPHAN_MAX:
                return
            self._orphan_bytes += len(chunk)
            if self._orphan_bytes > ORPHAN_MAX:
                self._emit(
                    rid,
                    f"[nimbus] output dropped: more than {ORPHAN_MAX} bytes written "
                    "outside any invocation",
                    True,
                )
                return
        if ctx is not None:
            if ctx.truncated:
                return
            room = self._max_bytes - ctx.output_bytes
            ctx.output_bytes += len(chunk)
            if len(chunk) > room:
                ctx.truncated = True
                keep = chunk[: max(room, 0)]
                cut = keep.rfind(b"\n")
                self._split(rid, keep[: cut + 1] if cut >= 0 else b"")
                self._emit(
                    rid,
                    f"[nimbus] output truncated: this invocation wrote more than "
                    f"{self._max_bytes} bytes",
                    True,
                )
                return
        self._split(rid, chunk)

    def _split(self, rid: str, chunk: bytes | bytearray) -> None:
        if not chunk:
            return
        text = bytes(chunk).decode("utf-8", "replace")
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for line in lines:
            self._emit(rid, line[:MAX_LINE])
