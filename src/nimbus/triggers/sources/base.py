"""What every trigger source is: ``run(emit)`` over a broker connection, with messages
that know how to acknowledge themselves.

A source connects, consumes, and hands each message to ``emit``; ``emit`` returns
once the trigger has room for it (so a slow function slows the consumer down instead
of letting messages pile up in memory), and the :class:`Message`'s callbacks are
called later by the dispatcher: ``ack`` after the function succeeded, ``dead_letter``
after the last retry failed, ``reply`` with the result for request-reply. A message
neither acked nor dead-lettered (Nimbus stopped, the connection dropped) is the
broker's to redeliver: delivery is at least once.

:func:`keep_connected` is the loop every source runs: connect and consume; on any
failure record it in the trigger's :class:`Status` (``reconnecting`` with the error)
and try again with capped exponential backoff, forever, until cancelled.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Literal, Protocol

log = logging.getLogger("nimbus.triggers")

#: The header (or property, or field) that carries a message's recursion depth.
DEPTH_HEADER = "nimbus-depth"

State = Literal["starting", "connected", "reconnecting", "error", "stopped"]


async def _nothing() -> None:
    return None


#: A broker header or field as a message attribute: text (``String``), a number
#: (``Number``) or bytes (``Binary``), as SQS types them.
AttributeValue = str | int | float | Decimal | bytes


@dataclass(frozen=True, slots=True)
class Queued:
    """What a queue-like broker (Redis Streams, NATS, AMQP) says of a message: what its
    SQS-shaped record is made of."""

    kind: Literal["queued"] = field(default="queued", init=False)
    #: The queue, stream or subject the message came from (the record's ARN names it).
    queue: str = ""
    #: The broker's own count of deliveries of this message: 1 the first time.
    delivery_count: int = 1
    #: When it was sent, epoch seconds, where the broker says (else: when it was received).
    sent_at: float | None = None
    #: Who sent it, where the broker vouches for it (AMQP's ``user_id``).
    sender: str | None = None
    #: Headers or fields, as the message's attributes.
    attributes: Mapping[str, AttributeValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Published:
    """An MQTT message: its topic (what an AWS IoT rule's ``topic()`` gives)."""

    kind: Literal["published"] = field(default="published", init=False)
    topic: str = ""


FileChangeKind = Literal["created", "modified", "deleted", "moved"]


@dataclass(frozen=True, slots=True)
class FileChange:
    """A settled change of one file in a watched directory."""

    kind: Literal["file"] = field(default="file", init=False)
    change: FileChangeKind = "created"
    #: The path on the node, and relative to the watched directory.
    path: str = ""
    key: str = ""
    #: The path inside the function's sandbox, when the trigger mounts the directory.
    local_path: str | None = None
    #: Size and modification time (epoch seconds); None for a deleted file.
    size: int | None = None
    mtime: float | None = None
    #: Identifies this version of the file (changes when the file does); None when deleted.
    etag: str | None = None
    #: When the change happened: the mtime of a written file, else when it was seen.
    at: float = 0.0
    #: A move: where the file was.
    old_path: str | None = None
    old_key: str | None = None


Origin = Queued | Published | FileChange


@dataclass(slots=True)
class Message:
    """One message from a broker (or one file event), ready to become an invocation's event."""

    #: The payload, as the broker gave it.
    body: bytes
    #: The message's id: its record's ``messageId`` (an S3 record's ``sequencer``), what a
    #: partial batch response's ``itemIdentifier`` names.
    id: str
    #: What the broker says of it, typed: the Lambda-shaped records are made from this.
    origin: Origin
    #: The broker's own metadata (subject, stream, delivery tag, headers as given,
    #: delivery count...): merged into a ``native`` record, under ``nimbus`` in the others.
    record: dict[str, Any] = field(default_factory=dict)
    #: Acknowledge: the broker may forget the message.
    ack: Callable[[], Awaitable[None]] = _nothing
    #: Hand the message to the broker's own dead-letter mechanism (then it is settled);
    #: ``None`` where the trigger has none: Nimbus's dead-letter destination takes it.
    dead_letter: Callable[[], Awaitable[None]] | None = None
    #: Request-reply: send the function's result to the requester.
    reply: Callable[[bytes], Awaitable[None]] | None = None
    #: How many triggered invocations led to this message (the ``nimbus-depth`` header).
    depth: int = 0
    #: When Nimbus took this delivery of it, epoch seconds.
    received_at: float = field(default_factory=time.time)
    #: This delivery (receipt handles are made from it): new each time the broker
    #: hands the message over, even when its id is the same.
    delivery: str = field(default_factory=lambda: uuid.uuid4().hex)


Emit = Callable[[Message], Awaitable[None]]


class Source(Protocol):
    """A trigger source: consume until cancelled, reconnecting on its own."""

    async def run(self, emit: Emit) -> None: ...


@dataclass
class Status:
    """A trigger's state as ``nimbus triggers list`` shows it, and its counters."""

    state: State = "starting"
    last_error: str | None = None
    since: float = field(default_factory=time.time)
    received: int = 0
    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    dead_lettered: int = 0
    recursion_stopped: int = 0

    def set(self, state: State, error: str | None = None) -> None:
        if state != self.state:
            self.since = time.time()
        self.state = state
        if error is not None:
            self.last_error = error

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "last_error": self.last_error,
            "since": self.since,
            "received": self.received,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "retried": self.retried,
            "dead_lettered": self.dead_lettered,
            "recursion_stopped": self.recursion_stopped,
        }


