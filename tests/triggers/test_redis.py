"""Redis Streams triggers against a real ``nimbus up`` and real Redis servers: the
machine's (``NIMBUS_TEST_REDIS_URL``, default 127.0.0.1:6379) and private
``redis-server`` processes on free ports for restarts and passwords.

What is checked through Redis's own view of the consumer group (XPENDING, XINFO):
entries are acknowledged only after the function succeeded, the trigger reads no
more than it has room for, and entries in flight when the broker or Nimbus dies are
delivered again. Every test uses streams of its own (deleted afterwards) and
functions of its own.
"""

from __future__ import annotations

import base64
import json
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.support import NimbusServer, running
from tests.triggers.support import (
    bodies,
    deploy_sink,
    env_url,
    private_broker,
    records,
    trigger,
    wait_for,
    wait_printed,
    wait_records,
    wait_state,
)

REDIS_URL = env_url("NIMBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
REDIS_SERVER = env_url("NIMBUS_TEST_REDIS_SERVER", "redis-server")


class Scratch:
    """A test's own streams on the shared Redis, and the functions reading them:
    the functions are deleted first (so no trigger re-creates a stream), then the keys."""

    def __init__(self, db: redis.Redis) -> None:
        self.db = db
        self.keys: list[str] = []
        self.functions: list[tuple[NimbusServer, str]] = []

    def stream(self, label: str) -> str:
        name = f"nimbus-test-{label}-{uuid.uuid4().hex[:10]}"
        self.keys.append(name)
        return name

    def deploy(
        self, server: NimbusServer, name: str, *triggers: dict[str, Any], **spec: Any
    ) -> None:
        deploy_sink(server, name, *triggers, **spec)
        self.functions.append((server, name))

    def close(self) -> None:
        for server, name in self.functions:
            if server.proc is not None and server.proc.poll() is None:
                server.client.delete(f"/v1/functions/{name}")
        if self.keys:
            self.db.delete(*self.keys)
        self.db.close()


@pytest.fixture
def scratch() -> Iterator[Scratch]:
    s = Scratch(redis.Redis.from_url(REDIS_URL))
    try:
        yield s
    finally:
        s.close()


def on(stream: str, name: str = "orders", url: str = REDIS_URL, **fields: Any) -> dict[str, Any]:
    """A redis trigger spec."""
    return {"type": "redis", "name": name, "url": url, "stream": stream, **fields}


def group_of(function: str, trigger_name: str = "orders") -> str:
    return f"nimbus-{function}-{trigger_name}"


def consumer_of(function: str, trigger_name: str = "orders") -> str:
    return f"{socket.gethostname()}-{group_of(function, trigger_name)}"


def publish(db: redis.Redis, stream: str, body: Any, **fields: Any) -> str:
    entry_id = db.xadd(stream, {"body": json.dumps(body), **fields})
    return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)


def pending(db: redis.Redis, stream: str, group: str) -> int:
    return int(db.xpending(stream, group)["pending"])


def wait_nothing_pending(db: redis.Redis, stream: str, group: str) -> None:
    wait_for(f"no entry pending in {group}", lambda: pending(db, stream, group) == 0)


def redis_server(directory: Path, *extra: str) -> Callable[[int], list[str]]:
    """A private redis-server whose stream survives a restart: every write is in the
    append-only file, fsynced before Redis answers (nothing acknowledged is lost)."""

    def argv(port: int) -> list[str]:
        return [
            REDIS_SERVER,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(directory),
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
            "--save",
            "",
            *extra,
        ]

    return argv


