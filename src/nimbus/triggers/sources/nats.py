"""NATS: a JetStream durable pull consumer (``stream`` set), or a core NATS queue group.

**JetStream** (at least once). The stream is created, capturing ``subject``, unless
it exists (or ``create_stream`` is false: then a missing stream is a configuration
error). The trigger reads through a durable *pull* consumer (``durable``, default
``nimbus-<function>-<trigger>``) filtered on ``subject``, with explicit acks and
``ack_wait``; a new consumer starts at the stream's first message. Messages are
fetched ``batch_size`` at a time, and only once ``emit`` has taken the previous
ones: while the trigger is at ``max_concurrency`` nothing more is fetched, and the
rest stays in the stream. A message is acked after its invocation succeeded.

While Nimbus holds a message (waiting for a free slot, running, retrying with
backoff) it tells JetStream every third of ``ack_wait`` that the message is still
being worked on (``+WPI``), so however long the dispatcher's retries take, JetStream
does not hand it out again meanwhile; ``ack_wait`` only bounds how long a message
taken by a Nimbus that died (or lost its connection) waits to be redelivered. That
is why a short ``ack_wait`` is safe, and not ``ack_wait`` longer than the retries.

NATS has no dead-letter queue of its own. With ``dead_letter_subject``, a message
that failed every retry (or was stopped by the recursion guard) is published there
with its headers (less the ``Nats-*`` ones the server would interpret), a
``Nimbus-Failure`` header (``RetriesExhausted`` or ``RecursiveInvocationDetected``)
and the function, trigger and original subject; a stream capturing that subject
confirms it stored it before the original is terminated (``+TERM``). Without it,
Nimbus's dead-letter destination takes the message.

**Core NATS** (at most once). A subscription in the queue group ``queue`` (default
``nimbus-<function>-<trigger>``): the group shares the messages, and there are no
acknowledgements. A message that arrives while the trigger is busy waits in the
client's buffer; one that arrives while Nimbus is disconnected or stopped is lost,
and so is the buffer's content when Nimbus stops. A request (a message with a reply
subject, e.g. ``nats request``) is answered with the function's result.

**Connection.** One per trigger, without the client's own reconnection: a dropped
connection ends the session and :func:`keep_connected` connects again, so the
trigger's state shows the outage. Acks, progress and terms go out on whichever
connection is current (a JetStream ack subject is valid on any), so a message taken
before a reconnection is still settled after it. When the trigger stops, the
connection stays open up to :data:`LINGER` seconds for the invocations still
running to ack; what is unsettled then is handed back (``-NAK``) for redelivery.
The URL is only ever shown redacted.

**Records.** A JetStream message's id is its stream sequence; its SQS attributes are
the stream (the queue of its ARN), JetStream's ``num_delivered``, the time the
stream stored it, and its headers as message attributes. A core message's id is its
``Nats-Msg-Id`` header, else a fresh one; its queue is the trigger's subject (with
``.`` as ``-`` and wildcards as words: ``orders.>`` is ``orders-all``). The broker
metadata (a native record, or ``nimbus`` in an SQS one): ``subject``, ``stream``,
``consumer``, ``streamSequence``, ``consumerSequence``, ``deliveryCount``,
``redelivered``, ``timestamp`` and ``headers``; for core NATS ``subject``, ``queue``,
``request`` and ``headers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import re
import uuid
from typing import TYPE_CHECKING, Any

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import (
    ConnectionClosedError,
    NoRespondersError,
    NoServersError,
    SlowConsumerError,
)
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig
from nats.js.errors import APIError, NotFoundError, ServiceUnavailableError

from nimbus.triggers.sources.base import (
    DEPTH_HEADER,
    ConfigurationError,
    Emit,
    Message,
    Queued,
    depth_of,
    describe_error,
    keep_connected,
)
from nimbus.triggers.specs import NatsTrigger, redact_url

if TYPE_CHECKING:
    from nimbus.triggers.events import TriggerContext

log = logging.getLogger("nimbus.triggers")

#: How long one pull request waits for messages on the server, seconds.
FETCH_WAIT = 5.0
#: How long a stopped trigger keeps its connection for running invocations to ack
#: (longer than the server's shutdown grace, 30 s by default, which they are given).
LINGER = 120.0
#: How long an ack waits for a connection (one is being re-established), seconds.
CONTROL_WAIT = 5.0
#: Core NATS: what the client buffers while the trigger is busy, before it drops.
CORE_PENDING_MSGS = 65_536
CORE_PENDING_BYTES = 64 * 1024 * 1024
FAILURE_HEADER = "Nimbus-Failure"
#: Characters a JetStream consumer name cannot have (a trigger name may have ``.``).
_NOT_IN_NAMES = re.compile(r"[\s.*>/\\]")
#: Stopped triggers' connections, lingering for their last acks.
_LINGERING: set[asyncio.Task[None]] = set()


def _header(headers: dict[str, str], name: str) -> str | None:
    """A header's value, whatever the case of its name (NATS keeps it as sent)."""
    for key, value in headers.items():
        if key.lower() == name:
            return value
    return None


