"""``EventTriggers``: runs the message and file triggers of every function's current version.

For each trigger (a function's ``triggers:`` entry of type nats, redis, mqtt, amqp
or files) there is one asyncio task: its source's ``run(dispatcher.emit)``. When a
function is published, its triggers are compared with the running ones by their
whole spec: an unchanged trigger keeps running (a code update does not reconnect
anything), a changed one is stopped and started again, a removed one stopped. A
deleted function's triggers stop.

Stopping a trigger cancels its source (nothing more is taken from the broker) and
gives the invocations in flight ``grace`` seconds; whatever was not acknowledged by
then is redelivered by the broker. Sources are imported lazily: a node that uses
no MQTT never imports its client.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from nimbus.errors import ResourceNotFound
from nimbus.models import Account, Version
from nimbus.triggers.dispatch import DeadLetters, Dispatcher, InvokePath
from nimbus.triggers.runner import FunctionSource
from nimbus.triggers.sources.base import Source, Status
from nimbus.triggers.specs import (
    EVENT_TYPES,
    EventTrigger,
    parse_event_trigger,
    redact_url,
    view,
)

log = logging.getLogger("nimbus.triggers")

#: type → "module:class" of its source.
SOURCES = {
    "nats": "nimbus.triggers.sources.nats:NatsSource",
    "redis": "nimbus.triggers.sources.redis:RedisSource",
    "mqtt": "nimbus.triggers.sources.mqtt:MqttSource",
    "amqp": "nimbus.triggers.sources.amqp:AmqpSource",
    "files": "nimbus.triggers.sources.files:FilesSource",
}

#: Seconds a source gets, beyond the grace, to stop after it is cancelled (sources let
#: invocations in flight settle their messages before they close the connection).
SOURCE_STOP = 5.0

#: The brokers' URLs when neither the trigger nor the server names one.
DEFAULT_URLS = {
    "nats": "nats://127.0.0.1:4222",
    "redis": "redis://127.0.0.1:6379/0",
    "mqtt": "mqtt://127.0.0.1:1883",
    "amqp": "amqp://guest:guest@127.0.0.1:5672/",
}


@dataclass(frozen=True)
class TriggerContext:
    """What a source knows besides its spec."""

    function: str
    trigger: str
    #: The broker URL to use (the trigger's, else the server's default); None for files.
    url: str | None
    status: Status

    @property
    def broker_url(self) -> str:
        """``url`` for a broker source (always set for one: the trigger's, the server's,
        or the broker's standard port on loopback)."""
        if self.url is None:
            raise ValueError(f"trigger {self.trigger} of {self.function} has no broker URL")
        return self.url

    @property
    def default_id(self) -> str:
        """Durable consumer, group, client id and queue group unless the spec names one."""
        return f"nimbus-{self.function}-{self.trigger}"


SourceFactory = Callable[[EventTrigger, TriggerContext], Source]


def load_source(spec: EventTrigger, context: TriggerContext) -> Source:
    module, _, cls = SOURCES[spec.type].partition(":")
    factory: SourceFactory = getattr(importlib.import_module(module), cls)
    return factory(spec, context)


@dataclass
class _Running:
    fingerprint: bytes
    spec: dict[str, Any]
    status: Status
    dispatcher: Dispatcher
    task: asyncio.Task[None]


class EventTriggers:
    """Starts, restarts and stops the event triggers as functions change."""

    def __init__(
        self,
        functions: FunctionSource,
        invoker: InvokePath,
        dead_letters: DeadLetters,
        *,
        account: Account,
        urls: Mapping[str, str | None] | None = None,
        grace: float = 10.0,
        factory: SourceFactory = load_source,
    ) -> None:
        self._functions = functions
        #: The region and account the records name (SQS and S3 ARNs, ``awsRegion``).
        self._account = account
        self._invoker = invoker
        self._dead_letters = dead_letters
        self._urls = {**DEFAULT_URLS, **{k: v for k, v in (urls or {}).items() if v}}
        self._grace = grace
        self._factory = factory
        self._running: dict[tuple[str, str], _Running] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._started = False

    async def start(self) -> None:
        self._started = True
        self._functions.subscribe(self._changed)
        for record in self._functions.all():
            self._sync(record.name)

    async def close(self) -> None:
        self._started = False
        running, self._running = list(self._running.values()), {}
        await asyncio.gather(*(self._stop(r) for r in running), *self._stopping)

    def _changed(self, name: str) -> None:
        if self._started:
            self._sync(name)

    def _sync(self, name: str) -> None:
        try:
            triggers = self._functions.current(name).spec.triggers
        except ResourceNotFound:
            triggers = ()
        wanted = {t["name"]: t for t in triggers if t["type"] in EVENT_TYPES}
        for key in [k for k in self._running if k[0] == name]:
            spec = wanted.get(key[1])
            if spec is None or _fingerprint(spec) != self._running[key].fingerprint:
                self._stop_later(self._running.pop(key))
        for trigger, spec in wanted.items():
            if (name, trigger) not in self._running:
                self._running[name, trigger] = self._start(name, trigger, spec)

    def _start(self, function: str, trigger: str, raw: dict[str, Any]) -> _Running:
        spec = parse_event_trigger(raw)
        status = Status()
        url = getattr(spec, "url", None) or self._urls.get(spec.type)
        context = TriggerContext(function, trigger, url, status)
        dispatcher = Dispatcher(
            function,
            trigger,
            spec,
            self._invoker,
            self._dead_letters,
            status,
            account=self._account,
        )
        source = self._factory(spec, context)
        task = asyncio.get_running_loop().create_task(
            _run(source, dispatcher, status), name=f"trigger {function}/{trigger}"
        )
        log.info("trigger %s of %s (%s) started", trigger, function, spec.type)
        return _Running(_fingerprint(raw), raw, status, dispatcher, task)

    def _stop_later(self, running: _Running) -> None:
        task = asyncio.get_running_loop().create_task(self._stop(running))
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop(self, running: _Running) -> None:
        running.task.cancel()
        # Bounded: on 3.11 a client library's wait_for can swallow a cancellation.
        _, pending = await asyncio.wait({running.task}, timeout=self._grace + SOURCE_STOP)
        if pending:
            log.warning("trigger %s: its source did not stop", running.task.get_name())
        elif not running.task.cancelled() and running.task.exception() is not None:
            log.warning("trigger %s: %s", running.task.get_name(), running.task.exception())
        await running.dispatcher.close(self._grace)
        running.status.set("stopped")

    def describe(self, version: Version) -> list[dict[str, Any]]:
        """The version's event triggers as shown: spec (URL redacted), state, counters."""
        out = []
        for trigger in version.spec.triggers:
            if trigger["type"] not in EVENT_TYPES:
                continue
            running = self._running.get((version.name, trigger["name"]))
            shown = view(trigger)
            if not trigger.get("url") and trigger["type"] in self._urls:
                shown["url_in_use"] = redact_url(self._urls[trigger["type"]])
            if running is not None:
                shown["status"] = {
                    **running.status.as_dict(),
                    "in_flight": running.dispatcher.in_flight,
                }
            else:
                shown["status"] = Status(state="stopped").as_dict()
            out.append(shown)
        return out

    def status(self, function: str, trigger: str) -> Status | None:
        running = self._running.get((function, trigger))
        return running.status if running is not None else None


async def _run(source: Source, dispatcher: Dispatcher, status: Status) -> None:
    try:
        await source.run(dispatcher.emit)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a source's bug must not pass silently
        log.exception("trigger %s of %s failed", dispatcher.trigger, dispatcher.function)
        status.set("error", f"internal error: {type(e).__name__}: {e}")


def _fingerprint(spec: dict[str, Any]) -> bytes:
    return orjson.dumps(spec, option=orjson.OPT_SORT_KEYS)
