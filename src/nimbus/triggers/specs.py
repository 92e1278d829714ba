"""Message and file triggers as written in ``nimbus.yaml`` (``triggers: [{type: nats, …}]``).

One pydantic model per source type, all sharing how messages become invocations
(:class:`Delivery`: batching, concurrency, retries, recursion depth, the records'
``shape`` and partial batch responses). Validated
once, at deploy or ``POST …/triggers``, with messages a person understands; the
running side (:mod:`nimbus.triggers.events`) only ever sees valid specs.

Broker URLs may carry credentials (``amqp://user:secret@host/``): they are kept in
the spec, which only the server reads, and every view of a trigger (API,
``describe``, logs) shows them through :func:`redact_url`.
"""

from __future__ import annotations

import ipaddress
import os
import re
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nimbus.errors import InvalidParameterValue

#: The event trigger types (``schedule`` is handled by nimbus.triggers.schedule).
EVENT_TYPES = ("nats", "redis", "mqtt", "amqp", "files")
FileEvent = Literal["created", "modified", "deleted", "moved"]
FILE_EVENTS: tuple[FileEvent, ...] = ("created", "modified", "deleted", "moved")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
#: Where a watched directory may be mounted in the sandbox.
MOUNT_RE = re.compile(r"^/mnt/[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*$")
NATS_SUBJECT_RE = re.compile(r"^[^\s.*>]+(\.[^\s.*>]+|\.\*|\.>)*$|^(\*|>)(\.[^\s.]+)*$")
#: What an invocation's event looks like: the Lambda event of the trigger's kind
#: (``sqs`` for queues and streams, ``s3`` for files, ``iot`` for MQTT), or Nimbus's own.
Shape = Literal["sqs", "s3", "iot", "native"]
SHAPE_MEANINGS: dict[Shape, str] = {
    "sqs": "Lambda's SQS records",
    "s3": "S3 event notification records",
    "iot": "the message itself, as an AWS IoT rule passes it",
    "native": "Nimbus's own records",
}


