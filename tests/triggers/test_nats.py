"""NATS triggers against a real ``nimbus up`` and real nats-servers (JetStream): the
machine's shared one (``NIMBUS_TEST_NATS_URL``) and private ones on free ports for
broker restarts and credentials.

What is checked is what the broker itself says (consumer ack-pending and pending
counts, the dead-letter stream's content) next to what the sink function received.
Every test uses its own subjects, streams and function names, and deletes them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import threading
import time
import uuid
from collections.abc import Coroutine, Iterator
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

import nats
import pytest
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo

from tests.support import NimbusServer, running
from tests.triggers.support import (
    PrivateBroker,
    bodies,
    deploy_sink,
    env_url,
    printed,
    private_broker,
    records,
    trigger,
    wait_for,
    wait_printed,
    wait_records,
    wait_state,
)

NATS_URL = env_url("NIMBUS_TEST_NATS_URL", "nats://127.0.0.1:4222")
NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
T = TypeVar("T")


class Nats:
    """A NATS client for the (synchronous) tests, on an event loop of its own thread.
    Streams it creates, or is told about, are deleted by :meth:`close`."""

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        try:
            self.nc = self._run(nats.connect(url, allow_reconnect=False))
        except BaseException:
            self._stop()
            raise
        self.js = self.nc.jetstream()
        self.streams: list[str] = []

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def publish(self, subject: str, body: Any, headers: dict[str, str] | None = None) -> None:
        """A core publish, flushed: the server has it when this returns."""

        async def go() -> None:
            await self.nc.publish(subject, json.dumps(body).encode(), headers=headers)
            await self.nc.flush()

        self._run(go())

    def store(self, subject: str, body: Any, headers: dict[str, str] | None = None) -> int:
        """A JetStream publish: the stream stored it (its sequence) when this returns."""
        ack = self._run(self.js.publish(subject, json.dumps(body).encode(), headers=headers))
        return int(ack.seq)

    def request(self, subject: str, body: Any, timeout: float = 20) -> Any:
        reply = self._run(self.nc.request(subject, json.dumps(body).encode(), timeout=timeout))
        return json.loads(reply.data)

    def add_stream(self, name: str, subjects: list[str]) -> None:
        self.streams.append(name)
        self._run(self.js.add_stream(name=name, subjects=subjects))

    def consumer(self, stream: str, name: str) -> ConsumerInfo:
        return self._run(self.js.consumer_info(stream, name))

    def fetch(self, stream: str, consumer: str, timeout: float) -> list[Msg]:
        """Read (and ack) the next message of a durable pull consumer."""

        async def go() -> list[Msg]:
            sub = await self.js.pull_subscribe_bind(durable=consumer, stream=stream)
            try:
                msgs = await sub.fetch(1, timeout=timeout)
                for msg in msgs:
                    await msg.ack()
                return msgs
            finally:
                await sub.unsubscribe()

        return self._run(go())

    def stream_messages(self, stream: str) -> list[Msg]:
        """Every message in ``stream``, oldest first."""

        async def go() -> list[Msg]:
            info = await self.js.stream_info(stream)
            first, last = info.state.first_seq, info.state.last_seq
            if info.state.messages == 0:
                return []
            return [await self.js.get_msg(stream, seq) for seq in range(first, last + 1)]

        return self._run(go())

    def listen(self, subject: str) -> list[Msg]:
        """Messages on ``subject`` from now on, collected as they arrive."""
        got: list[Msg] = []

        async def go() -> None:
            async def collect(msg: Msg) -> None:
                got.append(msg)

            await self.nc.subscribe(subject, cb=collect)
            await self.nc.flush()

        self._run(go())
        return got

    def close(self) -> None:
        async def go() -> None:
            for stream in self.streams:
                with suppress(nats.js.errors.NotFoundError):
                    await self.js.delete_stream(stream)
            await self.nc.close()

        try:
            if not self.nc.is_closed:
                self._run(go())
        finally:
            self._stop()

    def _stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@dataclass
class Case:
    """One test's names (all unique) and what it made, removed afterwards."""

    server: NimbusServer
    nats: Nats
    uid: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    functions: list[str] = field(default_factory=list)

    def name(self, what: str) -> str:
        return f"nats-{what}-{self.uid}"

    def subject(self, what: str) -> str:
        return f"t{self.uid}.{what}"

    def stream(self, what: str) -> str:
        name = f"T{self.uid}-{what}"
        self.nats.streams.append(name)
        return name

    def deploy(self, name: str, *triggers: dict[str, Any], **spec: Any) -> None:
        self.functions.append(name)
        deploy_sink(self.server, name, *triggers, **spec)
        for t in triggers:
            wait_state(self.server, name, t["name"])

    def status(self, function: str, name: str) -> dict[str, Any]:
        return dict(trigger(self.server, function, name)["status"])

    def remove(self) -> None:
        # The functions first: a running trigger would create its stream again.
        for name in self.functions:
            self.server.client.delete(f"/v1/functions/{name}")


