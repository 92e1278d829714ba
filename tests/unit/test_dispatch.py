"""The trigger dispatcher with a scripted invoker: batching, back-pressure, retries,
acks, dead-letters (native and Nimbus's), throttling, request-reply, the recursion
guard and partial batch responses; the records of every shape (sqs, s3, iot, native);
the pure partial-batch decision under each of Lambda's rules; and the trigger specs'
validation. The brokers themselves are tested in tests/triggers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from nimbus.errors import ResourceNotFound, TooManyRequests
from nimbus.models import Account, InvokeResult
from nimbus.triggers.dispatch import Dispatcher
from nimbus.triggers.sources.base import Message, Queued, Status
from nimbus.triggers.specs import EventTrigger, parse_event_trigger

Outcome = str | Callable[[dict[str, Any]], Any]


class ScriptedInvoker:
    """Answers each call with the next outcome: "ok", "error", "throttle", "gone", or a
    callable of the event returning the function's result; records the events it was
    given."""

    def __init__(self, *outcomes: Outcome, gate: asyncio.Event | None = None) -> None:
        self.outcomes = list(outcomes)
        self.events: list[dict[str, Any]] = []
        self.gate = gate
        self.running = 0
        self.most = 0

    async def invoke(
        self, name: str, event: bytes, *, request_id: uuid.UUID | None = None
    ) -> InvokeResult:
        self.events.append(json.loads(event))
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if callable(outcome):
            return InvokeResult("rid", json.dumps(outcome(self.events[-1])).encode())
        if outcome == "throttle":
            raise TooManyRequests("busy")
        if outcome == "gone":
            raise ResourceNotFound("no such function")
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if self.gate is not None:
                await self.gate.wait()
        finally:
            self.running -= 1
        if outcome == "error":
            return InvokeResult("rid", b'{"errorMessage": "boom"}', error="Unhandled")
        return InvokeResult("rid", b'{"ok": true}')


class Tracked:
    """Messages whose settlement is recorded."""

    def __init__(self) -> None:
        self.acked: list[str] = []
        self.dead: list[str] = []
        self.replies: list[bytes] = []

    def message(
        self, body: str, *, native_dlq: bool = False, reply: bool = False, depth: int = 0
    ) -> Message:
        async def ack() -> None:
            self.acked.append(body)

        async def dead_letter() -> None:
            self.dead.append(body)

        async def answer(data: bytes) -> None:
            self.replies.append(data)

        return Message(
            body=body.encode(),
            id=body,
            origin=Queued(queue="q"),
            ack=ack,
            dead_letter=dead_letter if native_dlq else None,
            reply=answer if reply else None,
            depth=depth,
        )


ACCOUNT = Account("eu-west-1", "123456789012")


def trigger(**fields: Any) -> EventTrigger:
    return parse_event_trigger({"type": "nats", "subject": "s", "retry_backoff": 0, **fields})


def dispatcher(
    invoker: ScriptedInvoker,
    spec: EventTrigger,
    dead: list[tuple[str, str, int]] | None = None,
    taken: bool = True,
) -> Dispatcher:
    async def dead_letters(
        function: str, event: bytes, condition: str, attempts: int, result: Any
    ) -> bool:
        if dead is not None:
            dead.append((function, condition, attempts))
        return taken

    async def no_sleep(_: float) -> None:
        await asyncio.sleep(0)

    return Dispatcher(
        "fn", "t", spec, invoker, dead_letters, Status(), account=ACCOUNT, sleep=no_sleep
    )


def run(coro_factory: Callable[[], Any]) -> Any:
    return asyncio.run(coro_factory())


async def drain(d: Dispatcher) -> None:
    await d.flush()
    await d.close(grace=5)


def test_success_acks_after_the_invocation_and_the_event_is_records() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker(), Tracked()
        d = dispatcher(inv, trigger())
        await d.emit(t.message("a"))
        await drain(d)
        assert t.acked == ["a"]
        record = inv.events[0]["Records"][0]
        assert record["body"] == "a" and record["messageId"] == "a"
        assert record["eventSource"] == "aws:sqs"
        assert record["eventSourceARN"] == "arn:aws:sqs:eu-west-1:123456789012:q"
        assert record["nimbus"]["depth"] == 1
        assert d.status.succeeded == 1 and d.status.received == 1

    run(go)


def test_non_utf8_bodies_are_base64() -> None:
    async def go() -> None:
        inv = ScriptedInvoker()
        d = dispatcher(inv, trigger())
        await d.emit(Message(body=b"\xff\x00", id="1", origin=Queued(queue="q")))
        await drain(d)
        record = inv.events[0]["Records"][0]
        assert record["body"] == "/wA=" and record["nimbus"]["bodyEncoding"] == "base64"

    run(go)


def test_messages_are_batched_up_to_batch_size() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker(), Tracked()
        d = dispatcher(inv, trigger(batch_size=3, batch_window=60))
        for body in "abcde":
            await d.emit(t.message(body))
        await drain(d)  # the last two go out on flush
        assert [[r["body"] for r in e["Records"]] for e in inv.events] == [
            ["a", "b", "c"],
            ["d", "e"],
        ]
        assert sorted(t.acked) == list("abcde")

    run(go)


def test_a_batch_window_sends_what_arrived_when_it_closes() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker(), Tracked()
        d = dispatcher(inv, trigger(batch_size=10, batch_window=0.05))
        await d.emit(t.message("a"))
        await d.emit(t.message("b"))
        for _ in range(200):
            if t.acked:
                break
            await asyncio.sleep(0.01)
        assert sorted(t.acked) == ["a", "b"]
        assert len(inv.events) == 1
        await d.close(grace=1)

    run(go)


def test_emit_blocks_while_max_concurrency_invocations_run() -> None:
    async def go() -> None:
        gate = asyncio.Event()
        inv, t = ScriptedInvoker(gate=gate), Tracked()
        d = dispatcher(inv, trigger(max_concurrency=2))
        await d.emit(t.message("a"))
        await d.emit(t.message("b"))
        third = asyncio.create_task(d.emit(t.message("c")))
        await asyncio.sleep(0.05)
        assert not third.done()  # back-pressure: the source cannot hand over more
        assert d.in_flight == 2
        gate.set()
        await asyncio.wait_for(third, 5)
        await drain(d)
        assert inv.most == 2
        assert sorted(t.acked) == ["a", "b", "c"]

    run(go)


def test_function_errors_are_retried_holding_the_message_then_acked() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker("error", "error", "ok"), Tracked()
        d = dispatcher(inv, trigger(max_retries=2))
        await d.emit(t.message("a"))
        await drain(d)
        assert len(inv.events) == 3
        assert t.acked == ["a"] and t.dead == []
        assert d.status.retried == 2 and d.status.succeeded == 1

    run(go)


def test_after_the_last_retry_the_native_dead_letter_settles_the_message() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker("error", "error"), Tracked()
        dead: list[tuple[str, str, int]] = []
        d = dispatcher(inv, trigger(max_retries=1), dead)
        await d.emit(t.message("a", native_dlq=True))
        await drain(d)
        assert t.dead == ["a"] and t.acked == []  # the broker's DLQ took it, not Nimbus's
        assert dead == []
        assert d.status.failed == 1 and d.status.dead_lettered == 1

    run(go)


def test_without_a_native_dead_letter_nimbus_destination_takes_it_then_ack() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker("error", "error", "error"), Tracked()
        dead: list[tuple[str, str, int]] = []
        d = dispatcher(inv, trigger(max_retries=2), dead)
        await d.emit(t.message("a"))
        await drain(d)
        assert dead == [("fn", "RetriesExhausted", 3)]
        assert t.acked == ["a"]

    run(go)


def test_throttling_is_waited_out_and_not_counted_as_a_failure() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker("throttle", "throttle", "ok"), Tracked()
        d = dispatcher(inv, trigger(max_retries=0))
        await d.emit(t.message("a"))
        await drain(d)
        assert t.acked == ["a"] and d.status.failed == 0 and d.status.retried == 0

    run(go)


def test_a_deleted_function_leaves_messages_unacked_for_redelivery() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker("gone"), Tracked()
        d = dispatcher(inv, trigger())
        await d.emit(t.message("a"))
        await drain(d)
        assert t.acked == [] and t.dead == []

    run(go)


def test_request_reply_sends_the_result() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker(), Tracked()
        d = dispatcher(inv, trigger())
        await d.emit(t.message("a", reply=True))
        await drain(d)
        assert t.replies == [b'{"ok": true}']

    run(go)


def test_too_deep_a_chain_is_not_invoked_but_dead_lettered() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker(), Tracked()
        dead: list[tuple[str, str, int]] = []
        d = dispatcher(inv, trigger(max_depth=3), dead)
        await d.emit(t.message("deep", depth=3))
        await d.emit(t.message("fine", depth=2))
        await drain(d)
        assert [e["Records"][0]["body"] for e in inv.events] == ["fine"]
        assert dead == [("fn", "RecursiveInvocationDetected", 0)]
        assert sorted(t.acked) == ["deep", "fine"]
        assert d.status.recursion_stopped == 1

    run(go)


def test_close_cancels_what_runs_past_the_grace_without_acking() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker(gate=asyncio.Event()), Tracked()
        d = dispatcher(inv, trigger())
        await d.emit(t.message("a"))
        await d.close(grace=0.05)
        assert t.acked == []

    run(go)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"type": "nats"}, "subject: is required"),
        ({"type": "nats", "subject": "a b"}, "must be a NATS subject"),
        ({"type": "mqtt", "topic": "a/#/b"}, "'#' must be a whole level, and the last one"),
        ({"type": "mqtt", "topic": "a/b+"}, "'+' must be a whole level"),
        ({"type": "redis", "stream": "s", "url": "http://x"}, "must be a URL like redis://"),
        ({"type": "files", "path": "relative"}, "must be an absolute directory path"),
        ({"type": "files", "path": "/srv/x", "mount": "/etc"}, "must be a path under /mnt"),
        ({"type": "amqp", "queue": "q", "prefetch": 0}, "prefetch"),
        ({"type": "nats", "subject": "s", "colour": "red"}, "colour: unknown field"),
        ({"type": "kafka"}, "unknown trigger type 'kafka'"),
    ],
)
def test_bad_triggers_are_refused_with_the_reason(raw: dict[str, Any], message: str) -> None:
    from nimbus.errors import InvalidParameterValue

    with pytest.raises(InvalidParameterValue) as e:
        parse_event_trigger(raw)
    assert message in e.value.message


def test_urls_are_shown_without_passwords() -> None:
    from nimbus.triggers.specs import redact_url, view

    assert redact_url("amqp://guest:guest@127.0.0.1:5672/vhost?x=1") == (
        "amqp://guest:***@127.0.0.1:5672/vhost"
    )
    assert redact_url("redis://:secret@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert view({"type": "nats", "url": "nats://u:p@h:1"})["url"] == "nats://u:***@h:1"
    # A bare user part is NATS's token: masked too.
    assert redact_url("nats://s3cret-token@127.0.0.1:4222") == "nats://***@127.0.0.1:4222"


def test_errors_shown_in_a_status_never_carry_a_password() -> None:
    from nimbus.triggers.sources.base import describe_error

    error = ConnectionError("cannot connect to amqp://guest:s3cret@127.0.0.1:5672/ (refused)")
    assert describe_error(error) == "cannot connect to amqp://guest:***@127.0.0.1:5672/ (refused)"
    assert "s3cret" not in describe_error(OSError("redis://:s3cret@h:1/0 down"))
    assert "s3cret" not in describe_error(OSError("nats://s3cret@h:4222 refused"))


def test_in_a_batch_only_the_too_deep_messages_are_held_back() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker(), Tracked()
        dead: list[tuple[str, str, int]] = []
        d = dispatcher(inv, trigger(max_depth=3, batch_size=2, batch_window=60), dead)
        await d.emit(t.message("deep", depth=5))
        await d.emit(t.message("fine", depth=0))
        await drain(d)
        assert [[r["body"] for r in e["Records"]] for e in inv.events] == [["fine"]]
        assert dead == [("fn", "RecursiveInvocationDetected", 0)]
        assert sorted(t.acked) == ["deep", "fine"]

    run(go)


def test_a_batch_over_the_payload_limit_is_split_until_it_fits() -> None:
    class Limited(ScriptedInvoker):
        async def invoke(
            self, name: str, event: bytes, *, request_id: uuid.UUID | None = None
        ) -> InvokeResult:
            from nimbus.errors import RequestTooLarge

            if len(json.loads(event)["Records"]) > 1:
                raise RequestTooLarge("too large")
            return await super().invoke(name, event, request_id=request_id)

    async def go() -> None:
        inv, t = Limited(), Tracked()
        dead: list[tuple[str, str, int]] = []
        d = dispatcher(inv, trigger(batch_size=3, batch_window=60), dead)
        for body in "abc":
            await d.emit(t.message(body))
        await drain(d)
        assert sorted(r["body"] for e in inv.events for r in e["Records"]) == ["a", "b", "c"]
        assert dead == [] and sorted(t.acked) == ["a", "b", "c"]

    run(go)


# -- record shapes ---------------------------------------------------------------------
def target(spec: EventTrigger, account: Account = ACCOUNT) -> Any:
    from nimbus.triggers.records import Target

    return Target.of(spec, "fn", "t", account)


def queued(body: bytes = b'{"n": 1}', **origin: Any) -> Message:
    fields: dict[str, Any] = {"queue": "orders", **origin}
    return Message(
        body=body,
        id="m-1",
        origin=Queued(**fields),
        record={"stream": "orders", "headers": {"k": "v"}},
        depth=2,
        received_at=1_700_000_001.5,
        delivery="d" * 32,
    )


def test_an_sqs_record_has_every_field_sqs_consumer_code_reads() -> None:
    from nimbus.triggers.records import sqs_record

    message = queued(
        delivery_count=3,
        sent_at=1_700_000_000.25,
        attributes={"k": "v", "n": 42, "f": 1.5, "blob": b"\x00\xff"},
    )
    record = sqs_record(target(trigger()), message, attempt=2)
    assert list(record) == [
        "messageId",
        "receiptHandle",
        "body",
        "attributes",
        "messageAttributes",
        "md5OfBody",
        "eventSource",
        "eventSourceARN",
        "awsRegion",
        "nimbus",
    ]
    assert record["messageId"] == "m-1" and record["body"] == '{"n": 1}'
    assert record["attributes"] == {
        # The broker's three deliveries, plus this one retry of Nimbus's.
        "ApproximateReceiveCount": "4",
        "SentTimestamp": "1700000000250",
        "SenderId": "123456789012",
        "ApproximateFirstReceiveTimestamp": "1700000001500",
    }
    empty = {"stringListValues": [], "binaryListValues": []}
    assert record["messageAttributes"] == {
        "k": {"stringValue": "v", "binaryValue": None, **empty, "dataType": "String"},
        "n": {"stringValue": "42", "binaryValue": None, **empty, "dataType": "Number"},
        "f": {"stringValue": "1.5", "binaryValue": None, **empty, "dataType": "Number"},
        "blob": {"stringValue": None, "binaryValue": "AP8=", **empty, "dataType": "Binary"},
    }
    assert record["md5OfBody"] == hashlib.md5(b'{"n": 1}').hexdigest()
    assert record["eventSource"] == "aws:sqs"
    assert record["eventSourceARN"] == "arn:aws:sqs:eu-west-1:123456789012:orders"
    assert record["awsRegion"] == "eu-west-1"
    assert record["nimbus"] == {
        "source": "nats",
        "trigger": "t",
        "depth": 3,  # what the function puts in the nimbus-depth header: one deeper
        "attempt": 2,
        "stream": "orders",
        "headers": {"k": "v"},
    }


def test_an_sqs_record_without_a_sent_time_or_sender_uses_the_receive_and_the_account() -> None:
    from nimbus.triggers.records import sqs_record

    record = sqs_record(target(trigger()), queued(sender="guest"))
    assert record["attributes"]["SentTimestamp"] == "1700000001500"
    assert record["attributes"]["SenderId"] == "guest"
    assert record["attributes"]["ApproximateReceiveCount"] == "1"
    assert record["messageAttributes"] == {}


def test_a_body_that_is_not_utf8_is_base64_and_its_md5_is_of_that_text() -> None:
    from nimbus.triggers.records import sqs_record

    record = sqs_record(target(trigger()), queued(body=b"\xff\xfe"))
    assert record["body"] == "//4=" and record["nimbus"]["bodyEncoding"] == "base64"
    assert record["md5OfBody"] == hashlib.md5(b"//4=").hexdigest()


def test_receipt_handles_differ_per_delivery_and_per_retry() -> None:
    from nimbus.triggers.records import receipt_handle

    t = target(trigger())
    first, again = queued(), queued()
    again.delivery = "e" * 32  # the broker delivered the same message again
    handles = {
        receipt_handle(t, first, 1),
        receipt_handle(t, first, 2),
        receipt_handle(t, again, 1),
    }
    assert len(handles) == 3 and all(isinstance(h, str) and h for h in handles)


@pytest.mark.parametrize(
    ("name", "queue"),
    [
        ("ORDERS", "ORDERS"),
        ("orders.eu", "orders-eu"),
        ("orders.*.created", "orders-any-created"),
        ("orders.>", "orders-all"),
        ("payments:eu/2", "payments_eu_2"),
        ("x" * 100, "x" * 80),
    ],
)
def test_queue_names_in_arns_are_what_sqs_allows(name: str, queue: str) -> None:
    from nimbus.triggers.records import queue_name

    assert queue_name(name) == queue


def test_the_native_shape_is_nimbus_own_record() -> None:
    from nimbus.triggers.records import native_record

    record = native_record(target(trigger(shape="native")), queued(body=b"\xff"))
    assert record == {
        "eventSource": "nimbus:nats",
        "eventSourceArn": "nimbus:nats:fn:t",
        "messageId": "m-1",
        "stream": "orders",
        "headers": {"k": "v"},
        "body": "/w==",
        "bodyEncoding": "base64",
        "nimbusDepth": 3,
    }


def file_message(change: str, key: str = "in/a b+c.txt", **fields: Any) -> Message:
    from nimbus.triggers.sources.base import FileChange

    present = change != "deleted"
    values: dict[str, Any] = {
        "change": change,
        "path": f"/srv/inbox/{key}",
        "key": key,
        "size": 5 if present else None,
        "mtime": 1_700_000_000.0 if present else None,
        "etag": "0" * 32 if present else None,
        "at": 1_700_000_000.0625,
        **fields,
    }
    return Message(body=b"", id="0017A", origin=FileChange(**values), delivery="ab" * 16)


def files_trigger(**fields: Any) -> EventTrigger:
    return parse_event_trigger({"type": "files", "path": "/srv/Inbox", **fields})


def test_an_s3_record_for_a_created_file() -> None:
    from nimbus.triggers.records import s3_record

    record = s3_record(target(files_trigger()), file_message("created"))
    assert record["eventVersion"] == "2.1" and record["eventSource"] == "aws:s3"
    assert record["awsRegion"] == "eu-west-1"
    assert record["eventTime"] == "2023-11-14T22:13:20.062Z"
    assert record["eventName"] == "ObjectCreated:Put"
    assert record["userIdentity"] == {"principalId": "123456789012"}
    assert record["requestParameters"] == {"sourceIPAddress": "127.0.0.1"}
    assert set(record["responseElements"]) == {"x-amz-request-id", "x-amz-id-2"}
    assert record["s3"] == {
        "s3SchemaVersion": "1.0",
        "configurationId": "t",
        "bucket": {
            "name": "inbox",  # the watched directory's name
            "ownerIdentity": {"principalId": "123456789012"},
            "arn": "arn:aws:s3:::inbox",
        },
        # URL-encoded as S3 does: spaces are '+', a '+' is %2B, '/' stays.
        "object": {"key": "in/a+b%2Bc.txt", "size": 5, "eTag": "0" * 32, "sequencer": "0017A"},
    }
    assert record["nimbus"] == {
        "source": "files",
        "trigger": "t",
        "change": "created",
        "path": "/srv/inbox/in/a b+c.txt",
        "key": "in/a b+c.txt",
        "mtime": "2023-11-14T22:13:20+00:00",
    }


def test_s3_records_for_a_modification_a_deletion_and_a_move() -> None:
    from nimbus.triggers.records import s3_record

    t = target(files_trigger(bucket="my.bucket-1", mount="/mnt/inbox"))
    modified = s3_record(t, file_message("modified", local_path="/mnt/inbox/in/a b+c.txt"))
    assert modified["eventName"] == "ObjectCreated:Put"
    assert modified["s3"]["bucket"]["name"] == "my.bucket-1"
    assert modified["nimbus"]["localPath"] == "/mnt/inbox/in/a b+c.txt"
    deleted = s3_record(t, file_message("deleted", key="gone.txt"))
    assert deleted["eventName"] == "ObjectRemoved:Delete"
    assert deleted["s3"]["object"] == {"key": "gone.txt", "sequencer": "0017A"}
    moved = s3_record(
        t, file_message("moved", key="b.txt", old_key="a.txt", old_path="/srv/inbox/a.txt")
    )
    assert moved["eventName"] == "ObjectCreated:Copy"
    assert moved["s3"]["object"]["key"] == "b.txt"
    assert moved["nimbus"]["oldKey"] == "a.txt"
    assert moved["nimbus"]["oldPath"] == "/srv/inbox/a.txt"


def test_native_file_records_are_as_before() -> None:
    from nimbus.triggers.records import native_record

    record = native_record(
        target(files_trigger(shape="native")),
        file_message("moved", key="b.txt", old_key="a.txt", old_path="/srv/inbox/a.txt"),
    )
    assert record["eventName"] == "moved" and record["eventSource"] == "nimbus:files"
    assert record["file"] == {
        "path": "/srv/inbox/b.txt",
        "key": "b.txt",
        "size": 5,
        "mtime": "2023-11-14T22:13:20+00:00",
    }
    assert record["oldFile"] == {"path": "/srv/inbox/a.txt", "key": "a.txt"}
    assert record["body"] == "" and record["messageId"] == "0017A"


def mqtt_message(body: bytes) -> Message:
    from nimbus.triggers.sources.base import Published

    return Message(body=body, id="7", origin=Published(topic="sensors/1/temp"))


def mqtt_trigger(**fields: Any) -> EventTrigger:
    return parse_event_trigger({"type": "mqtt", "topic": "sensors/#", **fields})


def test_an_iot_event_is_the_json_object_itself() -> None:
    from nimbus.triggers.records import event

    payload = b'{"temp": 21.5, "big": 123456789012345678901234567890}'
    assert event(target(mqtt_trigger()), [mqtt_message(payload)]) == payload
    with_topic = event(target(mqtt_trigger(topic_field="topic")), [mqtt_message(payload)])
    assert json.loads(with_topic) == {
        "temp": 21.5,
        "big": 123456789012345678901234567890,
        "topic": "sensors/1/temp",
    }


@pytest.mark.parametrize("payload", [b"\xff\x00binary", b"[1, 2]", b"42", b"not json", b""])
def test_an_iot_event_of_anything_but_a_json_object_is_base64_data(payload: bytes) -> None:
    from nimbus.triggers.records import event

    got = json.loads(event(target(mqtt_trigger()), [mqtt_message(payload)]))
    assert got == {"data": base64.b64encode(payload).decode()}  # encode(*, 'base64') AS data
    got = json.loads(event(target(mqtt_trigger(topic_field="t")), [mqtt_message(payload)]))
    assert got["t"] == "sensors/1/temp"


# -- the partial batch decision -----------------------------------------------------------
IDS = frozenset({"a", "b", "c"})


def failures(*items: Any) -> bytes:
    return json.dumps({"batchItemFailures": list(items)}).encode()


@pytest.mark.parametrize(
    ("result", "kind", "failed"),
    [
        # Lambda: all succeeded
        (failures(), "succeeded", set()),
        (b'{"batchItemFailures": null}', "succeeded", set()),
        (b"null", "succeeded", set()),
        (b"", "succeeded", set()),
        (b"{}", "succeeded", set()),
        # Nimbus: a result that is not a batch response is not one
        (b'{"ok": true}', "succeeded", set()),
        (b'"done"', "succeeded", set()),
        (b"[1, 2]", "succeeded", set()),
        # the named ones failed
        (failures({"itemIdentifier": "b"}), "partial", {"b"}),
        (failures({"itemIdentifier": "a"}, {"itemIdentifier": "c"}), "partial", {"a", "c"}),
        (failures({"itemIdentifier": "b"}, {"itemIdentifier": "b"}), "partial", {"b"}),
        # Lambda: the whole batch failed
        (failures({"itemIdentifier": ""}), "failed", set()),
        (failures({"itemIdentifier": None}), "failed", set()),
        (failures({"itemidentifier": "a"}), "failed", set()),
        (failures({}), "failed", set()),
        (failures("a"), "failed", set()),
        (failures({"itemIdentifier": "zzz"}), "failed", set()),
        (failures({"itemIdentifier": "a"}, {"itemIdentifier": "zzz"}), "failed", set()),
        (failures({"itemIdentifier": 1}), "failed", set()),
        (b'{"batchItemFailures": "a"}', "failed", set()),
        (b'{"batchItemFailures": {"itemIdentifier": "a"}}', "failed", set()),
    ],
)
def test_partial_batch_responses_follow_lambdas_rules(
    result: bytes, kind: str, failed: set[str]
) -> None:
    from nimbus.triggers.outcome import judge

    outcome = judge(None, result, IDS, report=True)
    assert (outcome.kind, set(outcome.failed_ids)) == (kind, failed), outcome
    if kind == "failed":
        assert outcome.reason


def test_a_function_error_fails_the_whole_batch_whatever_it_returned() -> None:
    from nimbus.triggers.outcome import judge

    outcome = judge("Unhandled", failures({"itemIdentifier": "a"}), IDS, report=True)
    assert outcome.kind == "failed" and outcome.failed_ids == frozenset()


def test_without_report_batch_item_failures_the_result_is_ignored() -> None:
    from nimbus.triggers.outcome import judge

    assert judge(None, failures({"itemIdentifier": "a"}), IDS, report=False).kind == "succeeded"
    assert judge(None, failures({"itemIdentifier": "zzz"}), IDS, report=False).kind == ("succeeded")


# -- partial batch responses in the dispatcher ---------------------------------------------
def fail_these(*ids: str) -> Callable[[dict[str, Any]], Any]:
    """A function result naming the records with these ids (that are in its event)."""

    def result(event: dict[str, Any]) -> Any:
        present = [r["messageId"] for r in event["Records"] if r["messageId"] in ids]
        return {"batchItemFailures": [{"itemIdentifier": i} for i in present]}

    return result


def test_only_the_failed_records_are_retried_then_dead_lettered_the_others_acked_once() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker(*[fail_these("b")] * 3), Tracked()
        dead: list[tuple[str, str, int]] = []
        d = dispatcher(inv, trigger(batch_size=3, batch_window=60, max_retries=2), dead)
        for body in "abc":
            await d.emit(t.message(body, native_dlq=body == "b"))
        await drain(d)
        assert [[r["messageId"] for r in e["Records"]] for e in inv.events] == [
            ["a", "b", "c"],
            ["b"],  # the retries carry only the failed record
            ["b"],
        ]
        counts = [e["Records"][0]["attributes"]["ApproximateReceiveCount"] for e in inv.events]
        assert counts == ["1", "2", "3"]
        assert t.acked == ["a", "c"]  # each once, right after the first invocation
        assert t.dead == ["b"] and dead == []
        assert d.status.succeeded == 2 and d.status.retried == 2
        assert d.status.failed == 1 and d.status.dead_lettered == 1

    run(go)


def test_a_record_that_succeeds_on_retry_is_acked_then() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker(fail_these("a", "c"), fail_these("c"), "ok"), Tracked()
        d = dispatcher(inv, trigger(batch_size=3, batch_window=60, max_retries=5))
        for body in "abc":
            await d.emit(t.message(body))
        await drain(d)
        assert [[r["messageId"] for r in e["Records"]] for e in inv.events] == [
            ["a", "b", "c"],
            ["a", "c"],
            ["c"],
        ]
        assert t.acked == ["b", "a", "c"] and t.dead == []
        assert d.status.succeeded == 3 and d.status.retried == 3

    run(go)


def test_a_response_naming_no_record_of_the_batch_fails_all_of_it() -> None:
    async def go() -> None:
        def bad(event: dict[str, Any]) -> Any:
            return {"batchItemFailures": [{"itemIdentifier": "not-in-the-batch"}]}

        inv, t = ScriptedInvoker(bad, "ok"), Tracked()
        d = dispatcher(inv, trigger(batch_size=2, batch_window=60, max_retries=1))
        await d.emit(t.message("a"))
        await d.emit(t.message("b"))
        await drain(d)
        assert [[r["messageId"] for r in e["Records"]] for e in inv.events] == [
            ["a", "b"],
            ["a", "b"],
        ]
        assert t.acked == ["a", "b"] and d.status.retried == 2

    run(go)


def test_with_report_batch_item_failures_off_the_response_is_ignored() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker(fail_these("a")), Tracked()
        spec = trigger(batch_size=2, batch_window=60, report_batch_item_failures=False)
        d = dispatcher(inv, spec)
        await d.emit(t.message("a"))
        await d.emit(t.message("b"))
        await drain(d)
        assert len(inv.events) == 1 and t.acked == ["a", "b"]

    run(go)


def test_partial_batch_responses_work_with_the_native_shape_too() -> None:
    async def go() -> None:
        inv, t = ScriptedInvoker(fail_these("a")), Tracked()
        dead: list[tuple[str, str, int]] = []
        d = dispatcher(
            inv, trigger(batch_size=2, batch_window=60, max_retries=0, shape="native"), dead
        )
        await d.emit(t.message("a"))
        await d.emit(t.message("b"))
        await drain(d)
        assert t.acked == ["b", "a"]  # b at once; a after Nimbus's dead-letter took it
        assert dead == [("fn", "RetriesExhausted", 1)]

    run(go)


def test_an_iot_trigger_invokes_with_the_payload_and_replies_with_the_result() -> None:
    async def go() -> None:
        from nimbus.triggers.sources.base import Published

        inv = ScriptedInvoker(*[lambda event: {"seen": event}] * 2)
        d = dispatcher(inv, mqtt_trigger(batch_window=60))
        replies: list[bytes] = []

        async def reply(body: bytes) -> None:
            replies.append(body)

        for n in (1, 2):
            body = json.dumps({"n": n}).encode()
            await d.emit(Message(body=body, id=str(n), origin=Published("a"), reply=reply))
        await drain(d)
        assert inv.events == [{"n": 1}, {"n": 2}]  # one message per invocation
        assert sorted(json.loads(r)["seen"]["n"] for r in replies) == [1, 2]

    run(go)


# -- specs -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"type": "nats", "subject": "s", "shape": "s3"},
            "shape: for a nats trigger, must be sqs (Lambda's SQS records) or native",
        ),
        ({"type": "redis", "stream": "s", "shape": "iot"}, "shape: for a redis trigger"),
        ({"type": "files", "path": "/srv/x", "shape": "sqs"}, "must be s3 (S3 event"),
        ({"type": "mqtt", "topic": "a", "shape": "sqs"}, "must be iot (the message itself"),
        (
            {"type": "mqtt", "topic": "a", "shape": "iot", "batch_size": 10},
            "shape: iot needs batch_size 1",
        ),
        (
            {"type": "mqtt", "topic": "a", "shape": "native", "topic_field": "t"},
            "topic_field: only applies to shape iot",
        ),
        ({"type": "files", "path": "/srv/x", "bucket": "My_Bucket"}, "bucket: 'My_Bucket'"),
        ({"type": "files", "path": "/srv/x", "bucket": "ab"}, "3-63 characters"),
        ({"type": "files", "path": "/srv/x", "bucket": "a..b"}, "two periods"),
        ({"type": "files", "path": "/srv/x", "bucket": "10.0.0.1"}, "an IP address"),
        ({"type": "files", "path": "/srv/x", "bucket": "xn--abc"}, "cannot begin with 'xn--'"),
        ({"type": "amqp", "queue": "q", "report_batch_item_failures": "maybe"}, "report_batch"),
    ],
)
def test_bad_shapes_and_buckets_are_refused_with_the_reason(
    raw: dict[str, Any], message: str
) -> None:
    from nimbus.errors import InvalidParameterValue

    with pytest.raises(InvalidParameterValue) as e:
        parse_event_trigger(raw)
    assert message in e.value.message, e.value.message


@pytest.mark.parametrize(
    ("raw", "shape"),
    [
        ({"type": "nats", "subject": "s"}, "sqs"),
        ({"type": "redis", "stream": "s"}, "sqs"),
        ({"type": "amqp", "queue": "q"}, "sqs"),
        ({"type": "files", "path": "/srv/x"}, "s3"),
        ({"type": "mqtt", "topic": "a"}, "iot"),
        # An IoT rule has no batches: a trigger asking for them keeps Nimbus's records.
        ({"type": "mqtt", "topic": "a", "batch_size": 10}, "native"),
        ({"type": "nats", "subject": "s", "shape": "native"}, "native"),
    ],
)
def test_each_type_defaults_to_its_lambda_shape(raw: dict[str, Any], shape: str) -> None:
    spec = parse_event_trigger(raw)
    assert spec.shape == shape and spec.report_batch_item_failures is True


@pytest.mark.parametrize(
    ("path", "bucket"),
    [
        ("/srv/inbox", "inbox"),
        ("/srv/Inbox_Files", "inbox-files"),
        ("/tmp/pytest-of-root/test_create0", "test-create0"),
        ("/srv/a", "nimbus-a"),
        ("/srv/10.0.0.1", "nimbus-10.0.0.1"),
        ("/", "nimbus"),
    ],
)
def test_the_default_bucket_is_made_from_the_directory_name(path: str, bucket: str) -> None:
    from nimbus.triggers.specs import FilesTrigger

    spec = parse_event_trigger({"type": "files", "path": path})
    assert isinstance(spec, FilesTrigger) and spec.bucket == bucket