def test_entries_are_delivered_with_their_stream_metadata(
    server: NimbusServer, scratch: Scratch
) -> None:
    db = scratch.db
    stream = scratch.stream("basic")
    earlier = publish(db, stream, {"n": 0})  # before the group exists: start_from beginning
    scratch.deploy(server, "redis-basic", on(stream, start_from="beginning"))
    wait_state(server, "redis-basic", "orders")
    with_body = publish(db, stream, {"n": 1}, source="test", **{"nimbus-depth": "2"})
    without_body = db.xadd(stream, {"customer": "ada", "amount": "12"}).decode()
    binary = db.xadd(stream, {"kind": "blob", "blob": b"\xff\xfe\x00"}).decode()
    got = {r["messageId"]: r for r in wait_records(server, "redis-basic", 4)}

    assert set(got) == {earlier, with_body, without_body, binary}
    first = got[with_body]
    # Lambda's SQS record, the queue being the stream ...
    assert first["eventSource"] == "aws:sqs"
    assert first["eventSourceARN"] == f"arn:aws:sqs:us-east-1:000000000000:{stream}"
    assert first["attributes"]["ApproximateReceiveCount"] == "1"
    assert first["attributes"]["SentTimestamp"] == with_body.split("-")[0]
    assert json.loads(first["body"]) == {"n": 1}
    # ... the fields but the body as its attributes ...
    assert first["messageAttributes"] == {
        name: {
            "stringValue": value,
            "binaryValue": None,
            "stringListValues": [],
            "binaryListValues": [],
            "dataType": "String",
        }
        for name, value in (("source", "test"), ("nimbus-depth", "2"))
    }
    # ... and Redis's own view under "nimbus".
    meta = first["nimbus"]
    assert meta["stream"] == stream
    assert meta["group"] == group_of("redis-basic")
    assert meta["consumer"] == consumer_of("redis-basic")
    assert meta["deliveryCount"] == 1
    assert meta["fields"] == {"body": '{"n": 1}', "source": "test", "nimbus-depth": "2"}
    assert meta["depth"] == 3  # what the function should pass on: depth + 1
    # No "body" field: the body is the JSON of all the fields.
    assert json.loads(got[without_body]["body"]) == {"customer": "ada", "amount": "12"}
    assert set(got[without_body]["messageAttributes"]) == {"customer", "amount"}
    assert got[without_body]["nimbus"]["depth"] == 1
    # A value that is not text is base64, and named as such.
    blob = got[binary]["messageAttributes"]["blob"]
    assert blob["dataType"] == "Binary" and blob["stringValue"] is None
    assert base64.b64decode(blob["binaryValue"]) == b"\xff\xfe\x00"
    assert got[binary]["nimbus"]["binaryFields"] == ["blob"]
    assert base64.b64decode(got[binary]["nimbus"]["fields"]["blob"]) == b"\xff\xfe\x00"
    assert got[binary]["nimbus"]["fields"]["kind"] == "blob"
    assert "binaryFields" not in got[without_body]["nimbus"]

    wait_nothing_pending(db, stream, group_of("redis-basic"))
    consumers = db.xinfo_consumers(stream, group_of("redis-basic"))
    assert [c["name"].decode() for c in consumers] == [consumer_of("redis-basic")]
    shown = trigger(server, "redis-basic", "orders")
    assert shown["status"]["succeeded"] == 4


def test_each_trigger_gets_only_the_entries_of_its_own_stream(
    server: NimbusServer, scratch: Scratch
) -> None:
    """Redis has no wildcards in stream names: a trigger names one stream, and a
    function that wants several has a trigger for each. Two triggers of one function
    on two streams each get their own stream's entries, and only those."""
    db = scratch.db
    red, blue = scratch.stream("red"), scratch.stream("blue")
    scratch.deploy(server, "redis-routes", on(red, name="red"), on(blue, name="blue"))
    wait_state(server, "redis-routes", "red")
    wait_state(server, "redis-routes", "blue")
    for i in range(3):
        publish(db, red, {"colour": "red", "i": i})
        publish(db, blue, {"colour": "blue", "i": i})
    got = wait_records(server, "redis-routes", 6)
    time.sleep(0.5)  # and nothing more comes
    assert len(records(server, "redis-routes")) == 6
    for record in got:
        colour = json.loads(record["body"])["colour"]
        assert record["nimbus"]["stream"] == (red if colour == "red" else blue)
        assert record["eventSourceARN"].endswith(f":{red if colour == 'red' else blue}")
        assert record["nimbus"]["trigger"] == colour
    assert sorted(json.loads(r["body"])["i"] for r in got) == [0, 0, 1, 1, 2, 2]


