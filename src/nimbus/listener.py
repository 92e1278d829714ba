"""The listener's HTTP/1.1 protocol: uvicorn's httptools protocol with the limits a
server facing a network needs, which uvicorn leaves out.

- Request line and headers: at most ``max_header_bytes`` and ``max_headers`` fields,
  else ``431`` and the connection closes (httptools itself would buffer any size).
- Time: the request line and headers must arrive within ``header_timeout`` seconds
  of the request's first byte (or of the connection, for one that sends nothing), and
  a body that stops arriving for ``body_timeout`` seconds ends with ``408``: a slow
  client cannot hold a connection, and a body cut short is never invoked (the app
  reads a disconnect, see :func:`nimbus.gateway.app.read_body`).
- Connections: at most ``max_connections`` open, ``max_connections_per_client`` from
  one address; more are answered ``503``/``429`` and closed at once.
- A response sent before its request's body was all received (a ``413``, say) says
  ``connection: close``, and the connection closes after it instead of reading a
  body nobody wants; closing lingers (reads and drops what still arrives, for a
  bounded time) so that the kernel does not reset the connection and lose the
  response.

Keep-alive idle time stays uvicorn's ``timeout_keep_alive``.
"""

from __future__ import annotations

import asyncio
import resource
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

#: File descriptors kept for everything but client connections (instances' sockets
#: and pipes, databases, brokers, code files) when the connection cap is derived.
RESERVED_FDS = 512
#: A connection closed with unread input is read (and the input dropped) until the
#: client is quiet this many seconds, or for this long at most (a "lingering close").
LINGER_IDLE = 2.0
LINGER_MAX = 30.0


@dataclass(frozen=True, slots=True)
class Limits:
    """The listener's share of :class:`~nimbus.config.Settings` (its defaults live there)."""

    max_header_bytes: int
    max_headers: int
    header_timeout: float
    body_timeout: float
    max_connections: int
    max_connections_per_client: int


def connection_cap(configured: int) -> int:
    """``configured`` (0: derived), never more than the open-files limit allows once
    :data:`RESERVED_FDS` are kept back. Raises the soft limit to the hard one first."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    room = max(16, soft - RESERVED_FDS) if soft != resource.RLIM_INFINITY else 1 << 20
    return min(configured, room) if configured > 0 else min(room, 65536)


def error_response(status: int, code: str, message: str) -> bytes:
    """A complete ``connection: close`` response in the API's error shape."""
    body = orjson.dumps({"error": {"code": code, "message": message}})
    return b"".join(
        (
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"connection: close\r\n\r\n",
            body,
        )
    )


