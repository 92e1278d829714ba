"""The executor's side of the instance protocol (the format is in ``bootstrap.py``).

:class:`Channel` is an asyncio protocol on one instance's socket: it parses
length-prefixed frames without copying more than it must and resolves one
pending future at a time (an instance serves one invocation at a time).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import cast

from nimbus.runtimes.python.bootstrap import (
    ERROR,
    HEADER,
    INIT_ERROR,
    INVOKE,
    READY,
    RESULT,
    SENTINEL_PREFIX,
)

__all__ = [
    "ERROR",
    "HEADER",
    "INIT_ERROR",
    "INVOKE",
    "READY",
    "RESULT",
    "SENTINEL_PREFIX",
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
        frames.append(Frame(kind, rid, seconds, number, bytes(buffer[start : start + length])))
        offset = start + length
    if offset:
        del buffer[:offset]
    return frames


class Channel(asyncio.Protocol):
    """One instance's socket. ``request()`` sends a frame and awaits the next reply."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[Frame] | None = None
        self._early: list[Frame] = []
        self._closed = False

    # -- asyncio.Protocol ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        for frame in decode_frames(self._buffer):
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                self._waiter = None
                waiter.set_result(frame)
            else:
                self._early.append(frame)

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
        self, kind: int, request_id: bytes, seconds: float, body: bytes
    ) -> asyncio.Future[Frame]:
        """Send a frame and return the future of the reply."""
        fut = self.next_frame()
        if self._transport is None or self._closed:
            if not fut.done():
                fut.set_exception(InstanceGone("instance socket is closed"))
            return fut
        self._transport.writelines((HEADER.pack(len(body), kind, request_id, seconds, 0), body))
        return fut

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
