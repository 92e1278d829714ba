"""MQTT (aiomqtt over paho-mqtt): a topic filter read through a persistent session,
each QoS 1 message acknowledged (PUBACK) only after its function succeeded.

The session is MQTT 5 with ``clean_start`` off and a session expiry interval, rather
than MQTT 3.1.1's ``clean_session=False``, for three reasons: the session expires on
its own (:data:`SESSION_EXPIRY`) when its trigger is gone for good, instead of living
on the broker forever; ``Receive Maximum`` tells the broker how many unacknowledged
messages Nimbus takes at once, per trigger (MQTT 3.1.1 only has the broker-wide
``max_inflight_messages``, 20 in Mosquitto); and user properties carry headers, the
``nimbus-depth`` among them.

While Nimbus is away, or after the connection dropped, the broker keeps the
subscription and every QoS 1 message: those queued, and those sent but never
acknowledged, which it sends again (``duplicate: true``) when the session resumes.
MQTT has no redelivery on a live connection and no negative acknowledgement: the
dispatcher's retries are the redelivery after a function error.

Back-pressure: the broker sends at most ``Receive Maximum`` = ``(max_concurrency + 1)
* batch_size`` unacknowledged messages (what the dispatcher can hold: its invocations
plus one batch waiting for a slot); the source takes them from the client one at a
time, as ``emit`` returns. (Mosquitto 2.0.11 honours the window at first, then lets
it grow: the extra messages wait unacknowledged in the client, never in the
dispatcher, and are redelivered like the rest if Nimbus stops.)

aiomqtt 2.5 acknowledges every message itself and drops the DUP flag: :class:`_Client`
turns on paho's ``manual_ack`` and keeps the flag. Acknowledgements are sent in the
order functions finish, not the order messages came; MQTT asks for the latter, but
brokers (Mosquitto, EMQX, HiveMQ) count acknowledgements per packet id, and waiting
for the oldest would let one slow message hold up every other.

**Records.** With ``shape: iot`` the event is the payload itself (see
:mod:`nimbus.triggers.records`); the topic is the one thing an IoT rule could add.
A native record has the broker metadata: ``messageId`` (the packet id of a QoS 1
message, which MQTT reuses once acked; a fresh id for QoS 0), ``topic``, ``qos``,
``retain``, ``duplicate``, ``headers`` (user properties), and ``contentType``,
``responseTopic`` and ``correlationData`` when present.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

import aiomqtt
import paho.mqtt.client as paho
from aiomqtt.exceptions import MqttConnectError
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from nimbus.triggers.sources.base import (
    DEPTH_HEADER,
    ConfigurationError,
    Emit,
    Message,
    Published,
    depth_of,
    describe_error,
    keep_connected,
)
from nimbus.triggers.specs import MqttTrigger, redact_url

if TYPE_CHECKING:
    from nimbus.triggers.events import TriggerContext

log = logging.getLogger("nimbus.triggers")

#: Seconds the broker keeps the session (subscription and messages) while nobody is
#: connected with its client id.
SESSION_EXPIRY = 7 * 24 * 3600
#: Seconds between keep-alive pings; a silent broker is noticed within 1.5 times this.
KEEPALIVE = 30
#: Seconds to wait for the broker to accept a connection, a subscription, a publish.
TIMEOUT = 10.0
#: Seconds a clean disconnect may take before the connection is just dropped.
CLOSE_TIMEOUT = 3.0
#: On stop, seconds the messages already handed to the function may take to be acked
#: before the connection closes (after that, the broker sends them again: duplicates).
SETTLE_TIMEOUT = 10.0
#: QoS 0 messages are not bounded by ``Receive Maximum``: past this many waiting in
#: the client they are dropped (QoS 0 is at most once anyway).
QOS0_BACKLOG = 1000
#: MQTT 5 reason codes that retrying soon will not fix (CONNACK).
REFUSED = {
    0x84: "the broker does not speak MQTT 5",
    0x85: "the broker refused the client id",
    0x86: "bad user name or password",
    0x87: "not authorized (check the user name and password)",
    0x8A: "the client is banned",
    0x8C: "bad authentication method",
}
#: DISCONNECT: another connection with this client id took the session (another node
#: running the trigger?). Mosquitto 2.0 sends no reason, it just closes the socket: the
#: two then take turns, each reconnect a plain "connection lost".
SESSION_TAKEN_OVER = 0x8E


class _Received(aiomqtt.Message):
    """aiomqtt's message, with the DUP flag: the broker sent it before, unacknowledged."""

    dup: bool = False