class Delivery(BaseModel):
    """How a trigger's messages become invocations: the fields every event type shares."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    #: Messages per invocation (a ``Records`` list of up to this many).
    batch_size: int = Field(default=1, ge=1, le=1000)
    #: Seconds to wait for a batch to fill before invoking with what there is.
    batch_window: float = Field(default=0, ge=0, le=300)
    #: Invocations of this trigger at once; while all run, no more messages are taken.
    max_concurrency: int = Field(default=2, ge=1, le=1000)
    #: Retries after a function error before the messages are dead-lettered.
    max_retries: int = Field(default=2, ge=0, le=10)
    #: Seconds before the first retry; doubled for each further one (capped at 60 s).
    retry_backoff: float = Field(default=0.5, ge=0, le=60)
    #: Recursive loop guard: a message this deep in a chain of triggered invocations
    #: (the ``nimbus-depth`` header) is not delivered but dead-lettered.
    max_depth: int = Field(default=16, ge=1, le=1000)
    #: The event's shape (default: the Lambda one of the trigger's type, see ``SHAPES``).
    shape: Shape = "native"
    #: Honour a result ``{"batchItemFailures": [{"itemIdentifier": id}, ...]}``: only the
    #: records named failed (Lambda's ``ReportBatchItemFailures``).
    report_batch_item_failures: bool = True

    #: The shapes a trigger of this type can have; the first is its default.
    SHAPES: ClassVar[tuple[Shape, ...]] = ("native",)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and not NAME_RE.fullmatch(v):
            raise ValueError("must be 1-64 letters, digits, '_', '.' or '-'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _default_shape(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("shape") is None:
            return {**data, "shape": cls.default_shape(data)}
        return data

    @classmethod
    def default_shape(cls, data: dict[str, Any]) -> Shape:
        """The shape of a trigger that does not name one."""
        return cls.SHAPES[0]

    @field_validator("shape", mode="before")
    @classmethod
    def _shape(cls, v: Any) -> Any:
        if v not in cls.SHAPES:
            kind = cls.model_fields["type"].default
            choices = " or ".join(f"{s} ({SHAPE_MEANINGS[s]})" for s in cls.SHAPES)
            raise ValueError(f"for a {kind} trigger, must be {choices}")
        return v


def _url(v: str | None, schemes: tuple[str, ...]) -> str | None:
    if v is None:
        return v
    try:
        parts = urlsplit(v)
        _ = parts.port  # raises on a bad port
    except ValueError as e:
        raise ValueError(f"is not a valid URL ({e})") from None
    if parts.scheme not in schemes or not parts.hostname:
        raise ValueError(f"must be a URL like {schemes[0]}://host:port")
    return v


#: A JetStream stream or consumer name: no whitespace, ``.``, ``*``, ``>`` or path separators.
NATS_NAME_RE = re.compile(r"^[^\s.*>/\\]{1,255}$")


def nats_subject_matches(pattern: str, subject: str) -> bool:
    """Whether a NATS subscription on ``pattern`` (``*`` one token, ``>`` the rest)
    receives messages published on the literal ``subject``."""
    tokens, wanted = subject.split("."), pattern.split(".")
    for i, token in enumerate(wanted):
        if token == ">":
            return len(tokens) > i
        if i >= len(tokens) or token not in ("*", tokens[i]):
            return False
    return len(tokens) == len(wanted)


class NatsTrigger(Delivery):
    """NATS: JetStream with a durable consumer (``stream`` set), or core NATS with a queue group.

    Core NATS has no acknowledgements: a message is delivered at most once (and the
    whole group shares it); a JetStream consumer is acknowledged after success.
    """

    type: Literal["nats"] = "nats"
    SHAPES: ClassVar[tuple[Shape, ...]] = ("sqs", "native")
    url: str | None = None
    subject: str
    stream: str | None = None
    #: Create the stream (capturing ``subject``) when it does not exist.
    create_stream: bool = True
    #: The durable consumer's name (default ``nimbus-<function>-<trigger>``).
    durable: str | None = None
    #: Core NATS: the queue group (default ``nimbus-<function>-<trigger>``).
    queue: str | None = None
    #: Seconds JetStream waits for an ack before redelivering (longer than the timeout).
    ack_wait: float = Field(default=60, ge=1, le=43200)
    #: Publish messages that failed every retry here (else the function's dead_letter).
    dead_letter_subject: str | None = None

    @field_validator("url")
    @classmethod
    def _u(cls, v: str | None) -> str | None:
        return _url(v, ("nats", "tls", "nats+tls"))

    @field_validator("subject")
    @classmethod
    def _subject(cls, v: str) -> str:
        if not NATS_SUBJECT_RE.fullmatch(v):
            raise ValueError("must be a NATS subject, e.g. 'orders.*' or 'orders.>'")
        return v

    @field_validator("stream", "durable")
    @classmethod
    def _jetstream_name(cls, v: str | None) -> str | None:
        if v is not None and not NATS_NAME_RE.fullmatch(v):
            raise ValueError("must be 1-255 characters, none of them whitespace or . * > / \\")
        return v

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(c.isspace() for c in v)):
            raise ValueError("must be a queue group name without whitespace")
        return v

    @field_validator("dead_letter_subject")
    @classmethod
    def _dead_letter_elsewhere(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is None:
            return v
        if not NATS_SUBJECT_RE.fullmatch(v) or "*" in v.split(".") or ">" in v.split("."):
            raise ValueError("must be a NATS subject without wildcards, e.g. 'orders.dead'")
        # Dead letters published where the trigger listens would come back, forever.
        if nats_subject_matches(info.data.get("subject") or "", v):
            raise ValueError("must not be a subject the trigger itself receives")
        return v


class RedisTrigger(Delivery):
    """A Redis stream read by a consumer group (XREADGROUP/XACK; XAUTOCLAIM for the dead)."""

    type: Literal["redis"] = "redis"
    SHAPES: ClassVar[tuple[Shape, ...]] = ("sqs", "native")
    url: str | None = None
    stream: str = Field(min_length=1, max_length=256)
    #: The consumer group (default ``nimbus-<function>-<trigger>``), created at ``$``
    #: (only new entries) unless ``start_from: beginning``.
    group: str | None = None
    start_from: Literal["new", "beginning"] = "new"
    #: Entries pending this long on another (dead) consumer are claimed, seconds.
    claim_idle: float = Field(default=60, ge=1, le=86400)
    dead_letter_stream: str | None = Field(default=None, min_length=1, max_length=256)

    @field_validator("url")
    @classmethod
    def _u(cls, v: str | None) -> str | None:
        return _url(v, ("redis", "rediss", "unix"))

    @field_validator("dead_letter_stream")
    @classmethod
    def _dead_letter_elsewhere(cls, v: str | None, info: ValidationInfo) -> str | None:
        # Dead-lettering into the stream being read would deliver the failed entry
        # again, forever.
        if v is not None and v == info.data.get("stream"):
            raise ValueError("must not be the stream the trigger reads")
        return v


class MqttTrigger(Delivery):
    """An MQTT topic filter (``+``/``#``), QoS 1 with a persistent session: the broker
    keeps messages while Nimbus is away, and each is acknowledged after success."""

    type: Literal["mqtt"] = "mqtt"
    SHAPES: ClassVar[tuple[Shape, ...]] = ("iot", "native")
    url: str | None = None
    topic: str = Field(min_length=1, max_length=65535)
    qos: Literal[0, 1] = 1
    #: The session's client id (default ``nimbus-<function>-<trigger>``).
    client_id: str | None = None
    dead_letter_topic: str | None = None
    #: ``shape: iot``: add the message's topic to the event under this name, as the IoT
    #: rule ``SELECT *, topic() AS <topic_field>`` does (default: the payload as is).
    topic_field: str | None = Field(default=None, min_length=1, max_length=128)

    @classmethod
    def default_shape(cls, data: dict[str, Any]) -> Shape:
        # An IoT rule invokes once per message: a trigger that asks for batches (as
        # triggers did before there were shapes) keeps Nimbus's records.
        try:
            batched = int(data.get("batch_size", 1)) > 1
        except (TypeError, ValueError):
            batched = False  # the field's own validation says why
        return "native" if batched else "iot"

    @field_validator("shape")
    @classmethod
    def _one_at_a_time(cls, v: Shape, info: ValidationInfo) -> Shape:
        if v == "iot" and (info.data.get("batch_size") or 1) > 1:
            raise ValueError(
                "iot needs batch_size 1: an AWS IoT rule invokes the function once per "
                "message (use shape native to get batches of records)"
            )
        return v

    @field_validator("topic_field")
    @classmethod
    def _topic_field(cls, v: str | None, info: ValidationInfo) -> str | None:
        if v is not None and info.data.get("shape") != "iot":
            raise ValueError("only applies to shape iot (a native record has the topic)")
        return v

    @field_validator("url")
    @classmethod
    def _u(cls, v: str | None) -> str | None:
        return _url(v, ("mqtt", "mqtts", "tcp"))

    @field_validator("topic")
    @classmethod
    def _topic(cls, v: str) -> str:
        levels = v.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ValueError("'#' must be a whole level, and the last one")
            if "+" in level and level != "+":
                raise ValueError("'+' must be a whole level")
        return v


class AmqpTrigger(Delivery):
    """An AMQP 0-9-1 queue (RabbitMQ): consumed with a prefetch, acked after success,
    rejected to its dead-letter exchange after the last retry."""

    type: Literal["amqp"] = "amqp"
    SHAPES: ClassVar[tuple[Shape, ...]] = ("sqs", "native")
    url: str | None = None
    queue: str = Field(min_length=1, max_length=255)
    #: Declare the queue (durable) if it does not exist; else it must exist.
    declare: bool = True
    #: Bind the declared queue to this (topic) exchange, declared too, with these keys.
    exchange: str | None = None
    routing_keys: tuple[str, ...] = ("#",)
    #: Unacknowledged messages the broker may push to Nimbus at once.
    prefetch: int = Field(default=10, ge=1, le=65535)
    #: The queue's ``x-dead-letter-exchange`` (only applied when Nimbus declares it).
    dead_letter_exchange: str | None = None

    @field_validator("url")
    @classmethod
    def _u(cls, v: str | None) -> str | None:
        return _url(v, ("amqp", "amqps"))


class FilesTrigger(Delivery):
    """Changes in a directory on the node (watchfiles: inotify)."""

    type: Literal["files"] = "files"
    SHAPES: ClassVar[tuple[Shape, ...]] = ("s3", "native")
    path: str
    #: The bucket S3-shaped records name (default: made from the directory's name).
    bucket: str = Field(default="", validate_default=True)
    #: Glob patterns matched against the path relative to ``path`` (``*.csv``, ``in/**``).
    patterns: tuple[str, ...] = ("*",)
    events: tuple[FileEvent, ...] = FILE_EVENTS
    recursive: bool = True
    #: Seconds a file must be quiet before its change is delivered (a burst of writes,
    #: or a file written slowly, becomes one event).
    debounce: float = Field(default=0.2, ge=0.01, le=60)
    #: Mount the directory read-only at this path inside the function's sandbox.
    mount: str | None = None

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not os.path.isabs(v):
            raise ValueError("must be an absolute directory path")
        return os.path.normpath(v)

    @model_validator(mode="before")
    @classmethod
    def _default_bucket(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("bucket") is None:
            path = data.get("path")
            return {**data, "bucket": default_bucket(path if isinstance(path, str) else "")}
        return data

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        problem = bucket_problem(v)
        if problem is not None:
            raise ValueError(f"{v!r} is not an S3 bucket name: {problem}")
        return v

    @field_validator("mount")
    @classmethod
    def _mount(cls, v: str | None) -> str | None:
        if v is not None and (not MOUNT_RE.fullmatch(v) or ".." in v.split("/")):
            raise ValueError("must be a path under /mnt, e.g. /mnt/inbox")
        return v

    @field_validator("events")
    @classmethod
    def _events(cls, v: tuple[FileEvent, ...]) -> tuple[FileEvent, ...]:
        if not v:
            raise ValueError(f"must name at least one of {', '.join(FILE_EVENTS)}")
        return v


#: S3's rules for general purpose bucket names (besides the length and the characters).
_BUCKET_PREFIXES = ("xn--", "sthree-", "amzn-s3-demo-")
_BUCKET_SUFFIXES = ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3")
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def bucket_problem(name: str) -> str | None:
    """Why ``name`` is not a valid S3 bucket name, or None."""
    if not 3 <= len(name) <= 63:
        return "it must be 3-63 characters long"
    if not _BUCKET_RE.fullmatch(name):
        return (
            "only lowercase letters, digits, '.' and '-', beginning and ending with a "
            "letter or digit"
        )
    if ".." in name:
        return "two periods cannot be next to each other"
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        pass
    else:
        return "it cannot look like an IP address"
    for prefix in _BUCKET_PREFIXES:
        if name.startswith(prefix):
            return f"it cannot begin with {prefix!r}"
    for suffix in _BUCKET_SUFFIXES:
        if name.endswith(suffix):
            return f"it cannot end with {suffix!r}"
    return None


def default_bucket(path: str) -> str:
    """A valid bucket name made from a directory's name (``/srv/Inbox_2`` → ``inbox-2``)."""
    name = os.path.basename(os.path.normpath(path)).lower() if path else ""
    name = re.sub(r"[^a-z0-9.-]+", "-", name)
    name = re.sub(r"\.{2,}", ".", re.sub(r"-{2,}", "-", name)).strip(".-")[:63].strip(".-")
    for candidate in (name, f"nimbus-{name}"[:63].strip(".-")):
        if bucket_problem(candidate) is None:
            return candidate
    return "nimbus-files"


EventTrigger = NatsTrigger | RedisTrigger | MqttTrigger | AmqpTrigger | FilesTrigger
MODELS: dict[str, type[EventTrigger]] = {
    "nats": NatsTrigger,
    "redis": RedisTrigger,
    "mqtt": MqttTrigger,
    "amqp": AmqpTrigger,
    "files": FilesTrigger,
}


def parse_event_trigger(raw: dict[str, Any], *, index: int | None = None) -> EventTrigger:
    """Validate one event trigger; ``InvalidParameterValue`` names every problem."""
    where = "trigger" if index is None else f"triggers[{index}]"
    model = MODELS.get(str(raw.get("type")))
    if model is None:
        raise InvalidParameterValue(f"{where}.type: unknown trigger type {raw.get('type')!r}")
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"])
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown field"
            elif err["type"] == "missing":
                msg = "is required"
            problems.append(f"{where}.{loc}: {msg}")
        raise InvalidParameterValue("; ".join(problems)) from None


def normalized(trigger: EventTrigger, default_name: str) -> dict[str, Any]:
    """The trigger as stored in the spec: every field explicit, the name filled in."""
    data = trigger.model_dump(mode="json")
    data["name"] = trigger.name or default_name
    return data


def redact_url(url: str | None) -> str | None:
    """``scheme://user:***@host:port/path``: a URL fit to show (no password, no query)."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "<invalid url>"
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port else "")
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc}"
    elif parts.username:
        netloc = f"***@{netloc}"  # a bare user part can be a secret (NATS's token)
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def view(trigger: dict[str, Any]) -> dict[str, Any]:
    """A stored trigger as shown to people: its URL redacted."""
    if trigger.get("url"):
        return {**trigger, "url": redact_url(trigger["url"])}
    return dict(trigger)


def check_watch_paths(
    triggers: tuple[dict[str, Any], ...], roots: tuple[Path, ...], private: Path
) -> None:
    """File triggers may only watch (and mount) directories under the node's allowed
    roots, and never Nimbus's own data: ``InvalidParameterValue`` otherwise."""
    for trigger in triggers:
        if trigger.get("type") != "files":
            continue
        given = Path(trigger["path"])
        path = given.resolve()
        if path != given:
            # Mounted as given, never through a link (see enter.bind_verified).
            raise InvalidParameterValue(
                f"trigger {trigger['name']!r}: {given} goes through a symbolic link; "
                f"use the directory's real path, {path}"
            )
        if path == private or private in path.parents or path in private.parents:
            raise InvalidParameterValue(
                f"trigger {trigger['name']!r}: {path} holds Nimbus's own data; it cannot be watched"
            )
        if not any(path == root or root in path.parents for root in roots):
            allowed = ", ".join(str(r) for r in roots) or "none"
            raise InvalidParameterValue(
                f"trigger {trigger['name']!r}: {path} is not under a directory this node lets "
                f"file triggers watch ({allowed}; see nimbus up --files-roots)"
            )
