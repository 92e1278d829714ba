"""What an invocation's event looks like, for each ``shape`` a trigger can have.

Pure functions of the messages, the trigger, the node's :class:`~nimbus.models.Account`
and the attempt: no clock, no I/O (every time in a record comes from the message).

* ``sqs`` (Redis Streams, NATS, AMQP): ``{"Records": [...]}`` with every field of
  Lambda's SQS event record, so SQS consumer code (e.g. Powertools' ``SQSRecord``)
  runs unmodified: ``messageId``, ``receiptHandle`` (new for every delivery and every
  retry), ``body`` (text; base64 when the payload is not UTF-8), ``attributes``
  (``ApproximateReceiveCount`` is the broker's delivery count plus Nimbus's retries),
  ``messageAttributes`` (the broker's headers or fields, typed ``String``, ``Number``
  or ``Binary``), ``md5OfBody`` (of ``body`` as delivered), ``eventSource`` ``aws:sqs``,
  ``eventSourceARN`` ``arn:aws:sqs:<region>:<account>:<queue>`` and ``awsRegion``.
  The broker's own metadata is under one more key, ``nimbus``.
* ``s3`` (files): ``{"Records": [...]}`` of S3 event notification records (event
  version 2.1), one per change; paths on the node are under ``nimbus``.
* ``iot`` (MQTT): what an AWS IoT rule ``SELECT * FROM '<topic>'`` hands a Lambda
  function: the payload's JSON object itself (one message per invocation); a payload
  that is not a JSON object arrives as ``{"data": "<base64>"}``, which is what the
  rule ``SELECT encode(*, 'base64') AS data`` gives (IoT's Lambda action takes no
  binary payloads).
* ``native``: Nimbus's own ``{"Records": [...]}``: the broker's metadata merged in.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from urllib.parse import quote_plus

import orjson

from nimbus.models import Account
from nimbus.triggers.sources.base import (
    AttributeValue,
    FileChange,
    Message,
    Published,
    Queued,
)
from nimbus.triggers.specs import EventTrigger, FilesTrigger, MqttTrigger, Shape

#: An S3 event's name for each kind of file change.
S3_EVENT_NAMES = {
    "created": "ObjectCreated:Put",
    "modified": "ObjectCreated:Put",
    "deleted": "ObjectRemoved:Delete",
    "moved": "ObjectCreated:Copy",
}
#: The longest queue name SQS allows.
MAX_QUEUE_NAME = 80
#: The key an ``iot`` event carries a payload that is not a JSON object under.
IOT_DATA = "data"


@dataclass(frozen=True, slots=True)
class Target:
    """What a trigger's records say about where they come from."""

    type: str
    function: str
    trigger: str
    shape: Shape
    account: Account
    #: ``files``: the bucket S3 records name.
    bucket: str = ""
    #: ``mqtt`` with ``shape: iot``: where the topic goes in the event, if anywhere.
    topic_field: str | None = None

    @classmethod
    def of(cls, spec: EventTrigger, function: str, trigger: str, account: Account) -> Target:
        return cls(
            type=spec.type,
            function=function,
            trigger=trigger,
            shape=spec.shape,
            account=account,
            bucket=spec.bucket if isinstance(spec, FilesTrigger) else "",
            topic_field=spec.topic_field if isinstance(spec, MqttTrigger) else None,
        )

    @property
    def one_at_a_time(self) -> bool:
        """Whether each invocation gets exactly one message (an IoT rule's)."""
        return self.shape == "iot"

    @property
    def reports_items(self) -> bool:
        """Whether the records carry ids a partial batch response can name."""
        return self.shape != "iot"


def event(target: Target, batch: Sequence[Message], attempt: int = 1) -> bytes:
    """The invocation's event for ``batch`` (``attempt``: 1 the first time, 2 for the
    first retry, ...)."""
    if target.shape == "iot":
        if len(batch) != 1:
            raise ValueError(f"an iot event is one message, not {len(batch)}")
        return iot_event(target, batch[0])
    if target.shape == "sqs":
        records = [sqs_record(target, m, attempt) for m in batch]
    elif target.shape == "s3":
        records = [s3_record(target, m) for m in batch]
    else:
        records = [native_record(target, m) for m in batch]
    return orjson.dumps({"Records": records})