class _Client(aiomqtt.Client):
    """aiomqtt's client with manual acknowledgement (paho's ``manual_ack``), the DUP
    flag kept, and a disconnect that never raises (it runs while stopping)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._client.manual_ack_set(True)
        self.session_present = False
        self.dropped = 0

    @property
    def connected(self) -> bool:
        return self._client.is_connected()

    def acknowledge(self, mid: int, qos: int) -> bool:
        """PUBACK ``mid``, if the connection it came on is still up: packet ids belong
        to a connection, and after a reconnect the broker resends the message anyway."""
        if qos == 0:
            return True
        if not self.connected:
            return False
        return self._client.ack(mid, qos) == paho.MQTT_ERR_SUCCESS

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None = None,
    ) -> None:
        self.session_present = bool(flags.session_present)
        super()._on_connect(client, userdata, flags, reason_code, properties)

    def _on_message(self, client: paho.Client, userdata: Any, message: paho.MQTTMessage) -> None:
        if message.qos == 0 and self._queue.qsize() >= QOS0_BACKLOG:
            self.dropped += 1
            if self.dropped % QOS0_BACKLOG == 1:
                log.warning(
                    "mqtt %s: QoS 0 messages arrive faster than they are handled: "
                    "%d dropped so far",
                    self.identifier,
                    self.dropped,
                )
            return
        received = _Received._from_paho_message(message)
        received.dup = bool(message.dup)
        self._queue.put_nowait(received)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.timeout = CLOSE_TIMEOUT
        try:
            await super().__aexit__(exc_type, exc, tb)
        except aiomqtt.MqttError as e:
            log.debug("mqtt: disconnecting: %s", describe_error(e))


class _Unsettled:
    """The messages of one connection handed to ``emit`` and not yet acked."""

    def __init__(self) -> None:
        self.ids: set[int] = set()
        self.none_left = asyncio.Event()
        self.none_left.set()

    def add(self, message: Message) -> None:
        self.ids.add(id(message))
        self.none_left.clear()

    def discard(self, message: Message) -> None:
        self.ids.discard(id(message))
        if not self.ids:
            self.none_left.set()


class MqttSource:
    """Reads ``spec.topic`` through the session ``client_id`` until cancelled."""

    def __init__(self, spec: MqttTrigger, context: TriggerContext) -> None:
        self.spec = spec
        self.context = context
        # The trigger's own URL first: the context's is the server's default.
        self.url = context.broker_url
        self.client_id = spec.client_id or context.default_id

    async def run(self, emit: Emit) -> None:
        what = (
            f"{self.context.trigger} of {self.context.function} "
            f"(mqtt topic {self.spec.topic!r} at {redact_url(self.url)})"
        )
        await keep_connected(what, self.context.status, lambda: self._session(emit))

    # -- one connection ----------------------------------------------------------------
    async def _session(self, emit: Emit) -> None:
        client = _Client(**client_options(self.url, self.client_id, self._receive_maximum()))
        await self._open(client)
        unsettled = _Unsettled()
        try:
            await self._subscribe(client)
            self.context.status.set("connected")
            log.info(
                "trigger %s of %s: subscribed to %r at %s as %s (%s session)",
                self.context.trigger,
                self.context.function,
                self.spec.topic,
                redact_url(self.url),
                self.client_id,
                "resumed" if client.session_present else "new",
            )
            await self._consume(client, emit, unsettled)
        except asyncio.CancelledError:
            # Take nothing more, but let what the function is doing be acked on this
            # connection: after it closes, the broker sends those messages again.
            if unsettled.ids:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(unsettled.none_left.wait(), SETTLE_TIMEOUT)
            raise
        except aiomqtt.MqttError as e:
            raise self._failure(e) from None
        finally:
            await client.__aexit__(None, None, None)

    def _receive_maximum(self) -> int:
        """As many unacked messages as the dispatcher holds: its invocations, plus the
        batch that waits for one of them to finish."""
        return min(65535, (self.spec.max_concurrency + 1) * self.spec.batch_size)

    async def _open(self, client: _Client) -> None:
        """Connect; if cancelled meanwhile, finish connecting and disconnect, so that no
        stray connection holds the session (and its messages) away from the next one."""
        connecting = asyncio.ensure_future(client.__aenter__())
        try:
            await asyncio.shield(connecting)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await connecting
                await client.__aexit__(None, None, None)
            raise
        except aiomqtt.MqttError as e:
            raise self._failure(e) from None

    async def _subscribe(self, client: _Client) -> None:
        # Retained messages only when the subscription is new: a resumed session has
        # had them already.
        options = SubscribeOptions(qos=self.spec.qos, retainHandling=1)
        granted = await client.subscribe(self.spec.topic, options=options)
        code = granted[0]
        value = code.value if isinstance(code, ReasonCode) else int(code)
        if value >= 0x80:
            raise ConfigurationError(
                f"the broker refused the subscription to {self.spec.topic!r} ({code})"
            )
        if value < self.spec.qos:
            log.warning(
                "trigger %s of %s: the broker granted QoS %d for %r, not %d: messages "
                "are delivered at most once",
                self.context.trigger,
                self.context.function,
                value,
                self.spec.topic,
                self.spec.qos,
            )

    async def _consume(self, client: _Client, emit: Emit, unsettled: _Unsettled) -> None:
        async for received in client.messages:
            if not client.connected:
                continue  # from a connection that is gone: the broker sends it again
            assert isinstance(received, _Received)
            message = self._message(client, received, unsettled)
            unsettled.add(message)
            try:
                await emit(message)
            except asyncio.CancelledError:
                unsettled.discard(message)  # never started: dropped with the dispatcher
                raise
        raise ConnectionError("the message stream ended")  # pragma: no cover

    # -- one message -------------------------------------------------------------------
    def _message(self, client: _Client, received: _Received, unsettled: _Unsettled) -> Message:
        properties = received.properties
        user = _user_properties(properties)
        # A QoS 0 message has no packet id; a QoS 1 one's is reused once acked.
        message_id = str(received.mid) if received.qos else uuid.uuid4().hex
        record: dict[str, Any] = {
            "topic": received.topic.value,
            "qos": received.qos,
            "retain": bool(received.retain),
            "duplicate": received.dup,
            "headers": user,
        }
        for name, field in (("ContentType", "contentType"), ("ResponseTopic", "responseTopic")):
            value = getattr(properties, name, None)
            if value:
                record[field] = str(value)
        correlation = getattr(properties, "CorrelationData", None)
        if correlation:
            record["correlationData"] = bytes(correlation).decode("utf-8", "replace")
        payload = received.payload if isinstance(received.payload, bytes) else b""
        message = Message(
            body=payload,
            id=message_id,
            origin=Published(topic=received.topic.value),
            record=record,
            depth=depth_of(user.get(DEPTH_HEADER)),
        )

        async def ack() -> None:
            try:
                if not client.acknowledge(received.mid, received.qos):
                    log.info(
                        "trigger %s of %s: message %s came on a connection that is gone; "
                        "the broker sends it again",
                        self.context.trigger,
                        self.context.function,
                        message_id,
                    )
            finally:
                unsettled.discard(message)

        message.ack = ack
        if self.spec.dead_letter_topic is not None:
            message.dead_letter = self._dead_letterer(client, received, ack)
        if record.get("responseTopic"):
            message.reply = self._replier(client, record["responseTopic"], correlation)
        return message

    def _dead_letterer(
        self, client: _Client, received: _Received, ack: Callable[[], Awaitable[None]]
    ) -> Callable[[], Awaitable[None]]:
        topic = str(self.spec.dead_letter_topic)

        async def dead_letter() -> None:
            if not client.connected:
                # Not acked: the broker sends it again on the next connection.
                raise ConnectionError(
                    f"cannot dead-letter message {received.mid} to {topic!r}: its "
                    "connection is gone"
                )
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            user = list(getattr(received.properties, "UserProperty", None) or [])
            properties.UserProperty = [*user, ("nimbus-original-topic", received.topic.value)]
            content_type = getattr(received.properties, "ContentType", None)
            if content_type:
                properties.ContentType = content_type
            await client.publish(topic, received.payload, qos=1, properties=properties)
            await ack()

        return dead_letter

    @staticmethod
    def _replier(
        client: _Client, topic: str, correlation: bytes | None
    ) -> Callable[[bytes], Awaitable[None]]:
        """MQTT 5 request-response: the result goes to the request's Response Topic."""

        async def reply(body: bytes) -> None:
            properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            properties.ContentType = "application/json"
            if correlation:
                properties.CorrelationData = bytes(correlation)
            await client.publish(topic, body, qos=1, properties=properties)

        return reply

    # -- errors ------------------------------------------------------------------------
    def _failure(self, e: aiomqtt.MqttError) -> Exception:
        """The error as the trigger's state shows it (never with the URL's password),
        a :class:`ConfigurationError` when retrying soon cannot help."""
        where = redact_url(self.url)
        cause = e.__cause__ if e.__cause__ is not None else e  # why iterating stopped
        code = getattr(cause, "rc", None)
        value = code.value if isinstance(code, ReasonCode) else code
        if isinstance(e, MqttConnectError) and value in REFUSED:
            return ConfigurationError(f"{where}: {REFUSED[value]} ({code})")
        if isinstance(e, MqttConnectError) and value in (1, 2, 4, 5):
            return ConfigurationError(f"{where}: the broker refused the connection ({e})")
        if value == SESSION_TAKEN_OVER:
            return ConfigurationError(
                f"another client connected as {self.client_id!r} and took the session "
                "over: is another Nimbus node running this trigger?"
            )
        reason = self._scrub(describe_error(cause))
        if cause is not e:  # it broke while consuming
            return ConnectionError(f"{where}: the connection was lost ({reason})")
        return ConnectionError(f"{where}: {reason}")

    def _scrub(self, text: str) -> str:
        password = urlsplit(self.url).password
        return text.replace(unquote(password), "***") if password else text