class ConfigurationError(Exception):
    """The broker answered, but the trigger cannot work as configured (no such queue,
    wrong credentials...): its state is ``error`` and it retries slowly."""


#: ``scheme://user:password@``: what a client library's error message may quote.
_CREDENTIALS = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:)[^\s@/]*@")


#: ``scheme://token@``: a bare user part, which can be a secret (NATS's token auth).
_TOKEN = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^\s:/@]+@")


def scrub(text: str) -> str:
    """``text`` with the password (or bare token) of every URL in it masked."""
    return _TOKEN.sub(r"\1***@", _CREDENTIALS.sub(r"\1***@", text))


def describe_error(e: BaseException) -> str:
    """An error as one line fit for a status and a log: no credentials, not too long."""
    text = scrub(" ".join(str(e).split()) or type(e).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass
class Backoff:
    """Capped exponential backoff with jitter: 0.1 s, 0.2 s, … up to ``cap``."""

    base: float = 0.1
    cap: float = 5.0
    attempt: int = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2**self.attempt))
        self.attempt += 1
        return float(delay * random.uniform(0.8, 1.2))

    def reset(self) -> None:
        self.attempt = 0


async def keep_connected(
    what: str,
    status: Status,
    session: Callable[[], Awaitable[None]],
    *,
    backoff: Backoff | None = None,
) -> None:
    """Run ``session`` (connect, consume; it sets ``connected`` itself) again and again.

    ``session`` returning means the connection ended; raising means it failed. Either
    way the trigger is ``reconnecting`` (``error`` for a :class:`ConfigurationError`)
    and the next attempt waits a little longer. Never returns; cancel it to stop.
    """
    backoff = backoff or Backoff()
    while True:
        connected_before = status.state == "connected"
        try:
            await session()
            error = "the connection closed"
            state: State = "reconnecting"
        except asyncio.CancelledError:
            status.set("stopped")
            raise
        except ConfigurationError as e:
            error, state = describe_error(e), "error"
        except Exception as e:  # every broker client has its own errors
            error, state = describe_error(e), "reconnecting"
        if connected_before or status.state == "connected":
            backoff.reset()  # it worked for a while: start again from the shortest wait
        status.set(state, error)
        delay = backoff.next() if state == "reconnecting" else max(5.0, backoff.next())
        log.warning("trigger %s: %s; retrying in %.1f s", what, error, delay)
        await asyncio.sleep(delay)


def depth_of(value: Any) -> int:
    """A ``nimbus-depth`` header's value as a depth (0 when absent or not a number)."""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    try:
        return max(0, int(str(value).strip())) if value is not None else 0
    except ValueError:
        return 0