class _LingeringTransport:
    """The transport as a request's cycle sees it: its ``close()`` lingers."""

    def __init__(self, transport: Any, hang_up: Callable[[], None]) -> None:
        self._transport = transport
        self._hang_up = hang_up

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def is_closing(self) -> bool:
        return bool(self._transport.is_closing())

    def close(self) -> None:
        self._hang_up()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def protocol_class(limits: Limits) -> type[asyncio.Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` enforcing ``limits``; the
    connection counts and the deadline sweeper are shared by its connections.

    Deadlines cost a timestamp per request, not a timer: one sweep over the open
    connections every half timeout (at most a second) finds the late ones.
    """
    open_by_client: Counter[str] = Counter()
    live: set[LimitedProtocol] = set()
    sweep_every = min(1.0, limits.header_timeout / 2, limits.body_timeout / 2)
    sweeper: list[asyncio.TimerHandle] = []

    def sweep(loop: asyncio.AbstractEventLoop) -> None:
        sweeper.clear()
        now = loop.time()
        for connection in list(live):
            connection.check_deadlines(now)
        if live:
            sweeper.append(loop.call_later(sweep_every, sweep, loop))

    class LimitedProtocol(HttpToolsProtocol):
        _counted_as: str | None = None
        _refused = False
        _in_head = True
        _head_bytes = 0
        #: When the request head now awaited began (None: none awaited; keep-alive idle
        #: is uvicorn's timer), and when the body last moved (None: no body pending).
        _head_since: float | None = None
        _body_since: float | None = None
        _guarded: Any = None
        _linger: asyncio.TimerHandle | None = None
        _linger_until = 0.0

        # -- connections ---------------------------------------------------------

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            client = self.client[0] if self.client else ""
            total = sum(open_by_client.values())
            if total >= limits.max_connections:
                self._refuse(
                    503,
                    "ServiceUnavailable",
                    f"this node has {total} connections open, its limit; try again shortly",
                    linger=False,  # refused at once: a flood must not hold descriptors
                )
                return
            if open_by_client[client] >= limits.max_connections_per_client:
                self._refuse(
                    429,
                    "TooManyRequests",
                    f"your address has {open_by_client[client]} connections open, the limit "
                    "per client; reuse connections (keep-alive) or close some",
                    linger=False,
                )
                return
            open_by_client[client] += 1
            self._counted_as = client
            self._head_since = self.loop.time()
            live.add(self)
            if not sweeper:
                sweeper.append(self.loop.call_later(sweep_every, sweep, self.loop))

        def connection_lost(self, exc: Exception | None) -> None:
            live.discard(self)
            if self._linger is not None:
                self._linger.cancel()
                self._linger = None
            if self._counted_as is not None:
                open_by_client[self._counted_as] -= 1
                if open_by_client[self._counted_as] <= 0:
                    del open_by_client[self._counted_as]
                self._counted_as = None
            super().connection_lost(exc)

        def _refuse(self, status: int, code: str, message: str, *, linger: bool = True) -> None:
            """Answer ``status`` and close; what more arrives is dropped unread."""
            self._refused = True
            self._head_since = self._body_since = None
            if self.cycle is not None and not self.cycle.response_complete:
                # The app still holds a request: it reads a disconnect, its sends are
                # dropped (uvicorn ignores sends on a disconnected cycle).
                self.cycle.disconnected = True
                self.cycle.message_event.set()
                if self.cycle.response_started:
                    self.transport.close()
                    return
            if not self.transport.is_closing():
                self.transport.write(error_response(status, code, message))
                if linger:
                    self._hang_up()
                else:
                    self.transport.close()

        def _hang_up(self) -> None:
            """Close after what was written, reading (and dropping) what the client still
            sends until it is quiet: closing with unread data makes the kernel reset the
            connection, and the client would lose the response (a "lingering close")."""
            self._refused = True
            self._head_since = self._body_since = None
            if self.transport.is_closing() or self._linger is not None:
                return
            if not self.transport.can_write_eof():  # TLS
                self.transport.close()
                return
            self.transport.write_eof()
            self._linger_until = self.loop.time() + LINGER_MAX
            self._linger = self.loop.call_later(LINGER_IDLE, self.transport.close)

        def timeout_keep_alive_handler(self) -> None:
            if self._linger is None:  # lingering has its own clock
                super().timeout_keep_alive_handler()

        def shutdown(self) -> None:
            self._head_since = self._body_since = None
            super().shutdown()

        # -- deadlines -------------------------------------------------------------

        def check_deadlines(self, now: float) -> None:
            if self._refused:
                return
            if self._head_since is not None and now - self._head_since > limits.header_timeout:
                if self._head_bytes == 0 and (self.cycle is None or self.cycle.response_complete):
                    self._refused = True
                    self.transport.close()  # nothing asked: nothing to answer, nothing unread
                    return
                self._refuse(
                    408,
                    "RequestTimeout",
                    f"the request's headers did not arrive within {limits.header_timeout:g} s",
                )
            elif self._body_since is not None and now - self._body_since > limits.body_timeout:
                cycle = self.cycle
                if cycle is None or not cycle.more_body or cycle.response_complete:
                    self._body_since = None
                elif self.flow.read_paused:  # the app is not reading: not the client's fault
                    self._body_since = now
                else:
                    self._refuse(
                        408,
                        "RequestTimeout",
                        f"the request body stopped arriving for {limits.body_timeout:g} s",
                    )

        # -- the request head ----------------------------------------------------

        def data_received(self, data: bytes) -> None:
            if self._refused:
                if self._linger is not None:  # still talking: give it a moment more
                    self._linger.cancel()
                    delay = min(LINGER_IDLE, max(0.0, self._linger_until - self.loop.time()))
                    self._linger = self.loop.call_later(delay, self.transport.close)
                return
            if self._in_head:  # a request's head, or the first bytes of the next one
                self._head_bytes += len(data)
                if self._head_since is None:
                    self._head_since = self.loop.time()
            super().data_received(data)
            if self._refused:
                return
            if self._in_head and self._head_bytes > limits.max_header_bytes:
                self._refuse_head()
                return
            cycle = self.cycle
            if cycle is not None and cycle.more_body and self._guarded is not cycle:
                self._guard(cycle)

        def _guard(self, cycle: Any) -> None:
            """A request whose body is still on its way (its app has not run yet: it
            starts once this callback returns). Answered before the body is in, it says
            ``connection: close``, and the close lingers."""
            self._guarded = cycle
            if cycle.response_started:
                return
            cycle.transport = _LingeringTransport(self.transport, self._hang_up)
            send = cycle.send

            async def send_closing_early(message: Any) -> None:
                if message["type"] == "http.response.start" and cycle.more_body:
                    cycle.keep_alive = False  # answered before the body came: close after
                await send(message)

            cycle.send = send_closing_early

        def on_headers_complete(self) -> None:
            if self._refused:
                return
            self._in_head = False
            self._head_since = None
            if len(self.headers) > limits.max_headers or (
                self._head_bytes > limits.max_header_bytes  # this read held body bytes too?
                and len(self.url) + sum(len(k) + len(v) + 4 for k, v in self.headers)
                > limits.max_header_bytes
            ):
                self._refuse_head()
                return
            self._head_bytes = 0
            self._body_since = self.loop.time()
            super().on_headers_complete()

        def _refuse_head(self) -> None:
            self._refuse(
                431,
                "RequestHeaderFieldsTooLarge",
                f"the request line and headers are over the limit of "
                f"{limits.max_header_bytes} bytes or {limits.max_headers} fields",
            )

        # -- the body ------------------------------------------------------------

        def on_body(self, body: bytes) -> None:
            if self._refused:
                return
            if self.cycle is not None and self.cycle.response_complete:
                # Answered without reading this body (413, 404 …): close rather than
                # read the rest of it only to throw it away.
                self._hang_up()
                return
            self._body_since = self.loop.time()
            super().on_body(body)

        def on_message_complete(self) -> None:
            if self._refused:
                return
            self._body_since = None
            self._in_head = True
            self._head_bytes = 0
            super().on_message_complete()

    return LimitedProtocol
