"""Redis Streams: one consumer of a consumer group, reading with XREADGROUP and
acknowledging with XACK after the function succeeded.

The group (``group``, else ``nimbus-<function>-<trigger>``) is created on ``stream``
with MKSTREAM, at ``$`` (only entries added from now on) or at ``0`` with
``start_from: beginning``. Every group gets every entry: two functions, each with its
own group, both see the whole stream (fan-out); triggers that name the same group are
consumers in it and share the entries.

Redis keeps each entry it hands to a consumer on that consumer's pending list (PEL)
until it is acknowledged; that list is what makes delivery at least once:

* The consumer is ``<hostname>-nimbus-<function>-<trigger>``. It is the same every
  time Nimbus starts on this node, so a new process begins by re-reading its own
  pending entries (XREADGROUP from id ``0``: what the previous process read but never
  acknowledged) before asking for new ones (``>``), without waiting for any timeout.
  It differs between nodes, so nodes running the same function are separate consumers
  of the group and never re-read each other's work in flight. (Two Nimbus nodes on
  one host would be one consumer: give them distinct hostnames, e.g. containers.)
* Entries left pending for ``claim_idle`` seconds by another consumer (a node that is
  gone) are taken over with XAUTOCLAIM. So that the entries of a slow function are not
  taken from a live node, the ones this consumer has in flight are touched
  (XCLAIM JUSTID, which resets their idle time) every ``claim_idle / 3`` seconds.
* A read asks for no more entries than the trigger has room for (``max_concurrency`` times
  ``batch_size``, less those in flight), so the rest stay in Redis, undelivered.

Each entry becomes a message whose id is the entry id. Its SQS attributes: the
stream (the queue of its ARN), Redis's delivery count (1 for a new entry), the time
in the entry id (``SentTimestamp``) and every field except ``body`` as a message
attribute (a value that is not UTF-8 is ``Binary``). Its broker metadata (a native
record, or ``nimbus`` in an SQS one): ``stream``, ``group``, ``consumer``,
``deliveryCount``, ``fields`` (every field, as text; a value that is not UTF-8 is
base64 and its name is in ``binaryFields``). The body is the field ``body`` as is,
else the JSON of all the fields; ``nimbus-depth`` is the recursion depth. With
``dead_letter_stream``, an entry that failed every retry
is XADDed there (its fields plus ``nimbus-*`` fields saying where it came from) and
XACKed in one MULTI/EXEC; without it, Nimbus's dead-letter destination takes it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
    RedisError,
    ResponseError,
)

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
from nimbus.triggers.specs import RedisTrigger, redact_url

if TYPE_CHECKING:
    from nimbus.triggers.events import TriggerContext

log = logging.getLogger("nimbus.triggers")

#: How long one XREADGROUP waits for new entries at most, seconds (the loop then
#: looks again at its room and at entries to claim).
MAX_BLOCK = 1.0
#: The longest wait between two rounds of claiming and touching, seconds.
MAX_CLAIM_EVERY = 30.0
#: A command that fails on a dropped connection is tried again this many times
#: (so an ack survives a quick broker restart); a longer outage ends the session.
COMMAND_RETRIES = 3
#: Seconds to wait for a reply (a blocked XREADGROUP replies within MAX_BLOCK).
SOCKET_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
#: The field whose value is the body (else the body is the JSON of all the fields).
BODY_FIELD = b"body"
#: XAUTOCLAIM's cursor when a scan of the pending list is complete.
SCAN_DONE = "0-0"

Fields = Mapping[bytes, bytes]
#: A stream entry as the client returns it: its id and its fields.
Entry = tuple[bytes, Fields]


def consumer_name(context: TriggerContext) -> str:
    """This node's consumer: stable across restarts here, different on another node."""
    return f"{socket.gethostname()}-{context.default_id}"