def test_groups_fan_out_and_consumers_of_one_group_share(
    server: NimbusServer, scratch: Scratch
) -> None:
    """A stream's entries go to every consumer group: two functions, each with its
    own (default) group, both get every entry. Within one group each entry goes to
    one consumer: two functions naming the same ``group`` split the entries."""
    db = scratch.db
    stream = scratch.stream("fan")
    shared = f"shared-{uuid.uuid4().hex[:8]}"
    one_at_a_time = {"max_concurrency": 1}
    for name in ("redis-fan-1", "redis-fan-2"):
        scratch.deploy(server, name, on(stream, **one_at_a_time))
    for name in ("redis-share-1", "redis-share-2"):
        scratch.deploy(server, name, on(stream, group=shared, **one_at_a_time))
    for name in ("redis-fan-1", "redis-fan-2", "redis-share-1", "redis-share-2"):
        wait_state(server, name, "orders")
    # Each takes a while, so that one busy sharer leaves entries to the other.
    for i in range(6):
        publish(db, stream, {"i": i, "sleep": 0.3})

    for name in ("redis-fan-1", "redis-fan-2"):
        wait_records(server, name, 6)
        assert sorted(b["i"] for b in bodies(server, name)) == list(range(6))

    def shared_bodies() -> list[int]:
        return [b["i"] for n in ("redis-share-1", "redis-share-2") for b in bodies(server, n)]

    wait_for("the sharers to get every entry", lambda: len(shared_bodies()) >= 6, server=server)
    wait_nothing_pending(db, stream, shared)
    assert sorted(shared_bodies()) == list(range(6))  # each entry once, to one of them
    assert records(server, "redis-share-1") and records(server, "redis-share-2")
    consumers = {c["name"].decode() for c in db.xinfo_consumers(stream, shared)}
    assert consumers == {consumer_of("redis-share-1"), consumer_of("redis-share-2")}


def test_an_entry_stays_pending_while_its_function_fails_and_is_acked_after_success(
    server: NimbusServer, scratch: Scratch
) -> None:
    """Ack after success, and redelivery after a function error: the entry is
    delivered again (same id) until the function succeeds, pending all along."""
    db = scratch.db
    stream = scratch.stream("retry")
    group = group_of("redis-retry")
    scratch.deploy(server, "redis-retry", on(stream, max_retries=5, retry_backoff=0.5))
    wait_state(server, "redis-retry", "orders")
    # Tries at 0, 0.5, 1.5 and 3.5 s: the fourth succeeds.
    entry = publish(db, stream, {"fail_until": time.time() + 3})

    wait_records(server, "redis-retry", 2)  # it failed at least once
    still = db.xpending_range(stream, group, min="-", max="+", count=10)
    assert [(p["message_id"].decode(), p["consumer"].decode()) for p in still] == [
        (entry, consumer_of("redis-retry"))
    ]
    assert trigger(server, "redis-retry", "orders")["status"]["succeeded"] == 0

    wait_for(
        "the entry to succeed",
        lambda: trigger(server, "redis-retry", "orders")["status"]["succeeded"] == 1,
        server=server,
    )
    wait_nothing_pending(db, stream, group)
    got = records(server, "redis-retry")
    assert len(got) >= 3 and {r["messageId"] for r in got} == {entry}
    status = trigger(server, "redis-retry", "orders")["status"]
    assert status["retried"] == len(got) - 1 and status["dead_lettered"] == 0


def test_an_entry_that_fails_every_retry_goes_to_the_dead_letter_stream(
    server: NimbusServer, scratch: Scratch
) -> None:
    db = scratch.db
    stream, dead = scratch.stream("doomed"), scratch.stream("doomed-dlq")
    scratch.deploy(
        server,
        "redis-dlq",
        on(stream, dead_letter_stream=dead, max_retries=1, retry_backoff=0.1),
    )
    wait_state(server, "redis-dlq", "orders")
    entry = publish(db, stream, {"fail": True}, order="42")

    wait_for("a dead-lettered entry", lambda: db.xlen(dead) == 1, server=server)
    [(_, fields)] = db.xrange(dead)
    fields = {k.decode(): v.decode() for k, v in fields.items()}
    assert json.loads(fields["body"]) == {"fail": True} and fields["order"] == "42"
    assert fields["nimbus-source-stream"] == stream
    assert fields["nimbus-source-id"] == entry
    assert fields["nimbus-source-group"] == group_of("redis-dlq")
    assert fields["nimbus-function"] == "redis-dlq"
    assert fields["nimbus-trigger"] == "orders"
    # Moved and acked in one transaction: nothing is left pending on the source.
    assert pending(db, stream, group_of("redis-dlq")) == 0
    assert len(records(server, "redis-dlq")) == 2  # the try and its one retry
    status = trigger(server, "redis-dlq", "orders")["status"]
    assert status["dead_lettered"] == 1 and status["retried"] == 1