def body_text(body: bytes) -> tuple[str, bool]:
    """The body as text, and whether that is base64 (the body is not UTF-8)."""
    try:
        return body.decode("utf-8"), False
    except UnicodeDecodeError:
        return base64.b64encode(body).decode("ascii"), True


# -- sqs -------------------------------------------------------------------------------
def sqs_record(target: Target, message: Message, attempt: int = 1) -> dict[str, Any]:
    """Lambda's SQS event record for ``message``, plus ``nimbus``: the broker's metadata."""
    origin = message.origin
    queued = origin if isinstance(origin, Queued) else Queued(queue=target.trigger)
    body, encoded = body_text(message.body)
    account = target.account
    sent = queued.sent_at if queued.sent_at is not None else message.received_at
    nimbus: dict[str, Any] = {
        "source": target.type,
        "trigger": target.trigger,
        "depth": message.depth + 1,
        "attempt": attempt,
        **message.record,
    }
    if encoded:
        nimbus["bodyEncoding"] = "base64"
    return {
        "messageId": message.id,
        "receiptHandle": receipt_handle(target, message, attempt),
        "body": body,
        "attributes": {
            "ApproximateReceiveCount": str(queued.delivery_count + attempt - 1),
            "SentTimestamp": str(_ms(sent)),
            "SenderId": queued.sender or account.account_id,
            "ApproximateFirstReceiveTimestamp": str(_ms(message.received_at)),
        },
        "messageAttributes": message_attributes(queued.attributes),
        "md5OfBody": hashlib.md5(body.encode("utf-8"), usedforsecurity=False).hexdigest(),
        "eventSource": "aws:sqs",
        "eventSourceARN": f"arn:aws:sqs:{account.region}:{account.account_id}:"
        + queue_name(queued.queue),
        "awsRegion": account.region,
        "nimbus": nimbus,
    }


def receipt_handle(target: Target, message: Message, attempt: int) -> str:
    """Opaque, and different for every delivery of a message and every retry of one."""
    raw = f"nimbus:{target.function}:{target.trigger}:{message.delivery}:{attempt}:{message.id}"
    return base64.b64encode(raw.encode("utf-8")).decode("ascii")


_WILDCARDS = {"*": "any", ">": "all"}
_NOT_IN_QUEUE_NAMES = re.compile(r"[^A-Za-z0-9_-]")


def queue_name(name: str) -> str:
    """``name`` as an SQS queue name (letters, digits, ``-`` and ``_``, up to 80): ``.``
    becomes ``-``, a NATS wildcard token a word (``orders.*`` → ``orders-any``,
    ``orders.>`` → ``orders-all``), anything else ``_``."""
    tokens = [_WILDCARDS.get(token, token) for token in name.split(".")]
    cleaned = _NOT_IN_QUEUE_NAMES.sub("_", "-".join(tokens))
    return cleaned[:MAX_QUEUE_NAME] or "_"


def message_attributes(attributes: Mapping[str, AttributeValue]) -> dict[str, dict[str, Any]]:
    """SQS message attributes: text is ``String``, numbers ``Number`` (as text), bytes
    ``Binary`` (base64)."""
    return {name: _attribute(value) for name, value in attributes.items()}


def _attribute(value: AttributeValue) -> dict[str, Any]:
    attribute: dict[str, Any] = {
        "stringValue": None,
        "binaryValue": None,
        "stringListValues": [],
        "binaryListValues": [],
        "dataType": "String",
    }
    if isinstance(value, bytes):
        attribute["binaryValue"] = base64.b64encode(value).decode("ascii")
        attribute["dataType"] = "Binary"
    elif isinstance(value, bool):  # before int: a bool is one
        attribute["stringValue"] = "true" if value else "false"
    elif isinstance(value, int | float | Decimal):
        attribute["stringValue"] = str(value)
        attribute["dataType"] = "Number"
    else:
        attribute["stringValue"] = str(value)
    return attribute