def client_options(url: str, client_id: str, receive_maximum: int) -> dict[str, Any]:
    """aiomqtt ``Client`` arguments for a persistent MQTT 5 session at ``url``
    (``mqtt://``, ``tcp://`` or ``mqtts://``, with ``user:password@`` if any)."""
    parts = urlsplit(url)
    tls = parts.scheme == "mqtts"
    properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    properties.SessionExpiryInterval = SESSION_EXPIRY
    properties.ReceiveMaximum = receive_maximum
    options: dict[str, Any] = {
        "hostname": parts.hostname or "127.0.0.1",
        "port": parts.port or (8883 if tls else 1883),
        "identifier": client_id,
        "protocol": aiomqtt.ProtocolVersion.V5,
        "clean_start": False,
        "properties": properties,
        "keepalive": KEEPALIVE,
        "timeout": TIMEOUT,
    }
    if parts.username is not None:
        options["username"] = unquote(parts.username)
        options["password"] = unquote(parts.password) if parts.password is not None else None
    if tls:
        options["tls_context"] = ssl.create_default_context()
    return options


def _user_properties(properties: Properties | None) -> dict[str, str]:
    """MQTT 5 user properties as headers (a repeated name: its last value)."""
    pairs = getattr(properties, "UserProperty", None) or []
    return {str(name): str(value) for name, value in pairs}