def test_without_a_dead_letter_stream_the_functions_destination_takes_it(
    server: NimbusServer, scratch: Scratch
) -> None:
    db = scratch.db
    stream = scratch.stream("to-dest")
    r = server.deploy("async-sink", name="redis-dest")
    assert r.status_code == 201, r.text
    scratch.functions.append((server, "redis-dest"))
    scratch.deploy(
        server,
        "redis-failing",
        on(stream, max_retries=1, retry_backoff=0.1),
        **{"async": {"dead_letter": "function:redis-dest"}},
    )
    wait_state(server, "redis-failing", "orders")
    entry = publish(db, stream, {"fail": True})

    def dead_lettered() -> list[dict[str, Any]]:
        r = server.client.get("/v1/invocations", params={"function": "redis-dest"})
        return [i for i in r.json()["invocations"] if i["status"] == "succeeded"]

    done = wait_for("the dead-letter record", dead_lettered, server=server)
    result = server.client.get(f"/v1/invocations/{done[0]['id']}").json()["result"]
    assert result["requestContext"]["condition"] == "RetriesExhausted"
    assert result["requestPayload"]["Records"][0]["messageId"] == entry
    # Handed to the destination, then acknowledged.
    wait_nothing_pending(db, stream, group_of("redis-failing"))


def test_a_slow_function_leaves_the_rest_of_the_stream_in_redis(
    server: NimbusServer, scratch: Scratch
) -> None:
    """Back-pressure: with room for one entry at a time, the trigger never has more
    than one entry pending, and the rest stay undelivered to the group (its lag)."""
    db = scratch.db
    stream = scratch.stream("slow")
    group = group_of("redis-slow")
    scratch.deploy(server, "redis-slow", on(stream, max_concurrency=1))
    wait_state(server, "redis-slow", "orders")
    for i in range(5):
        publish(db, stream, {"i": i, "sleep": 0.6})

    most_pending, most_lag = 0, 0
    deadline = time.monotonic() + 30
    while len(records(server, "redis-slow")) < 5 or pending(db, stream, group):
        assert time.monotonic() < deadline, "the slow entries did not all arrive"
        [info] = [g for g in db.xinfo_groups(stream) if g["name"].decode() == group]
        most_pending = max(most_pending, int(info["pending"]))
        most_lag = max(most_lag, int(info["lag"] or 0))
        assert trigger(server, "redis-slow", "orders")["status"]["in_flight"] <= 1
        time.sleep(0.1)
    assert most_pending == 1  # Nimbus held one entry at a time
    assert most_lag >= 3  # while the rest waited in Redis
    assert [b["i"] for b in bodies(server, "redis-slow")] == list(range(5))


def test_a_redis_restart_mid_stream_loses_nothing(tmp_path: Path, server: NimbusServer) -> None:
    with private_broker(tmp_path / "redis", redis_server(tmp_path / "redis"), "redis") as broker:
        url = f"{broker.url}/0"
        stream = "orders"
        deploy_sink(
            server, "redis-broker-restart", on(stream, url=url, max_concurrency=2, claim_idle=2)
        )
        try:
            wait_state(server, "redis-broker-restart", "orders")
            db = redis.Redis.from_url(url)
            for i in range(4):
                publish(db, stream, {"i": i, "sleep": 0.5})
            db.close()
            wait_records(server, "redis-broker-restart", 1)
            broker.stop(signal.SIGKILL)  # some entries in flight, some not yet read
            wait_state(server, "redis-broker-restart", "orders", "reconnecting")
            broker.start()
            status = wait_state(server, "redis-broker-restart", "orders", timeout=30)["status"]
            assert status["last_error"]
            db = redis.Redis.from_url(url)
            for i in range(4, 8):
                publish(db, stream, {"i": i})

            def received() -> set[int]:
                return {b["i"] for b in bodies(server, "redis-broker-restart")}

            wait_for("every entry", lambda: received() == set(range(8)), server=server)
            wait_nothing_pending(db, stream, group_of("redis-broker-restart"))
            db.close()
        finally:
            server.client.delete("/v1/functions/redis-broker-restart")