class NatsSource:
    """One NATS trigger: JetStream pull consumer or core queue subscription."""

    def __init__(self, spec: NatsTrigger, context: TriggerContext) -> None:
        url = context.broker_url
        self.spec = spec
        self.context = context
        # nats-py knows nats:// and tls://.
        self._url = re.sub(r"^nats\+tls://", "tls://", url)
        self.shown_url = redact_url(url)
        self.consumer = _NOT_IN_NAMES.sub("_", spec.durable or context.default_id)
        self.queue = spec.queue or context.default_id
        self._nc: Client | None = None
        self._ready = asyncio.Event()
        #: Messages taken and not yet settled: token → JetStream ack subject (None: core).
        self._held: dict[int, str | None] = {}
        self._settled = asyncio.Event()
        self._settled.set()
        self._tokens = itertools.count()
        #: Ack subjects of messages taken but never handed to the dispatcher (stopping).
        self._returned: list[str] = []
        self._last_error: str | None = None
        self._dropped = 0

    @property
    def _what(self) -> str:
        return f"{self.context.trigger} of {self.context.function} (nats {self.shown_url})"

    async def run(self, emit: Emit) -> None:
        keeper = asyncio.create_task(self._keep_held()) if self.spec.stream else None
        try:
            await keep_connected(self._what, self.context.status, lambda: self._session(emit))
        finally:
            closing = asyncio.get_running_loop().create_task(self._close(keeper))
            _LINGERING.add(closing)
            closing.add_done_callback(_LINGERING.discard)
            if not self._held:
                await asyncio.shield(closing)

    # -- one connection ------------------------------------------------------------------
    async def _session(self, emit: Emit) -> None:
        nc = await self._connect()
        cancelled = False
        try:
            if self.spec.stream is None:
                await self._consume_core(nc, emit)
            else:
                await self._consume_stream(nc, self.spec.stream, emit)
        except asyncio.CancelledError:
            cancelled = True  # the connection stays open for the held messages (see run)
            raise
        except ConnectionClosedError:
            raise ConnectionError(
                f"lost the connection to {self.shown_url}: {self._last_error or 'closed'}"
            ) from None
        finally:
            if not cancelled:
                if self._nc is nc:
                    self._nc = None
                    self._ready.clear()
                await nc.close()

    async def _connect(self) -> Client:
        if not self._url:
            raise ConfigurationError("no NATS URL: set the trigger's url or nimbus up --nats-url")
        self._last_error = None
        try:
            nc = await nats.connect(
                self._url,
                name=f"nimbus {self.context.function}/{self.context.trigger}",
                allow_reconnect=False,
                # One attempt, then one more at once: keep_connected does the waiting.
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                connect_timeout=5,
                ping_interval=10,
                max_outstanding_pings=3,
                error_cb=self._on_error,
            )
        except NoServersError:
            raise ConnectionError(
                f"cannot connect to {self.shown_url}: {self._last_error or 'no server'}"
            ) from None
        except NatsError as e:
            text = str(e).lower()
            if "authorization" in text or "authentication" in text:
                raise ConfigurationError(
                    f"{self.shown_url} refused the trigger's credentials ({describe_error(e)})"
                ) from None
            raise
        self._nc = nc
        self._ready.set()
        return nc

    async def _on_error(self, e: Exception) -> None:
        if isinstance(e, SlowConsumerError):
            self._dropped += 1
            if self._dropped == 1 or self._dropped % 1000 == 0:
                log.warning(
                    "trigger %s: %d core NATS message(s) dropped so far: the function does "
                    "not keep up (core NATS has no back-pressure; use a JetStream stream)",
                    self._what,
                    self._dropped,
                )
            return
        self._last_error = describe_error(e)
        log.debug("trigger %s: %s", self._what, self._last_error)

    # -- JetStream -----------------------------------------------------------------------
    async def _consume_stream(self, nc: Client, stream: str, emit: Emit) -> None:
        js = nc.jetstream()
        await self._ensure_stream(js, stream)
        config = ConsumerConfig(
            name=self.consumer,
            durable_name=self.consumer,
            ack_policy=AckPolicy.EXPLICIT,
            ack_wait=self.spec.ack_wait,
            filter_subject=self.spec.subject,
        )
        try:
            # Creates the consumer, or updates it (ack_wait, subject) to the spec.
            await js.add_consumer(stream, config)
        except APIError as e:
            if isinstance(e, ServiceUnavailableError):
                raise
            raise ConfigurationError(
                f"cannot create consumer {self.consumer!r} on stream {stream!r}: {e.description}"
            ) from None
        sub = await js.pull_subscribe_bind(durable=self.consumer, stream=stream)
        self.context.status.set("connected")
        try:
            while True:
                try:
                    msgs = await sub.fetch(self.spec.batch_size, timeout=FETCH_WAIT)
                except TimeoutError:
                    continue
                await self._emit_all(emit, [self._stream_message(m) for m in msgs])
        finally:
            with contextlib.suppress(NatsError, ValueError):
                await sub.unsubscribe()

    async def _ensure_stream(self, js: JetStreamContext, stream: str) -> None:
        try:
            await js.stream_info(stream)
            return
        except NotFoundError:
            if not self.spec.create_stream:
                raise ConfigurationError(
                    f"stream {stream!r} does not exist (and create_stream is false)"
                ) from None
        except (NoRespondersError, ServiceUnavailableError):
            raise ConfigurationError(f"JetStream is not enabled on {self.shown_url}") from None
        try:
            await js.add_stream(StreamConfig(name=stream, subjects=[self.spec.subject]))
        except APIError as e:
            raise ConfigurationError(f"cannot create stream {stream!r}: {e.description}") from None
        log.info("trigger %s: created stream %s on %s", self._what, stream, self.spec.subject)

    def _stream_message(self, msg: Msg) -> tuple[int, Message]:
        meta = msg.metadata
        headers = dict(msg.headers or {})
        token = self._hold(msg.reply)
        record = {
            "subject": msg.subject,
            "stream": meta.stream,
            "consumer": meta.consumer,
            "streamSequence": meta.sequence.stream,
            "consumerSequence": meta.sequence.consumer,
            "deliveryCount": meta.num_delivered,
            "redelivered": meta.num_delivered > 1,
            "timestamp": meta.timestamp.isoformat(),
            "headers": headers,
        }
        origin = Queued(
            queue=meta.stream,
            delivery_count=meta.num_delivered,
            sent_at=meta.timestamp.timestamp(),
            attributes=headers,
        )
        message_id = str(meta.sequence.stream)
        return token, self._message(token, msg, message_id, origin, record)

    async def _keep_held(self) -> None:
        """Tell JetStream the held messages are still being worked on (``+WPI`` resets
        their ``ack_wait``), every third of it, until the trigger is closed."""
        while True:
            await asyncio.sleep(self.spec.ack_wait / 3)
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue  # the next connection takes over; a long outage means redelivery
            for subject in [s for s in self._held.values() if s]:
                with contextlib.suppress(NatsError):
                    await nc.publish(subject, Msg.Ack.Progress)

    # -- core NATS -----------------------------------------------------------------------
    async def _consume_core(self, nc: Client, emit: Emit) -> None:
        sub = await nc.subscribe(
            self.spec.subject,
            queue=self.queue,
            pending_msgs_limit=CORE_PENDING_MSGS,
            pending_bytes_limit=CORE_PENDING_BYTES,
        )
        await nc.flush()  # the server has the subscription: messages from now on arrive
        self.context.status.set("connected")
        try:
            while True:
                msg = await sub.next_msg(timeout=None)
                await self._emit_all(emit, [self._core_message(msg)])
        finally:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()

    def _core_message(self, msg: Msg) -> tuple[int, Message]:
        headers = dict(msg.headers or {})
        token = self._hold(None)
        record = {
            "subject": msg.subject,
            "queue": self.queue,
            "request": bool(msg.reply),
            "headers": headers,
        }
        message_id = _header(headers, "nats-msg-id") or uuid.uuid4().hex
        origin = Queued(queue=self.spec.subject, attributes=headers)
        message = self._message(token, msg, message_id, origin, record)
        if msg.reply:
            message.reply = functools.partial(self._publish, msg.reply)
        return token, message

    # -- messages ------------------------------------------------------------------------
    def _message(
        self, token: int, msg: Msg, message_id: str, origin: Queued, record: dict[str, Any]
    ) -> Message:
        depth = depth_of(_header(record["headers"], DEPTH_HEADER))
        dead_letter = None
        if self.spec.dead_letter_subject:
            dead_letter = functools.partial(self._dead_letter, token, msg, depth)
        return Message(
            body=msg.data,
            id=message_id,
            origin=origin,
            record=record,
            ack=functools.partial(self._settle, token, Msg.Ack.Ack),
            dead_letter=dead_letter,
            depth=depth,
        )

    async def _emit_all(self, emit: Emit, taken: list[tuple[int, Message]]) -> None:
        for i, (_, message) in enumerate(taken):
            try:
                await emit(message)
            except asyncio.CancelledError:
                # Stopping: these were never started; hand them back at once.
                for token, _ in taken[i:]:
                    subject = self._release(token)
                    if subject:
                        self._returned.append(subject)
                raise

    def _hold(self, subject: str | None) -> int:
        token = next(self._tokens)
        self._held[token] = subject
        self._settled.clear()
        return token

    def _release(self, token: int) -> str | None:
        """Forget a held message; its ack subject (None for core NATS or when it was
        already released)."""
        subject = self._held.pop(token, None)
        if not self._held:
            self._settled.set()
        return subject

    async def _settle(self, token: int, verdict: bytes) -> None:
        if token not in self._held:
            return
        subject = self._release(token)
        if subject is not None:
            await self._publish(subject, verdict)

    async def _current(self) -> Client | None:
        """The live connection, waiting a little while one is being re-established."""
        if not self._ready.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), CONTROL_WAIT)
        nc = self._nc
        return nc if nc is not None and nc.is_connected else None

    async def _publish(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> None:
        """Publish on the current connection; failing that, the message is the server's
        to redeliver (JetStream) or lost (a core reply), and that is logged."""
        nc = await self._current()
        try:
            if nc is None:
                raise ConnectionClosedError
            await nc.publish(subject, payload, headers=headers)
        except NatsError as e:
            log.warning(
                "trigger %s: could not publish to %s (%s); a JetStream message is "
                "redelivered after ack_wait",
                self._what,
                subject,
                describe_error(e),
            )

    async def _dead_letter(self, token: int, msg: Msg, depth: int) -> None:
        """Publish the message on ``dead_letter_subject``, then terminate the original."""
        subject = self.spec.dead_letter_subject
        assert subject is not None
        failure = (
            "RecursiveInvocationDetected" if depth >= self.spec.max_depth else "RetriesExhausted"
        )
        headers = {k: v for k, v in (msg.headers or {}).items() if not k.startswith("Nats-")}
        headers.update(
            {
                FAILURE_HEADER: failure,
                "Nimbus-Function": self.context.function,
                "Nimbus-Trigger": self.context.trigger,
                "Nimbus-Subject": msg.subject,
            }
        )
        nc = await self._current()
        try:
            if nc is None:
                raise ConnectionClosedError
            js = nc.jetstream()
            if await self._stored(js, subject):
                await js.publish(subject, msg.data, headers=headers)  # waits for the stream's ack
            else:
                await nc.publish(subject, msg.data, headers=headers)
                await nc.flush()
        except (NatsError, TimeoutError) as e:
            # Keep it unsettled: JetStream redelivers it after ack_wait (core: it is lost).
            self._release(token)
            log.warning(
                "trigger %s: could not dead-letter a message to %s (%s)",
                self._what,
                subject,
                describe_error(e),
            )
            return
        await self._settle(token, Msg.Ack.Term)

    @staticmethod
    async def _stored(js: JetStreamContext, subject: str) -> bool:
        """Whether a stream captures ``subject`` (then a publish is confirmed)."""
        try:
            await js.find_stream_name_by_subject(subject)
        except (NatsError, TimeoutError):  # no stream, or no JetStream at all
            return False
        return True

    # -- stopping ------------------------------------------------------------------------
    async def _close(self, keeper: asyncio.Task[None] | None) -> None:
        """Hand back what was never started, give the running invocations up to
        :data:`LINGER` seconds to settle theirs, hand back the rest, disconnect."""
        try:
            returned, self._returned = self._returned, []
            if self._nc is None or not self._nc.is_connected:
                return  # nothing can be settled any more: JetStream redelivers after ack_wait
            for subject in returned:
                await self._publish(subject, Msg.Ack.Nak)
            if self._held:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settled.wait(), LINGER)
            for token in list(self._held):
                await self._settle(token, Msg.Ack.Nak)
        finally:
            if keeper is not None:
                keeper.cancel()
            nc, self._nc = self._nc, None
            self._ready.clear()
            if nc is not None:
                with contextlib.suppress(NatsError, OSError):
                    await nc.close()
