"""AMQP 0-9-1 (RabbitMQ): one queue, consumed with a prefetch window, each message
acknowledged only after its function succeeded.

The queue is declared durable (with its ``x-dead-letter-exchange`` and its bindings
to a topic exchange) unless the trigger says ``declare: false``; then it must exist.
``basic.qos`` bounds what the broker pushes ahead of the function (``prefetch``), and
``emit`` bounds what is taken from that window (``max_concurrency``): everything else
stays in the queue, visible to the broker and to other consumers.

The connection is a plain ``aio_pika.connect``, not ``connect_robust``: a robust
connection reconnects behind our back, so the trigger would claim ``connected``
while nothing arrives and the error would never reach ``nimbus triggers list``.
Here a dropped connection ends the session, :func:`keep_connected` reports it
(``reconnecting`` with the broker's reason) and connects again; the broker has put
every unacknowledged message back in the queue by then.

After the last retry a message is rejected without requeue when the trigger names a
``dead_letter_exchange`` (the broker routes it there, with its ``x-death`` history);
otherwise Nimbus's dead-letter destination takes it and it is acked. A message with
``reply_to`` gets the function's result published back (RPC over RabbitMQ).

**Records.** A message's id is its ``message_id`` property, else a fresh one (a
delivery tag is only unique on its channel). Its SQS attributes: the queue (of its
ARN), the delivery count (a quorum queue's ``x-delivery-count`` plus one, else 2 when
``redelivered``, else 1), its ``timestamp`` property, its ``user_id`` (which RabbitMQ
checks against the connection's user) as ``SenderId``, and its headers as message
attributes (numbers ``Number``, bytes ``Binary``, tables and arrays as JSON text).
The broker metadata (a native record, or ``nimbus`` in an SQS one): ``deliveryTag``,
``exchange``, ``routingKey``, ``redelivered``, ``queue``, ``contentType``,
``correlationId``, ``headers`` (as text) and ``timestamp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import aio_pika
import orjson
from aio_pika.abc import (
    AbstractChannel,
    AbstractConnection,
    AbstractIncomingMessage,
    AbstractQueue,
    ExchangeType,
)
from aiormq.exceptions import (
    AMQPError,
    AuthenticationError,
    ChannelAccessRefused,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    ConnectionNotAllowed,
    ProbableAuthenticationError,
)
from pamqp.common import FieldTable

from nimbus.triggers.sources.base import (
    DEPTH_HEADER,
    AttributeValue,
    ConfigurationError,
    Emit,
    Message,
    Queued,
    depth_of,
    describe_error,
    keep_connected,
)
from nimbus.triggers.specs import AmqpTrigger, redact_url

if TYPE_CHECKING:
    from nimbus.triggers.events import TriggerContext

log = logging.getLogger("nimbus.triggers")

#: Seconds to wait for the broker to accept a connection.
CONNECT_TIMEOUT = 10.0
#: Seconds a clean close may take before the connection is just dropped.
CLOSE_TIMEOUT = 5.0
#: On stop, seconds the messages already handed to the function may take to be acked
#: before the connection closes (closing returns them to the queue: duplicates).
SETTLE_TIMEOUT = 10.0


class BrokerGone(Exception):
    """The connection or channel closed, or the broker cancelled the consumer."""


class AmqpSource:
    """Consumes ``spec.queue`` until cancelled, reconnecting on its own."""

    def __init__(self, spec: AmqpTrigger, context: TriggerContext) -> None:
        self.spec = spec
        self.context = context
        # The trigger's own URL first: the context's is the server's default.
        self.url = context.broker_url
        #: Messages handed to ``emit`` and not yet settled, in this session.
        self._unsettled: set[AbstractIncomingMessage] = set()
        self._settled = asyncio.Event()

    async def run(self, emit: Emit) -> None:
        what = f"{self.context.trigger} of {self.context.function} (queue {self.spec.queue!r})"
        await keep_connected(what, self.context.status, lambda: self._session(emit))

    # -- one connection ----------------------------------------------------------------
    async def _session(self, emit: Emit) -> None:
        connection = await self._connect()
        ended: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        try:
            connection.close_callbacks.add(_ender(ended, "the connection closed"))
            channel = await connection.channel()
            channel.close_callbacks.add(_ender(ended, "the channel closed"))
            await channel.set_qos(prefetch_count=self.spec.prefetch)
            queue = await self._queue(connection, channel)
            await self._consume(channel, queue, emit, ended)
        except (AMQPError, ChannelInvalidStateError, OSError) as e:
            failure = self._failure(e)
            if ended.done() and not isinstance(failure, ConfigurationError):
                failure = BrokerGone(ended.result())  # the connection went away: say why
            raise failure from None
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.close(), CLOSE_TIMEOUT)

    async def _connect(self) -> AbstractConnection:
        try:
            return await aio_pika.connect(
                self.url,
                timeout=CONNECT_TIMEOUT,
                client_properties={
                    "connection_name": f"nimbus {self.context.function}/{self.context.trigger}"
                },
            )
        except (AMQPError, OSError, TimeoutError) as e:
            raise self._failure(e) from None

    async def _queue(
        self, connection: AbstractConnection, channel: AbstractChannel
    ) -> AbstractQueue:
        spec = self.spec
        if not spec.declare:
            try:
                return await channel.declare_queue(spec.queue, passive=True)
            except ChannelNotFoundEntity:
                raise ConfigurationError(
                    f"queue {spec.queue!r} does not exist (the trigger has declare: false)"
                ) from None
        arguments: FieldTable | None = (
            {"x-dead-letter-exchange": spec.dead_letter_exchange}
            if spec.dead_letter_exchange is not None
            else None
        )
        queue = await channel.declare_queue(spec.queue, durable=True, arguments=arguments)
        if spec.exchange:
            exchange = await channel.declare_exchange(
                spec.exchange, ExchangeType.TOPIC, durable=True
            )
            for key in spec.routing_keys:
                await queue.bind(exchange, key)
        if spec.dead_letter_exchange:
            await self._check_dead_letter_exchange(connection, spec.dead_letter_exchange)
        return queue

    async def _check_dead_letter_exchange(self, connection: AbstractConnection, name: str) -> None:
        """A missing dead-letter exchange makes the broker drop what is rejected to it:
        say so (on a channel of its own: a failed passive declare closes it)."""
        async with connection.channel() as probe:
            try:
                await probe.declare_exchange(name, passive=True)
            except ChannelNotFoundEntity:
                log.warning(
                    "trigger %s of %s: dead-letter exchange %r does not exist; messages "
                    "that fail every retry will be dropped by the broker",
                    self.context.trigger,
                    self.context.function,
                    name,
                )

    async def _consume(
        self,
        channel: AbstractChannel,
        queue: AbstractQueue,
        emit: Emit,
        ended: asyncio.Future[str],
    ) -> None:
        # The broker pushes at most ``prefetch`` unacked messages here; emit() takes
        # them one by one as the trigger has room.
        inbox: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()
        underlay = await channel.get_underlay_channel()
        underlay.on_consumer_cancel_callbacks.add(
            lambda _frame: _end(ended, f"the broker cancelled the consumer of {queue.name!r}")
        )
        tag = await queue.consume(inbox.put)
        self._unsettled.clear()
        self.context.status.set("connected")
        incoming: AbstractIncomingMessage | None = None
        try:
            while True:
                incoming = await _first(inbox.get(), ended)
                if incoming is None:
                    raise BrokerGone(ended.result())
                self._unsettled.add(incoming)
                self._settled.clear()
                await emit(self._message(channel, incoming))
                incoming = None
        except asyncio.CancelledError:
            if incoming is not None:  # stopped while waiting for room: never started
                self._forget(incoming)
            if not ended.done():
                await self._stop_consuming(queue, tag, inbox)
            raise

    async def _stop_consuming(
        self, queue: AbstractQueue, tag: str, inbox: asyncio.Queue[AbstractIncomingMessage]
    ) -> None:
        """Take nothing more, return what was not handed out, and give the messages in
        flight a moment to be acked on this channel (after it closes they come again)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(queue.cancel(tag), CLOSE_TIMEOUT)
            while not inbox.empty():
                await inbox.get_nowait().nack(requeue=True)
        if self._unsettled:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), SETTLE_TIMEOUT)

    def _forget(self, incoming: AbstractIncomingMessage) -> None:
        self._unsettled.discard(incoming)
        if not self._unsettled:
            self._settled.set()

    # -- one message -------------------------------------------------------------------
    def _message(self, channel: AbstractChannel, incoming: AbstractIncomingMessage) -> Message:
        headers = dict(incoming.headers or {})
        tag = incoming.delivery_tag or 0
        record: dict[str, Any] = {
            "deliveryTag": tag,
            "exchange": incoming.exchange or "",
            "routingKey": incoming.routing_key or "",
            "redelivered": bool(incoming.redelivered),
            "queue": self.spec.queue,
            "contentType": incoming.content_type,
            "correlationId": incoming.correlation_id,
            "headers": {str(k): _text(v) for k, v in headers.items()},
            "timestamp": _iso(incoming.timestamp),
        }
        origin = Queued(
            queue=self.spec.queue,
            delivery_count=delivery_count(headers, bool(incoming.redelivered)),
            sent_at=_epoch(incoming.timestamp),
            sender=incoming.user_id or None,
            attributes=attributes_of(headers),
        )
        native = self.spec.dead_letter_exchange is not None
        return Message(
            body=incoming.body,
            id=incoming.message_id or uuid.uuid4().hex,
            origin=origin,
            record=record,
            ack=self._settle(incoming, "ack", incoming.ack),
            dead_letter=(
                self._settle(incoming, "reject", lambda: incoming.reject(requeue=False))
                if native
                else None
            ),
            reply=self._replier(channel, incoming) if incoming.reply_to else None,
            depth=depth_of(headers.get(DEPTH_HEADER)),
        )

    def _settle(
        self,
        incoming: AbstractIncomingMessage,
        verb: str,
        call: Callable[[], Awaitable[None]],
    ) -> Callable[[], Awaitable[None]]:
        async def settle() -> None:
            try:
                await call()
            except Exception as e:
                # Its channel is gone: the broker has already put it back in the queue.
                log.warning(
                    "trigger %s of %s: could not %s message %s (%s); the broker redelivers it",
                    self.context.trigger,
                    self.context.function,
                    verb,
                    incoming.message_id or incoming.delivery_tag,
                    describe_error(e),
                )
            finally:
                self._forget(incoming)

        return settle

    def _replier(
        self, channel: AbstractChannel, incoming: AbstractIncomingMessage
    ) -> Callable[[bytes], Awaitable[None]]:
        async def reply(body: bytes) -> None:
            await channel.default_exchange.publish(
                aio_pika.Message(
                    body,
                    correlation_id=incoming.correlation_id,
                    content_type="application/json",
                ),
                routing_key=str(incoming.reply_to),
            )

        return reply

    # -- errors ------------------------------------------------------------------------
    def _failure(self, e: BaseException) -> Exception:
        """The error as the trigger's state shows it: never with the URL's password, and
        a :class:`ConfigurationError` when retrying fast cannot help."""
        where = redact_url(self.url)
        if isinstance(e, ProbableAuthenticationError | AuthenticationError):
            return ConfigurationError(f"{where}: the broker refused the login ({_reason(e)})")
        if isinstance(e, ConnectionNotAllowed | ChannelAccessRefused):
            return ConfigurationError(f"{where}: access refused ({_reason(e)})")
        if isinstance(e, ChannelNotFoundEntity | ChannelPreconditionFailed):
            return ConfigurationError(f"queue {self.spec.queue!r}: {_reason(e)}")
        if isinstance(e, TimeoutError):
            return BrokerGone(f"{where}: no answer within {CONNECT_TIMEOUT:g} s")
        return BrokerGone(f"{where}: {self._scrub(_reason(e))}")

    def _scrub(self, text: str) -> str:
        password = _password(self.url)
        return text.replace(password, "***") if password else text