@pytest.fixture
def case(server: NimbusServer) -> Iterator[Case]:
    client = Nats(NATS_URL)
    made = Case(server, client)
    try:
        yield made
    finally:
        try:
            made.remove()
        finally:
            client.close()


def nats_server(directory: Path, *extra: str) -> AbstractContextManager[PrivateBroker]:
    """A private JetStream nats-server (stopped by its pid when the test ends)."""
    store = str(directory / "jetstream")

    def argv(port: int) -> list[str]:
        return [NATS_SERVER, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", store, *extra]

    return private_broker(directory, argv, "nats")


def consumer_of(function: str, trigger_name: str) -> str:
    return f"nimbus-{function}-{trigger_name}"


# -- delivery ------------------------------------------------------------------------------
def test_jetstream_delivers_each_message_once_with_its_metadata_and_acks_it(case: Case) -> None:
    fn, subject, stream = case.name("deliver"), case.subject("orders"), case.stream("orders")
    case.deploy(fn, {"type": "nats", "name": "orders", "subject": subject, "stream": stream})
    first = case.nats.store(subject, {"n": 1}, headers={"X-Trace": "abc"})
    second = case.nats.store(subject, {"n": 2})

    got = {r["messageId"]: r for r in wait_records(case.server, fn, 2)}
    assert set(got) == {str(first), str(second)}
    record = got[str(first)]
    assert json.loads(record["body"]) == {"n": 1}
    assert record["eventSource"] == "aws:sqs"
    assert record["eventSourceARN"] == f"arn:aws:sqs:us-east-1:000000000000:{stream}"
    assert record["attributes"]["ApproximateReceiveCount"] == "1"
    trace = record["messageAttributes"]["X-Trace"]
    assert trace["stringValue"] == "abc" and trace["dataType"] == "String"
    meta = record["nimbus"]
    assert meta["subject"] == subject
    assert meta["stream"] == stream
    assert meta["consumer"] == consumer_of(fn, "orders")
    assert meta["streamSequence"] == first
    assert meta["consumerSequence"] in (1, 2)
    assert meta["deliveryCount"] == 1 and meta["redelivered"] is False
    assert meta["headers"] == {"X-Trace": "abc"}
    assert meta["depth"] == 1
    stored = datetime.fromisoformat(meta["timestamp"])
    assert record["attributes"]["SentTimestamp"] == str(int(stored.timestamp() * 1000))
    # Acked after success: the consumer has nothing pending or unacknowledged.
    wait_for(
        "both messages acked",
        lambda: (
            (c := case.nats.consumer(stream, consumer_of(fn, "orders"))).num_ack_pending == 0
            and c.num_pending == 0
            and c.delivered.stream_seq == second
        ),
    )
    time.sleep(0.5)
    assert len(records(case.server, fn)) == 2  # each exactly once


def test_core_nats_delivers_in_a_queue_group_and_answers_requests(case: Case) -> None:
    fn, subject = case.name("core"), case.subject("ask")
    case.deploy(fn, {"type": "nats", "name": "ask", "subject": subject})

    assert case.nats.request(subject, {"q": 1}) == {"ok": True, "count": 1, "bodies": [{"q": 1}]}
    case.nats.publish(subject, {"q": 2}, headers={"Nats-Msg-Id": "m-2"})
    asked, told = wait_records(case.server, fn, 2)
    assert asked["nimbus"]["request"] is True and told["nimbus"]["request"] is False
    assert told["messageId"] == "m-2" and asked["messageId"]
    assert asked["nimbus"]["subject"] == subject
    assert asked["nimbus"]["queue"] == consumer_of(fn, "ask")
    assert "stream" not in asked["nimbus"]
    # Core NATS has no stream: the ARN names the subject, as SQS allows.
    queue = subject.replace(".", "-")
    assert asked["eventSourceARN"] == f"arn:aws:sqs:us-east-1:000000000000:{queue}"
    status = case.status(fn, "ask")
    assert status["succeeded"] == 2 and status["state"] == "connected"


def test_wildcard_subjects_route_one_token_or_the_rest(case: Case) -> None:
    fn, base = case.name("wild"), case.subject("orders")
    stream = case.stream("wild")
    case.deploy(
        fn,
        {"type": "nats", "name": "star", "subject": f"{base}.*"},
        {"type": "nats", "name": "rest", "subject": f"{base}.>", "stream": stream},
    )
    for subject in (f"{base}.eu", f"{base}.eu.paris", base, case.subject("other.eu")):
        case.nats.publish(subject, {"to": subject})
    wait_records(case.server, fn, 3)
    time.sleep(1.0)  # and nothing more comes
    got = sorted((r["nimbus"]["trigger"], r["nimbus"]["subject"]) for r in records(case.server, fn))
    assert got == [("rest", f"{base}.eu"), ("rest", f"{base}.eu.paris"), ("star", f"{base}.eu")]


# -- acknowledgement and retries -----------------------------------------------------------
def test_a_failing_message_is_held_unacked_and_retried_until_it_succeeds(case: Case) -> None:
    fn, subject, stream = case.name("retry"), case.subject("flaky"), case.stream("flaky")
    # ack_wait (2 s) is shorter than the retries take (about 3.5 s): JetStream would
    # redeliver the message, were Nimbus not telling it the message is in progress.
    case.deploy(
        fn,
        {
            "type": "nats",
            "name": "flaky",
            "subject": subject,
            "stream": stream,
            "ack_wait": 2,
            "max_retries": 6,
            "retry_backoff": 0.5,
        },
    )
    consumer = consumer_of(fn, "flaky")
    seq = case.nats.store(subject, {"fail_until": time.time() + 3})

    wait_records(case.server, fn, 1)
    held = wait_for(
        "the failed message held",
        lambda: (c := case.nats.consumer(stream, consumer)).num_ack_pending == 1 and c,
    )
    assert held.num_pending == 0  # taken, and not acknowledged while it is retried

    wait_for("the message to succeed", lambda: case.status(fn, "flaky")["succeeded"] == 1)
    tries = records(case.server, fn)
    assert len(tries) >= 2, tries  # delivered again after the error...
    assert {r["messageId"] for r in tries} == {str(seq)}
    # ...by Nimbus, holding it: JetStream never redelivered it.
    assert {r["nimbus"]["deliveryCount"] for r in tries} == {1}
    status = case.status(fn, "flaky")
    assert status["retried"] == len(tries) - 1 and status["failed"] == 0
    wait_for("the ack", lambda: case.nats.consumer(stream, consumer).num_ack_pending == 0)


def test_a_slow_function_leaves_the_rest_in_the_stream(case: Case) -> None:
    fn, subject, stream = case.name("slow"), case.subject("slow"), case.stream("slow")
    case.deploy(
        fn,
        {
            "type": "nats",
            "name": "slow",
            "subject": subject,
            "stream": stream,
            "max_concurrency": 1,
        },
    )
    consumer = consumer_of(fn, "slow")
    for n in range(6):
        case.nats.store(subject, {"n": n, "sleep": 0.8})

    wait_records(case.server, fn, 1)
    seen: list[tuple[int, int]] = []

    def all_done() -> bool:
        info = case.nats.consumer(stream, consumer)
        seen.append((info.num_ack_pending, info.num_pending))
        assert trigger(case.server, fn, "slow")["status"]["in_flight"] <= 1
        return info.num_ack_pending == 0 and info.num_pending == 0

    wait_for("every message processed", all_done, timeout=30)
    # One invoking and one waiting for the slot, at most: the rest stayed in the stream.
    assert max(pending for pending, _ in seen) <= 2, seen
    assert seen[0][1] >= 3, seen
    assert sorted(b["n"] for b in bodies(case.server, fn)) == list(range(6))


# -- dead letters and the recursion guard --------------------------------------------------
def test_a_message_failing_every_retry_goes_to_the_dead_letter_subject(case: Case) -> None:
    fn, subject, stream = case.name("dlq"), case.subject("doomed"), case.stream("doomed")
    dead = case.subject("dead")
    case.nats.add_stream(f"D{case.uid}", [dead])  # a stream keeps the dead letters
    case.deploy(
        fn,
        {
            "type": "nats",
            "name": "doomed",
            "subject": subject,
            "stream": stream,
            "dead_letter_subject": dead,
            "max_retries": 1,
            "retry_backoff": 0.1,
        },
    )
    case.nats.store(subject, {"fail": True}, headers={"X-Trace": "t-1", "Nats-Msg-Id": "m-1"})

    [letter] = wait_for("the dead letter", lambda: case.nats.stream_messages(f"D{case.uid}"))
    assert json.loads(letter.data) == {"fail": True}
    assert letter.headers is not None
    assert letter.headers["Nimbus-Failure"] == "RetriesExhausted"
    assert letter.headers["Nimbus-Function"] == fn
    assert letter.headers["Nimbus-Trigger"] == "doomed"
    assert letter.headers["Nimbus-Subject"] == subject
    assert letter.headers["X-Trace"] == "t-1"
    assert "Nats-Msg-Id" not in letter.headers
    # Terminated at the source: nothing pending, nothing to redeliver.
    info = wait_for(
        "the original settled",
        lambda: (
            (c := case.nats.consumer(stream, consumer_of(fn, "doomed"))).num_ack_pending == 0 and c
        ),
    )
    assert info.num_pending == 0
    assert len(records(case.server, fn)) == 2  # the first try and one retry
    status = case.status(fn, "doomed")
    assert (status["failed"], status["retried"], status["dead_lettered"]) == (1, 1, 1)


def test_without_a_dead_letter_subject_the_function_destination_gets_it(case: Case) -> None:
    fn, subject, stream = case.name("dest"), case.subject("doomed"), case.stream("doomed")
    sink = case.name("dest-sink")
    case.functions.append(sink)
    assert case.server.deploy("async-sink", name=sink).status_code == 201
    case.deploy(
        fn,
        {
            "type": "nats",
            "name": "doomed",
            "subject": subject,
            "stream": stream,
            "max_retries": 1,
            "retry_backoff": 0.1,
        },
        **{"async": {"dead_letter": f"function:{sink}"}},
    )
    case.nats.store(subject, {"fail": True})

    def dead_lettered() -> list[dict[str, Any]]:
        r = case.server.client.get("/v1/invocations", params={"function": sink})
        return [i for i in r.json()["invocations"] if i["status"] == "succeeded"]

    done = wait_for("the dead-letter record", dead_lettered, server=case.server)
    result = case.server.client.get(f"/v1/invocations/{done[0]['id']}").json()["result"]
    assert result["requestContext"]["condition"] == "RetriesExhausted"
    [record] = result["requestPayload"]["Records"]
    assert record["nimbus"]["subject"] == subject and record["nimbus"]["stream"] == stream
    # Nimbus took it, so it is acknowledged at the broker.
    wait_for(
        "the ack",
        lambda: case.nats.consumer(stream, consumer_of(fn, "doomed")).num_ack_pending == 0,
    )


def test_a_message_too_deep_in_a_chain_is_not_delivered_but_dead_lettered(case: Case) -> None:
    fn, subject, stream = case.name("deep"), case.subject("loop"), case.stream("loop")
    dead = case.subject("loop-dead")
    letters = case.nats.listen(dead)  # no stream: the dead letter is a core publish
    case.deploy(
        fn,
        {
            "type": "nats",
            "name": "loop",
            "subject": subject,
            "stream": stream,
            "dead_letter_subject": dead,
        },
    )
    case.nats.store(subject, {"deep": 16}, headers={"nimbus-depth": "16"})
    case.nats.store(subject, {"deep": 15}, headers={"nimbus-depth": "15"})

    [record] = wait_records(case.server, fn, 1)
    assert json.loads(record["body"]) == {"deep": 15} and record["nimbus"]["depth"] == 16
    wait_for("the dead letter", lambda: letters)
    assert json.loads(letters[0].data) == {"deep": 16}
    assert letters[0].headers is not None
    assert letters[0].headers["Nimbus-Failure"] == "RecursiveInvocationDetected"
    assert letters[0].headers["nimbus-depth"] == "16"
    status = case.status(fn, "loop")
    assert status["recursion_stopped"] == 1 and status["dead_lettered"] == 1
    assert "recursive loop stopped" in case.server.output()
    wait_for(
        "both settled",
        lambda: case.nats.consumer(stream, consumer_of(fn, "loop")).num_ack_pending == 0,
    )
    assert len(records(case.server, fn)) == 1


# -- restarts ------------------------------------------------------------------------------
def test_a_broker_restart_mid_stream_loses_nothing(case: Case, tmp_path: Path) -> None:
    fn = case.name("brestart")
    subject, stream = case.subject("jobs"), f"R{case.uid}"
    case.nats.streams.append(stream)  # only on the private broker, unless something is wrong
    with nats_server(tmp_path / "nats") as broker:
        spec = {
            "type": "nats",
            "name": "jobs",
            "url": broker.url,
            "subject": subject,
            "stream": stream,
            "ack_wait": 3,
        }
        case.deploy(fn, spec)
        client = Nats(broker.url)
        try:
            for n in range(4):
                client.store(subject, {"n": n})
            client.store(subject, {"n": 4, "sleep": 2})  # in flight while the broker is down
            wait_for("the slow one", lambda: 4 in [b["n"] for b in bodies(case.server, fn)])
        finally:
            client.close()
        broker.stop()
        down = wait_state(case.server, fn, "jobs", "reconnecting")["status"]
        assert down["last_error"]

        broker.start()  # same port, same data directory
        client = Nats(broker.url)
        try:
            for n in range(5, 10):
                client.store(subject, {"n": n})  # likely before Nimbus is back
            up = wait_state(case.server, fn, "jobs", "connected", timeout=30)["status"]
            assert up["last_error"]
            wait_for(
                "every message",
                lambda: {b["n"] for b in bodies(case.server, fn)} == set(range(10)),
                timeout=30,
                server=case.server,
            )
            wait_for(
                "everything acked",
                lambda: (
                    (c := client.consumer(stream, consumer_of(fn, "jobs"))).num_ack_pending == 0
                    and c.num_pending == 0
                ),
            )
            # The one running through the restart was acked on the new connection.
            assert [b["n"] for b in bodies(case.server, fn)].count(4) == 1
        finally:
            case.remove()
            client.close()


def test_a_nimbus_restart_mid_stream_loses_nothing(case: Case, tmp_path: Path) -> None:
    fn, subject, stream = case.name("nrestart"), case.subject("work"), case.stream("work")
    data = tmp_path / "data"
    count = 8
    with running(data) as first:
        deploy_sink(
            first,
            fn,
            {
                "type": "nats",
                "name": "work",
                "url": NATS_URL,
                "subject": subject,
                "stream": stream,
                "ack_wait": 2,
            },
        )
        wait_state(first, fn, "work")
        for n in range(count):
            case.nats.store(subject, {"n": n, "sleep": 1})
        wait_records(first, fn, 3)  # two done or running, one running: killed mid-invocation
        first.stop(signal.SIGKILL)

    with running(data) as second:
        wait_for(
            "every message",
            lambda: {b["n"] for b in bodies(second, fn)} == set(range(count)),
            timeout=40,
            server=second,
        )
        wait_for(
            "everything acked",
            lambda: (
                (c := case.nats.consumer(stream, consumer_of(fn, "work"))).num_ack_pending == 0
                and c.num_pending == 0
            ),
        )
        got = records(second, fn)
        duplicates = len(got) - count
        # The message whose invocation was killed came back from JetStream. (Its first
        # delivery may be missing from the logs: they are written in batches every
        # 50 ms, and the first server was killed; so a duplicate may not show in `got`.)
        assert any(r["nimbus"]["deliveryCount"] >= 2 for r in got), got
        assert 0 <= duplicates <= 3, got  # at most what was in flight, plus one waiting
        second.client.delete(f"/v1/functions/{fn}")


def test_a_stopped_trigger_acks_what_was_running_and_hands_back_the_rest(case: Case) -> None:
    fn, subject, stream = case.name("stop"), case.subject("stop"), case.stream("stop")
    case.deploy(
        fn,
        {
            "type": "nats",
            "name": "stop",
            "subject": subject,
            "stream": stream,
            "max_concurrency": 1,
            "ack_wait": 60,  # nothing here waits for a redelivery
        },
    )
    consumer = consumer_of(fn, "stop")
    case.nats.store(subject, {"n": 0, "sleep": 2})
    case.nats.store(subject, {"n": 1})  # taken, waiting for the slot
    wait_records(case.server, fn, 1)
    wait_for("both taken", lambda: case.nats.consumer(stream, consumer).num_ack_pending == 2)

    r = case.server.client.delete(f"/v1/functions/{fn}/triggers/stop")
    assert r.status_code in (200, 204), r.text
    # The running invocation finishes and its ack still reaches the server...
    wait_for(
        "the running one acked",
        lambda: case.nats.consumer(stream, consumer).ack_floor.stream_seq == 1,
    )
    # ...and the waiting one was handed back: the next reader gets it now, not in 60 s.
    [again] = case.nats.fetch(stream, consumer, timeout=10)
    assert json.loads(again.data) == {"n": 1}
    assert again.metadata.num_delivered == 2
    assert bodies(case.server, fn) == [{"n": 0, "sleep": 2}]


# -- configuration and credentials ---------------------------------------------------------
def test_credentials_are_used_but_never_shown(case: Case, tmp_path: Path) -> None:
    secret = f"s3cret-{case.uid}"
    fn, subject = case.name("creds"), case.subject("private")
    with nats_server(tmp_path / "nats", "--user", "nimbus", "--pass", secret) as broker:
        good = f"nats://nimbus:{secret}@127.0.0.1:{broker.port}"
        bad = f"nats://nimbus:wrong-{secret}@127.0.0.1:{broker.port}"
        case.deploy(fn, {"type": "nats", "name": "ok", "url": good, "subject": subject})
        r = case.server.client.post(
            f"/v1/functions/{fn}/triggers",
            json={"type": "nats", "name": "refused", "url": bad, "subject": subject},
        )
        assert r.status_code == 201, r.text
        client = Nats(good)
        try:
            client.publish(subject, {"hello": "private"})
        finally:
            client.close()
        assert json.loads(wait_records(case.server, fn, 1)[0]["body"]) == {"hello": "private"}

        refused = wait_state(case.server, fn, "refused", "error")["status"]
        assert "refused the trigger's credentials" in refused["last_error"]
        shown = case.server.client.get(f"/v1/functions/{fn}")
        listed = case.server.client.get(f"/v1/functions/{fn}/triggers")
        for text in (shown.text, listed.text, case.server.output()):
            assert secret not in text
        assert f"nats://nimbus:***@127.0.0.1:{broker.port}" in listed.text
        assert f"nats://nimbus:***@127.0.0.1:{broker.port}" in shown.text
        case.remove()


def test_a_missing_stream_is_an_error_unless_nimbus_may_create_it(case: Case) -> None:
    fn, subject, stream = case.name("nostream"), case.subject("x"), case.stream("absent")
    spec = {"type": "nats", "name": "x", "subject": subject, "stream": stream}
    case.functions.append(fn)
    deploy_sink(case.server, fn, {**spec, "create_stream": False})
    status = wait_state(case.server, fn, "x", "error")["status"]
    assert f"stream {stream!r} does not exist" in status["last_error"]

    r = case.server.client.post(
        f"/v1/functions/{fn}/triggers",
        json={"type": "nats", "name": "y", "subject": subject, "dead_letter_subject": subject},
    )
    assert r.status_code == 400
    assert "must not be a subject the trigger itself receives" in r.json()["error"]["message"]


# -- Lambda's SQS shape --------------------------------------------------------------------
def test_sqs_consumer_code_reads_every_field_of_a_jetstream_message(case: Case) -> None:
    fn, subject, stream = case.name("sqs"), case.subject("orders"), case.stream("orders")
    case.deploy(
        fn,
        {"type": "nats", "name": "orders", "subject": subject, "stream": stream},
        fixture="sqs-consumer",
    )
    before = int(time.time() * 1000)
    sequence = case.nats.store(subject, {"order": 7}, headers={"tenant": "acme"})
    [seen] = wait_printed(case.server, fn, "SQS", 1)
    assert seen["message_id"] == str(sequence) and json.loads(seen["body"]) == {"order": 7}
    assert seen["receipt_handle"]
    assert seen["approximate_receive_count"] == 1
    assert before - 1000 <= seen["sent_timestamp"] <= seen["first_receive_timestamp"] + 1000
    assert seen["sender_id"] == "000000000000"
    assert seen["message_attributes"] == {
        "tenant": {"string_value": "acme", "binary_value": None, "data_type": "String"}
    }
    assert seen["md5_ok"] is True and seen["event_source"] == "aws:sqs"
    assert seen["event_source_arn"] == f"arn:aws:sqs:us-east-1:000000000000:{stream}"
    assert seen["aws_region"] == seen["function_region"] == "us-east-1"
    assert seen["queue_url"] == f"https://sqs.us-east-1.amazonaws.com/000000000000/{stream}"
    assert seen["nimbus"]["subject"] == subject and seen["nimbus"]["stream"] == stream


def test_a_partial_batch_response_retries_and_dead_letters_only_the_failed_messages(
    case: Case,
) -> None:
    fn, subject, stream = case.name("partial"), case.subject("work"), case.stream("work")
    dead, dead_stream = case.subject("work-dead"), f"D{case.uid}"
    case.nats.add_stream(stream, [subject])
    case.nats.add_stream(dead_stream, [dead])
    # In the stream before the consumer exists: the first fetch takes all three.
    ok_1 = case.nats.store(subject, {"n": 1})
    doomed = case.nats.store(subject, {"n": 2, "fail": True})
    ok_2 = case.nats.store(subject, {"n": 3})
    case.deploy(
        fn,
        {
            "type": "nats",
            "name": "work",
            "subject": subject,
            "stream": stream,
            "batch_size": 3,
            "batch_window": 2,
            "max_retries": 1,
            "retry_backoff": 3,
            "dead_letter_subject": dead,
        },
        fixture="sqs-consumer",
    )
    consumer = consumer_of(fn, "work")
    # The two that succeeded are acked at once; the failed one is held, alone.
    wait_for(
        "only the failed message unacknowledged",
        lambda: (
            len(printed(case.server, fn, "SQS")) == 3
            and case.nats.consumer(stream, consumer).num_ack_pending == 1
        ),
        server=case.server,
    )
    [letter] = wait_for(
        "the dead letter", lambda: case.nats.stream_messages(dead_stream), server=case.server
    )
    assert json.loads(letter.data) == {"n": 2, "fail": True}
    info = wait_for(
        "everything settled",
        lambda: (c := case.nats.consumer(stream, consumer)).num_ack_pending == 0 and c,
    )
    assert info.num_pending == 0 and info.num_redelivered == 0
    ids = [str(ok_1), str(doomed), str(ok_2)]
    seen = wait_printed(case.server, fn, "SQS", 4)
    assert [s["batch"] for s in seen] == [ids] * 3 + [[str(doomed)]]
    tries = [s["approximate_receive_count"] for s in seen if s["message_id"] == str(doomed)]
    assert tries == [1, 2]  # JetStream's one delivery, plus Nimbus's one retry
    status = wait_for(
        "the dead letter counted", lambda: (s := case.status(fn, "work"))["dead_lettered"] and s
    )
    assert (status["succeeded"], status["retried"], status["dead_lettered"]) == (2, 1, 1)


def test_core_nats_requests_are_answered_with_sqs_shaped_records(case: Case) -> None:
    fn, subject = case.name("core-sqs"), case.subject("ask.eu")
    case.deploy(fn, {"type": "nats", "name": "ask", "subject": f"{case.subject('ask')}.*"})
    reply = case.nats.request(subject, {"q": 1})
    assert reply == {"ok": True, "count": 1, "bodies": [{"q": 1}]}
    [record] = records(case.server, fn)
    queue = f"t{case.uid}-ask-any"  # the trigger's subject, as SQS allows
    assert record["eventSourceARN"] == f"arn:aws:sqs:us-east-1:000000000000:{queue}"
    assert record["nimbus"]["subject"] == subject and record["nimbus"]["request"] is True
