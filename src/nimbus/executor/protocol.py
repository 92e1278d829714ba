"""The executor's side of the instance protocol (the format is in ``bootstrap.py``).

:class:`Channel` is an asyncio protocol on one instance's socket: it parses
length-prefixed frames without copying more than it must and resolves one
pending future at a time (an instance serves one invocation at a time).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import cast

from nimbus.runtimes.python.bootstrap import (
    ERROR,
    HEADER,
    INIT_ERROR,
    INVOKE,
    QUIET,
    READY,
    RESULT,
    SENTINEL_PREFIX,
    SPEC,
)

__all__ = [
    "ERROR",
    "HEADER",
    "INIT_ERROR",
    "INVOKE",
    "QUIET",
    "READY",
    "RESULT",
    "SENTINEL_PREFIX",
    "SPEC",
    "Channel",
    "Frame",
    "InstanceGone",
    "decode_frames",
    "encode_frame",
]


class InstanceGone(Exception):
    """The instance's socket closed while a reply was awaited."""


@dataclass(frozen=True, slots=True)
class Frame:
    kind: int
    request_id: bytes
    seconds: float
    number: int
    body: bytes
    #: No output sentinel follows this reply (see ``QUIET``).
    quiet: bool = False


def encode_frame(kind: int, request_id: bytes, seconds: float, number: int, body: bytes) -> bytes:
    return HEADER.pack(len(body), kind, request_id, seconds, number) + body


def decode_frames(buffer: bytearray) -> list[Frame]:
    """Remove and return every complete frame at the start of ``buffer``."""
    frames = []
    hsize = HEADER.size
    offset = 0
    end = len(buffer)
    while end - offset >= hsize:
        length, kind, rid, seconds, number = HEADER.unpack_from(buffer, offset)
        if end - offset - hsize < length:
            break
        start = offset + hsize
        body = bytes(buffer[start : start + length])
        frames.append(Frame(kind & ~QUIET, rid, seconds, number, body, bool(kind & QUIET)))
        offset = start + length
    if offset:
        del buffer[:offset]
    return frames


def too_large(length: int, limit: int) -> bytes:
    """Lambda's error for a response over the limit."""
    return json.dumps(
        {
            "errorMessage": f"Response payload size ({length} bytes) exceeded maximum "
            f"allowed payload size ({limit} bytes).",
            "errorType": "Function.ResponseSizeTooLarge",
            "requestId": "",
            "stackTrace": [],
        }
    ).encode()


class Channel(asyncio.Protocol):
    """One instance's socket. ``send()`` sends a frame and returns the reply's future.

    Memory stays bounded whatever the instance writes: a frame over
    ``max_frame`` is never buffered (its body is skipped as it arrives and the
    reply becomes ``Function.ResponseSizeTooLarge``), and frames nobody asked
    for beyond a handful close the connection (the executor then kills the
    instance).
    """

    #: Unrequested frames tolerated before the instance counts as misbehaving.
    MAX_EARLY = 4

    def __init__(self, max_frame: int = 64 * 1024 * 1024) -> None:
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Frame] | None = None
        self._early: list[Frame] = []
        self._closed = False
        self._max_frame = max_frame
        self._skip = 0
        self._skipped: Frame | None = None

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._skip:
            n = min(self._skip, len(data))
            self._skip -= n
            data = data[n:]
            if self._skip == 0 and self._skipped is not None:
                frame, self._skipped = self._skipped, None
                self._deliver(frame)
            if not data:
                return
        buf = self._buffer
        buf += data
        hsize = HEADER.size
        while len(buf) >= hsize:
            length, kind, rid, seconds, number = HEADER.unpack_from(buf)
            quiet = bool(kind & QUIET)
            if length > self._max_frame:
                have = min(len(buf) - hsize, length)
                del buf[: hsize + have]
                frame = Frame(
                    ERROR, rid, seconds, number, too_large(length, self._max_frame), quiet
                )
                if have < length:
                    self._skip, self._skipped = length - have, frame
                    return
                self._deliver(frame)
                continue
            if len(buf) - hsize < length:
                return
            body = bytes(buf[hsize : hsize + length])
            del buf[: hsize + length]
            self._deliver(Frame(kind & ~QUIET, rid, seconds, number, body, quiet))

    def _deliver(self, frame: Frame) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            self._waiter = None
            waiter.set_result(frame)
            return
        self._early.append(frame)
        if len(self._early) > self.MAX_EARLY and self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_exception(InstanceGone("instance closed its socket"))

    # -- API ------------------------------------------------------------------------
    def next_frame(self) -> asyncio.Future[Frame]:
        """A future for the next frame from the instance."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Frame] = loop.create_future()
        if self._early:
            fut.set_result(self._early.pop(0))
        elif self._closed:
            fut.set_exception(InstanceGone("instance closed its socket"))
        else:
            self._waiter = fut
        return fut

    def send(
        self, kind: int, request_id: bytes, seconds: float, body: bytes, head: bytes = b""
    ) -> asyncio.Future[Frame]:
        """Send a frame and return the future of the reply. ``head`` goes first in the
        body, and the frame's number says how long it is (an INVOKE's metadata)."""
        fut = self.next_frame()
        if self._transport is None or self._closed:
            if not fut.done():
                fut.set_exception(InstanceGone("instance socket is closed"))
            return fut
        length = len(head) + len(body)
        header = HEADER.pack(length, kind, request_id, seconds, len(head))
        self._transport.writelines((header, head, body) if head else (header, body))
        return fut

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
