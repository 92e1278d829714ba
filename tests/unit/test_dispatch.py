"""The trigger dispatcher with a scripted invoker: batching, back-pressure, retries,
acks, dead-letters (native and Nimbus's), throttling, request-reply and the recursion
guard. The brokers themselves are tested in tests/triggers."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from nimbus.errors import ResourceNotFound, TooManyRequests
from nimbus.models import InvokeResult
from nimbus.triggers.dispatch import Dispatcher
from nimbus.triggers.sources.base import Message, Status
from nimbus.triggers.specs import EventTrigger, parse_event_trigger


class ScriptedInvoker:
    """Answers each call with the next outcome: "ok", "error", "throttle", "gone", or a
    callable; records the events it was given."""

    def __init__(self, *outcomes: str, gate: asyncio.Event | None = None) -> None:
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
            record={"messageId": body},
            ack=ack,
            dead_letter=dead_letter if native_dlq else None,
            reply=answer if reply else None,
            depth=depth,
        )


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

    return Dispatcher("fn", "t", spec, invoker, dead_letters, Status(), sleep=no_sleep)


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
        assert record["eventSource"] == "nimbus:nats"
        assert record["eventSourceArn"] == "nimbus:nats:fn:t"
        assert record["nimbusDepth"] == 1
        assert d.status.succeeded == 1 and d.status.received == 1

    run(go)


def test_non_utf8_bodies_are_base64() -> None:
    async def go() -> None:
        inv = ScriptedInvoker()
        d = dispatcher(inv, trigger())
        await d.emit(Message(body=b"\xff\x00", record={}))
        await drain(d)
        record = inv.events[0]["Records"][0]
        assert record == {**record, "body": "/wA=", "bodyEncoding": "base64"}

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