def test_a_nimbus_restart_mid_stream_loses_nothing(tmp_path: Path, scratch: Scratch) -> None:
    """Nimbus is killed with entries in flight; the next Nimbus on this node is the
    same consumer, so it starts by re-reading that consumer's pending entries."""
    db = scratch.db
    stream = scratch.stream("restart")
    group = group_of("redis-restart")
    data = tmp_path / "data"
    count = 8
    seen: set[str] = set()

    def keep(got: list[dict[str, Any]]) -> None:
        seen.update(json.dumps(r, sort_keys=True) for r in got)

    with running(data) as first:
        deploy_sink(first, "redis-restart", on(stream, max_concurrency=2))
        wait_state(first, "redis-restart", "orders")
        for i in range(count):
            publish(db, stream, {"i": i, "sleep": 1})
        wait_records(first, "redis-restart", 2)
        wait_for("an entry in flight", lambda: pending(db, stream, group) > 0)
        # Taken just before the kill: a function that printed after this is still
        # in its one-second sleep when Nimbus dies, so it cannot have been acked.
        keep(records(first, "redis-restart"))
        first.stop(signal.SIGKILL)
    in_flight = pending(db, stream, group)
    assert 1 <= in_flight <= 2  # never more than the trigger had room for

    with running(data) as second:

        def received() -> set[int]:
            return {json.loads(json.loads(r)["body"])["i"] for r in seen}

        def everything() -> bool:
            keep(records(second, "redis-restart"))
            return received() == set(range(count))

        wait_for("every entry", everything, timeout=30, server=second)
        wait_nothing_pending(db, stream, group)
        got = [json.loads(r) for r in seen]
        duplicates = len(got) - count
        assert duplicates <= in_flight, got
        again = [r for r in got if r["nimbus"]["deliveryCount"] > 1]
        assert len(again) >= 1  # the pending entries, re-read by the same consumer
        consumers = [c["name"].decode() for c in db.xinfo_consumers(stream, group)]
        assert consumers == [consumer_of("redis-restart")]


def test_a_password_in_the_url_works_and_is_never_shown(
    tmp_path: Path, server: NimbusServer
) -> None:
    password = f"secret{uuid.uuid4().hex[:8]}"
    wrong = f"wrong{uuid.uuid4().hex[:8]}"
    argv = redis_server(tmp_path / "redis", "--requirepass", password)
    with private_broker(tmp_path / "redis", argv, "redis") as broker:
        url = f"redis://:{password}@127.0.0.1:{broker.port}/0"
        bad = f"redis://:{wrong}@127.0.0.1:{broker.port}/0"
        deploy_sink(server, "redis-auth", on("orders", url=url), on("other", name="wrong", url=bad))
        try:
            wait_state(server, "redis-auth", "orders")
            db = redis.Redis.from_url(url)
            entry = publish(db, "orders", {"hello": "auth"})
            db.close()
            assert wait_records(server, "redis-auth", 1)[0]["messageId"] == entry

            refused = wait_state(server, "redis-auth", "wrong", "error")["status"]
            assert "authentication" in refused["last_error"]
            shown = [
                server.client.get("/v1/functions/redis-auth").text,
                server.client.get("/v1/functions/redis-auth/triggers").text,
                server.client.get("/v1/functions").text,
                server.output(),
            ]
            for text in shown:
                assert password not in text and wrong not in text
            assert trigger(server, "redis-auth", "orders")["url"] == (
                f"redis://:***@127.0.0.1:{broker.port}/0"
            )
        finally:
            server.client.delete("/v1/functions/redis-auth")


# -- Lambda's SQS shape ------------------------------------------------------------------
def test_sqs_consumer_code_reads_every_field_of_an_entry(tmp_path: Path, scratch: Scratch) -> None:
    """SQS consumer code, unmodified, on a Redis stream, with the region and account
    the server was started with in the records' ARNs."""
    db = scratch.db
    stream = scratch.stream("sqs")
    env = {"NIMBUS_REGION": "eu-central-1", "NIMBUS_ACCOUNT_ID": "111122223333"}
    with running(tmp_path / "data", env=env) as own:
        r = own.deploy("sqs-consumer", name="redis-sqs", triggers=[on(stream)])
        assert r.status_code == 201, r.text
        wait_state(own, "redis-sqs", "orders")
        entry = publish(db, stream, {"order": 7}, k="v", blob=b"\x00\xff")
        [seen] = wait_printed(own, "redis-sqs", "SQS", 1)
        wait_nothing_pending(db, stream, group_of("redis-sqs"))
    assert seen["message_id"] == entry and json.loads(seen["body"]) == {"order": 7}
    assert seen["receipt_handle"]
    assert seen["approximate_receive_count"] == 1
    assert seen["sent_timestamp"] == int(entry.split("-")[0])
    assert seen["first_receive_timestamp"] >= seen["sent_timestamp"]
    assert seen["sender_id"] == "111122223333" and seen["message_group_id"] is None
    assert seen["message_attributes"] == {
        "k": {"string_value": "v", "binary_value": None, "data_type": "String"},
        "blob": {"string_value": None, "binary_value": "00ff", "data_type": "Binary"},
    }
    assert seen["md5_ok"] is True
    assert seen["event_source"] == "aws:sqs"
    assert seen["event_source_arn"] == f"arn:aws:sqs:eu-central-1:111122223333:{stream}"
    assert seen["aws_region"] == seen["function_region"] == "eu-central-1"
    assert seen["queue_url"] == f"https://sqs.eu-central-1.amazonaws.com/111122223333/{stream}"
    assert seen["nimbus"]["stream"] == stream and seen["nimbus"]["depth"] == 1