def _ender(ended: asyncio.Future[str], default: str) -> Callable[[Any, Any], None]:
    def on_close(_sender: Any, exc: BaseException | None) -> None:
        reason = _reason(exc) if exc is not None else ""
        _end(ended, f"{default}: {reason}" if reason else default)

    return on_close


def _end(ended: asyncio.Future[str], reason: str) -> None:
    if not ended.done():
        ended.set_result(reason)


async def _first(
    get: Awaitable[AbstractIncomingMessage], ended: asyncio.Future[str]
) -> AbstractIncomingMessage | None:
    """The next message, or None once the session has ended (whichever comes first)."""
    getter = asyncio.ensure_future(get)
    try:
        either: list[asyncio.Future[Any]] = [getter, ended]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not getter.done():
            getter.cancel()
    if ended.done():
        return None  # a message already taken stays unacked: the broker redelivers it
    return getter.result()


def _reason(e: BaseException) -> str:
    """aiormq errors carry ``(code, text)`` or ``(text,)``; show the broker's text."""
    texts = [str(a) for a in getattr(e, "args", ()) if isinstance(a, str | bytes) and a]
    return texts[-1] if texts else describe_error(e)


def _password(url: str) -> str | None:
    with contextlib.suppress(ValueError):
        password = urlsplit(url).password
        return unquote(password) if password else None
    return None