# -- s3 --------------------------------------------------------------------------------
def s3_record(target: Target, message: Message) -> dict[str, Any]:
    """An S3 event notification record for a file change, plus ``nimbus``: the paths."""
    change = message.origin
    if not isinstance(change, FileChange):
        raise TypeError(f"an s3 record is made of a file change, not {type(change).__name__}")
    account = target.account
    obj: dict[str, Any] = {"key": quote_plus(change.key, safe="/")}
    if change.change != "deleted":  # as S3's: a deletion names only the key
        obj["size"] = change.size or 0
        obj["eTag"] = change.etag or ""
    obj["sequencer"] = message.id
    nimbus: dict[str, Any] = {
        "source": target.type,
        "trigger": target.trigger,
        "change": change.change,
        "path": change.path,
        "key": change.key,
    }
    if change.local_path is not None:
        nimbus["localPath"] = change.local_path
    if change.mtime is not None:
        nimbus["mtime"] = datetime.fromtimestamp(change.mtime, UTC).isoformat()
    if change.old_key is not None:
        nimbus["oldPath"] = change.old_path
        nimbus["oldKey"] = change.old_key
    request = message.delivery.upper()
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": account.region,
        "eventTime": iso_ms(change.at),
        "eventName": S3_EVENT_NAMES[change.change],
        "userIdentity": {"principalId": account.account_id},
        "requestParameters": {"sourceIPAddress": "127.0.0.1"},
        "responseElements": {
            "x-amz-request-id": request[:16],
            "x-amz-id-2": base64.b64encode(hashlib.sha256(request.encode()).digest()).decode(),
        },
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": target.trigger,
            "bucket": {
                "name": target.bucket,
                "ownerIdentity": {"principalId": account.account_id},
                "arn": f"arn:aws:s3:::{target.bucket}",
            },
            "object": obj,
        },
        "nimbus": nimbus,
    }


def iso_ms(at: float) -> str:
    """``2024-05-01T12:00:00.123Z``: an S3 event's time."""
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# -- iot -------------------------------------------------------------------------------
def iot_event(target: Target, message: Message) -> bytes:
    """The event an IoT rule ``SELECT * FROM '<topic>'`` (with ``topic_field``:
    ``SELECT *, topic() AS <topic_field>``) passes a Lambda function."""
    try:
        payload = json.loads(message.body.decode("utf-8"))
    except ValueError:  # not UTF-8 (UnicodeDecodeError is one), or not JSON
        payload = None
    if isinstance(payload, dict):
        if target.topic_field is None:
            return message.body  # the payload itself, byte for byte
        event: dict[str, Any] = payload
    else:
        event = {IOT_DATA: base64.b64encode(message.body).decode("ascii")}
    if target.topic_field is not None:
        origin = message.origin
        event[target.topic_field] = origin.topic if isinstance(origin, Published) else ""
    return json.dumps(event, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


# -- native ----------------------------------------------------------------------------
def native_record(target: Target, message: Message) -> dict[str, Any]:
    """Nimbus's own record: the broker's metadata merged in, the body as text (base64,
    with ``bodyEncoding``, when it is not UTF-8), ``nimbusDepth``."""
    record: dict[str, Any] = {
        "eventSource": f"nimbus:{target.type}",
        "eventSourceArn": f"nimbus:{target.type}:{target.function}:{target.trigger}",
        "messageId": message.id,
    }
    origin = message.origin
    if isinstance(origin, FileChange):
        record.update(_native_file(origin))
    record.update(message.record)
    if "body" not in record:
        record["body"], encoded = body_text(message.body)
        if encoded:
            record["bodyEncoding"] = "base64"
    # What the function should put in the nimbus-depth header of what it publishes.
    record["nimbusDepth"] = message.depth + 1
    return record


def _native_file(change: FileChange) -> dict[str, Any]:
    file: dict[str, Any] = {"path": change.path, "key": change.key}
    if change.local_path is not None:
        file["localPath"] = change.local_path
    if change.size is not None:
        file["size"] = change.size
    if change.mtime is not None:
        file["mtime"] = datetime.fromtimestamp(change.mtime, UTC).isoformat()
    out: dict[str, Any] = {"eventName": change.change, "file": file}
    if change.old_key is not None:
        out["oldFile"] = {"path": change.old_path, "key": change.old_key}
    return out


def _ms(at: float) -> int:
    return int(at * 1000)