def test_a_partial_batch_response_retries_and_dead_letters_only_the_failed_entries(
    server: NimbusServer, scratch: Scratch
) -> None:
    db = scratch.db
    stream, dead = scratch.stream("partial"), scratch.stream("partial-dlq")
    group = group_of("redis-partial")
    spec = on(
        stream,
        batch_size=3,
        batch_window=2,
        max_retries=1,
        retry_backoff=3,
        dead_letter_stream=dead,
    )
    r = server.deploy("sqs-consumer", name="redis-partial", triggers=[spec])
    assert r.status_code == 201, r.text
    scratch.functions.append((server, "redis-partial"))
    wait_state(server, "redis-partial", "orders")
    with db.pipeline(transaction=True) as pipe:  # all three at once: one batch
        for body in ({"n": 1}, {"n": 2, "fail": True}, {"n": 3}):
            pipe.xadd(stream, {"body": json.dumps(body)})
        ok_1, doomed, ok_2 = (i.decode() for i in pipe.execute())

    # The two that succeeded are acked at once; the failed one stays pending, alone,
    # while it waits for its retry.
    wait_for(
        "only the failed entry pending",
        lambda: (
            [p["message_id"].decode() for p in db.xpending_range(stream, group, "-", "+", 10)]
            == [doomed]
        ),
        server=server,
    )
    wait_for("the dead letter", lambda: db.xlen(dead) == 1, server=server)
    [(_, fields)] = db.xrange(dead)
    assert json.loads(fields[b"body"]) == {"n": 2, "fail": True}
    assert fields[b"nimbus-source-id"].decode() == doomed
    wait_nothing_pending(db, stream, group)

    seen = wait_printed(server, "redis-partial", "SQS", 4)
    assert [s["batch"] for s in seen] == [[ok_1, doomed, ok_2]] * 3 + [[doomed]]
    assert [s["message_id"] for s in seen].count(ok_1) == 1
    assert [s["message_id"] for s in seen].count(ok_2) == 1
    tries = [s["approximate_receive_count"] for s in seen if s["message_id"] == doomed]
    assert tries == [1, 2]  # Redis's one delivery, plus Nimbus's one retry
    receipts = {s["receipt_handle"] for s in seen if s["message_id"] == doomed}
    assert len(receipts) == 2
    status = wait_for(
        "the dead letter counted",
        lambda: (s := trigger(server, "redis-partial", "orders")["status"])["dead_lettered"] and s,
    )
    assert status["succeeded"] == 2 and status["retried"] == 1
    assert status["failed"] == 1 and status["dead_lettered"] == 1


def test_the_native_shape_is_still_there(server: NimbusServer, scratch: Scratch) -> None:
    db = scratch.db
    stream = scratch.stream("native")
    scratch.deploy(server, "redis-native", on(stream, shape="native"))
    wait_state(server, "redis-native", "orders")
    entry = publish(db, stream, {"n": 1}, source="test")
    [record] = wait_records(server, "redis-native", 1)
    assert record["eventSource"] == "nimbus:redis"
    assert record["eventSourceArn"] == "nimbus:redis:redis-native:orders"
    assert record["messageId"] == entry and record["stream"] == stream
    assert record["fields"] == {"body": '{"n": 1}', "source": "test"}
    assert record["deliveryCount"] == 1 and record["nimbusDepth"] == 1
    assert "nimbus" not in record