def _iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).isoformat()
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, UTC).isoformat()
    return None


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


def delivery_count(headers: dict[str, Any], redelivered: bool) -> int:
    """How many times the broker has delivered the message, this time included."""
    previous = headers.get("x-delivery-count")
    if isinstance(previous, int) and not isinstance(previous, bool) and previous >= 0:
        return previous + 1
    return 2 if redelivered else 1


def attributes_of(headers: dict[str, Any]) -> dict[str, AttributeValue]:
    """AMQP headers as message attributes: numbers stay numbers, bytes bytes, a
    boolean is ``true``/``false``, anything else text (tables and arrays as JSON);
    a header without a value has no attribute."""
    out: dict[str, AttributeValue] = {}
    for name, value in headers.items():
        if value is None:
            continue
        if isinstance(value, bool):
            out[str(name)] = "true" if value else "false"
        elif isinstance(value, bytes | bytearray):  # a byte array, or a non-UTF-8 string
            out[str(name)] = bytes(value)
        elif isinstance(value, int | float | Decimal):
            out[str(name)] = value
        else:
            out[str(name)] = _text(value)
    return out


def _text(value: Any) -> str:
    """A header value as text (nested tables, like ``x-death``, as JSON)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict | list | tuple):
        return orjson.dumps(_plain(value)).decode()
    return str(value)


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return value.decode("utf-8", "replace")
    if isinstance(value, datetime):
        return _iso(value)
    if isinstance(value, Decimal):
        return str(value)
    return value