def decode_fields(fields: Fields) -> tuple[dict[str, str], list[str]]:
    """Every field as text, and the names of those whose value had to be base64."""
    text: dict[str, str] = {}
    binary: list[str] = []
    for raw_name, value in fields.items():
        name = raw_name.decode("utf-8", "replace")
        try:
            text[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            text[name] = base64.b64encode(value).decode("ascii")
            binary.append(name)
    return text, binary


def attributes_of(fields: Fields) -> dict[str, AttributeValue]:
    """The entry's fields but the body, as message attributes: text where it is UTF-8,
    else bytes."""
    out: dict[str, AttributeValue] = {}
    for raw_name, value in fields.items():
        if raw_name == BODY_FIELD:
            continue
        try:
            out[raw_name.decode("utf-8", "replace")] = value.decode("utf-8")
        except UnicodeDecodeError:
            out[raw_name.decode("utf-8", "replace")] = bytes(value)
    return out


def sent_at(entry_id: str) -> float | None:
    """The time an entry id carries (``<ms>-<seq>``), epoch seconds."""
    millis, _, _ = entry_id.partition("-")
    return int(millis) / 1000 if millis.isdigit() else None


def _check_cancelled() -> None:
    """Raise the cancellation that Python 3.11's ``asyncio.wait_for`` lost.

    redis-py sends every command inside ``wait_for``, which on 3.11 returns normally
    when the task is cancelled just as the send completes; the request is still
    counted on the task (``cancelling()``), so honour it here, after each command.
    Without this, stopping a trigger could wait forever for a loop that never ends.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _id(entry_id: bytes | str) -> str:
    return entry_id.decode("ascii") if isinstance(entry_id, bytes) else entry_id


class RedisSource:
    """One trigger's consumer of a Redis stream's consumer group."""

    def __init__(self, spec: RedisTrigger, context: TriggerContext) -> None:
        self.spec = spec
        self.context = context
        # The trigger's own URL first: the context's is the server's default.
        self.url = context.broker_url
        self.group = spec.group or context.default_id
        self.consumer = consumer_name(context)
        #: Messages the trigger can hold at once: what one read may ask for at most.
        self.capacity = spec.max_concurrency * spec.batch_size
        self.claim_every = min(MAX_CLAIM_EVERY, spec.claim_idle / 3)
        self.block_ms = int(min(MAX_BLOCK, self.claim_every) * 1000)
        #: Ids emitted and not yet acked or dead-lettered (this consumer's work in flight).
        self.in_flight: set[str] = set()
        self._settled = asyncio.Event()
        self._client: Redis | None = None
        #: Where the next XAUTOCLAIM continues its scan of the pending list.
        self._claim_cursor = SCAN_DONE
        self._next_claim = 0.0
        #: The source was stopped: what the dispatcher settles after that (invocations
        #: finishing within the trigger's grace) must not leave a connection open.
        self._stopped = False

    @property
    def what(self) -> str:
        return f"{self.context.trigger} of {self.context.function}"

    async def run(self, emit: Emit) -> None:
        try:
            await keep_connected(self.what, self.context.status, lambda: self._session(emit))
        finally:
            self._stopped = True
            await self._disconnect()

    async def _disconnect(self) -> None:
        # The client stays usable (its pool connects again on demand), so an ack that
        # comes after this still goes through, and disconnects again.
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.aclose()

    # -- connecting ----------------------------------------------------------------------
    def _redis(self) -> Redis:
        """The one client for the source's life: its pool reconnects on its own, so the
        ack of a message read before a reconnection still goes through."""
        if self._client is None:
            try:
                self._client = Redis.from_url(
                    self.url,
                    socket_timeout=SOCKET_TIMEOUT,
                    socket_connect_timeout=CONNECT_TIMEOUT,
                    retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), COMMAND_RETRIES),
                )
            except ValueError:
                raise ConfigurationError(
                    f"not a usable Redis URL: {redact_url(self.url)}"
                ) from None
        return self._client

    async def _session(self, emit: Emit) -> None:
        try:
            await self._consume(emit)
        except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as e:
            raise ConfigurationError(
                f"authentication to Redis at {redact_url(self.url)} failed: {self._clean(e)}"
            ) from None
        except NoPermissionError as e:
            raise ConfigurationError(f"Redis denied a command: {self._clean(e)}") from None
        except RedisError as e:
            # The client's errors name the host, never the password; this is for safety.
            raise RedisError(self._clean(e)) from None

    def _clean(self, e: BaseException) -> str:
        """The error's text with the URL's password, if any, masked."""
        text = describe_error(e)
        client = self._client
        password = client.connection_pool.connection_kwargs.get("password") if client else None
        return text.replace(password, "***") if password else text

    async def _create_group(self, client: Redis) -> None:
        start = "0" if self.spec.start_from == "beginning" else "$"
        try:
            await client.xgroup_create(self.spec.stream, self.group, id=start, mkstream=True)
        except ResponseError as e:
            if str(e).startswith("BUSYGROUP"):
                return  # it exists: keep its position
            if str(e).startswith("WRONGTYPE"):
                raise ConfigurationError(
                    f"the key {self.spec.stream!r} holds something other than a stream"
                ) from None
            raise

    # -- consuming -----------------------------------------------------------------------
    async def _consume(self, emit: Emit) -> None:
        client = self._redis()
        await self._create_group(client)
        self.context.status.set("connected")
        log.info(
            "trigger %s: reading stream %r of %s as %s in group %s",
            self.what,
            self.spec.stream,
            redact_url(self.url),
            self.consumer,
            self.group,
        )
        toucher = asyncio.get_running_loop().create_task(self._touch_in_flight(client))
        try:
            await self._reread_own_pending(client, emit)
            self._next_claim = 0.0
            while True:
                if self._claim_cursor != SCAN_DONE or time.monotonic() >= self._next_claim:
                    await self._claim_abandoned(client, emit)
                room = await self._room()
                if room == 0:
                    continue
                entries = await self._read(client, ">", room, block=self.block_ms)
                await self._emit_all(emit, entries, {})
        finally:
            toucher.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await toucher

    async def _read(
        self, client: Redis, after: str, count: int, *, block: int | None = None
    ) -> list[Entry]:
        """XREADGROUP: new entries (``>``), or this consumer's pending ones after an id."""
        reply: Any = await client.xreadgroup(
            self.group, self.consumer, {self.spec.stream: after}, count=count, block=block
        )
        _check_cancelled()
        # [[stream, [(id, fields), ...]]], or None when BLOCK ran out
        return [(entry[0], entry[1]) for _, entries in reply or () for entry in entries]

    async def _room(self) -> int:
        """How many more entries the trigger can take; waits a little when none."""
        _check_cancelled()
        self._settled.clear()  # before looking: a settle from now on wakes the wait
        room = self.capacity - len(self.in_flight)
        if room <= 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.block_ms / 1000):
                    await self._settled.wait()
            room = self.capacity - len(self.in_flight)
        return max(0, room)

    async def _reread_own_pending(self, client: Redis, emit: Emit) -> None:
        """Deliver again what this consumer read before and never acknowledged (a
        previous process on this node, or this one before the connection dropped)."""
        after = "0"
        while True:
            room = await self._room()
            if room == 0:
                continue
            entries = await self._read(client, after, room)
            if not entries:
                return
            after = _id(entries[-1][0])
            fresh = [(i, f) for i, f in entries if _id(i) not in self.in_flight]
            await self._emit_all(emit, fresh, await self._delivery_counts(client, fresh))

    async def _claim_abandoned(self, client: Redis, emit: Emit) -> None:
        """Take over entries idle on another consumer for ``claim_idle`` (one step of
        a scan of the pending list; the loop comes back while it is not complete)."""
        room = self.capacity - len(self.in_flight)
        if room <= 0:
            return
        reply: list[Any] = await client.xautoclaim(
            self.spec.stream,
            self.group,
            self.consumer,
            min_idle_time=int(self.spec.claim_idle * 1000),
            start_id=self._claim_cursor,
            count=room,
        )
        _check_cancelled()
        # [next cursor, [(id, fields), ...], [ids deleted from the stream]] (Redis >= 7)
        cursor, claimed = reply[0], reply[1]
        self._claim_cursor = _id(cursor)
        if self._claim_cursor == SCAN_DONE:
            self._next_claim = time.monotonic() + self.claim_every
        fresh: list[Entry] = [(i, f) for i, f in claimed if _id(i) not in self.in_flight]
        if fresh:
            log.info("trigger %s: claimed %d abandoned entries", self.what, len(fresh))
        await self._emit_all(emit, fresh, await self._delivery_counts(client, fresh))

    async def _touch_in_flight(self, client: Redis) -> None:
        """Keep this consumer's entries in flight from looking abandoned to other nodes."""
        while True:
            await asyncio.sleep(self.claim_every)
            ids = sorted(self.in_flight)
            if not ids:
                continue
            try:
                await client.xclaim(
                    self.spec.stream,
                    self.group,
                    self.consumer,
                    min_idle_time=0,
                    message_ids=ids,  # type: ignore[arg-type]
                    justid=True,
                )
            except RedisError as e:
                log.debug("trigger %s: touching entries in flight: %s", self.what, e)
            _check_cancelled()

    async def _delivery_counts(self, client: Redis, entries: list[Entry]) -> dict[str, int]:
        """Redis's delivery count of each re-read or claimed entry (XPENDING)."""
        if not entries:
            return {}
        async with client.pipeline(transaction=False) as pipe:
            for entry_id, _ in entries:
                pipe.xpending_range(
                    self.spec.stream, self.group, min=entry_id, max=entry_id, count=1
                )
            replies = await pipe.execute()
        counts = {}
        for reply in replies:
            for pending in reply:
                counts[_id(pending["message_id"])] = int(pending["times_delivered"])
        return counts

    async def _emit_all(self, emit: Emit, entries: list[Entry], counts: dict[str, int]) -> None:
        # Every message is counted in flight before the first is emitted: emit may wait
        # (the trigger is full) and the rest must be touched meanwhile like the others.
        messages = []
        for raw_id, fields in entries:
            entry_id = _id(raw_id)
            if not fields:  # deleted from the stream after it was read: nothing to deliver
                await self._settle(entry_id, partial(self._ack, entry_id))
                continue
            messages.append(self._message(entry_id, fields, counts.get(entry_id, 1)))
        for message in messages:
            await emit(message)

    # -- one entry -----------------------------------------------------------------------
    def _message(self, entry_id: str, fields: Fields, delivery_count: int) -> Message:
        text, binary = decode_fields(fields)
        record: dict[str, Any] = {
            "stream": self.spec.stream,
            "group": self.group,
            "consumer": self.consumer,
            "deliveryCount": delivery_count,
            "fields": text,
        }
        if binary:
            record["binaryFields"] = binary
        body = fields[BODY_FIELD] if BODY_FIELD in fields else orjson.dumps(text)
        self.in_flight.add(entry_id)

        async def ack() -> None:
            await self._settle(entry_id, lambda: self._ack(entry_id))

        async def dead_letter() -> None:
            await self._settle(entry_id, lambda: self._dead_letter(entry_id, fields, record))

        origin = Queued(
            queue=self.spec.stream,
            delivery_count=delivery_count,
            sent_at=sent_at(entry_id),
            attributes=attributes_of(fields),
        )
        return Message(
            body=body,
            id=entry_id,
            origin=origin,
            record=record,
            ack=ack,
            dead_letter=dead_letter if self.spec.dead_letter_stream else None,
            depth=depth_of(fields.get(DEPTH_HEADER.encode())),
        )

    async def _ack(self, entry_id: str) -> None:
        await self._redis().xack(self.spec.stream, self.group, entry_id)

    async def _dead_letter(self, entry_id: str, fields: Fields, record: dict[str, Any]) -> None:
        """XADD the entry to the dead-letter stream and XACK it, atomically."""
        assert self.spec.dead_letter_stream is not None
        failure: dict[bytes, bytes | str | int] = {
            b"nimbus-source-stream": self.spec.stream,
            b"nimbus-source-id": entry_id,
            b"nimbus-source-group": self.group,
            b"nimbus-function": self.context.function,
            b"nimbus-trigger": self.context.trigger,
            b"nimbus-delivery-count": record["deliveryCount"],
            b"nimbus-failed-at": datetime.now(UTC).isoformat(),
        }
        async with self._redis().pipeline(transaction=True) as pipe:
            entry: dict[Any, Any] = {**fields, **failure}
            pipe.xadd(self.spec.dead_letter_stream, entry)
            pipe.xack(self.spec.stream, self.group, entry_id)
            await pipe.execute()

    async def _settle(self, entry_id: str, command: Callable[[], Awaitable[None]]) -> None:
        """Run an ack or dead-letter; if Redis cannot be reached, the entry stays
        pending and comes back (re-read after a reconnection, or claimed)."""
        try:
            await command()
        except RedisError as e:
            log.warning(
                "trigger %s: could not settle entry %s (%s); it will be delivered again",
                self.what,
                entry_id,
                self._clean(e),
            )
        finally:
            self.in_flight.discard(entry_id)
            self._settled.set()
            if self._stopped:
                await self._disconnect()
