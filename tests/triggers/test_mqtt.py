"""MQTT triggers against a real ``nimbus up`` and real Mosquitto brokers: events as an
AWS IoT rule passes them (the payload's JSON object; other payloads base64 under
``data``; the topic where ``topic_field`` says), read by code written for IoT rules,
request-response with them; and, with ``shape: native`` records: delivery with
the record's metadata (MQTT 5 user properties, retain, QoS 0, request-response),
wildcard filters, acknowledgement only after success (seen in the broker's own log),
retries after a function error, dead-lettering, back-pressure, a broker restart and
a Nimbus restart (SIGKILL) with nothing lost, a clean stop that acks what was running
first, and credentials never shown.

Tests that look at what the broker saw (PUBLISH sent to Nimbus's client, PUBACK
received from it) or restart it run a private Mosquitto on a free port, logging every
packet to a file; the others use the shared one (``NIMBUS_TEST_MQTT_URL``) with topics
and client ids of their own, and forget their sessions afterwards.
"""

from __future__ import annotations

import base64
import getpass
import json
import os
import re
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.support import NimbusServer, running
from tests.triggers.support import (
    PrivateBroker,
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

SHARED = env_url("NIMBUS_TEST_MQTT_URL", "mqtt://127.0.0.1:1883")
MOSQUITTO = os.environ.get("NIMBUS_TEST_MOSQUITTO", "/usr/sbin/mosquitto")
MOSQUITTO_PASSWD = os.environ.get("NIMBUS_TEST_MOSQUITTO_PASSWD", "/usr/bin/mosquitto_passwd")


# -- brokers and clients ---------------------------------------------------------------
def mosquitto(directory: Path, *extra: str) -> Callable[[int], list[str]]:
    """A private Mosquitto: persistent (sessions survive a restart), every packet logged
    to ``mosquitto.log`` (flushed line by line, unlike its stdout)."""

    def argv(port: int) -> list[str]:
        lines = [
            f"listener {port} 127.0.0.1",
            "persistence true",
            f"persistence_location {directory}/",
            f"log_dest file {directory}/mosquitto.log",
            "log_type all",
            f"user {getpass.getuser()}",  # as root, keep root: the data dir is ours
            *(extra or ("allow_anonymous true",)),
        ]
        conf = directory / "mosquitto.conf"
        conf.write_text("\n".join(lines) + "\n")
        return [MOSQUITTO, "-c", str(conf)]

    return argv


def broker_log(broker: PrivateBroker) -> str:
    return (broker.directory / "mosquitto.log").read_text(errors="replace")


SENT = re.compile(r"Sending PUBLISH to (\S+) \(d\d, q\d, r\d, m(\d+),")
ACKED = re.compile(r"Received PUBACK from (\S+) \(Mid: (\d+),")
PUBLISHED = re.compile(r"Received PUBLISH from (\S+) ")


def packets(log: str, client_id: str) -> list[tuple[str, int]]:
    """What the broker logged of ``client_id``, in order: ("sent"|"acked", packet id)."""
    out = []
    for line in log.splitlines():
        if (m := SENT.search(line)) and m[1] == client_id:
            out.append(("sent", int(m[2])))
        elif (m := ACKED.search(line)) and m[1] == client_id:
            out.append(("acked", int(m[2])))
    return out


class Mqtt:
    """The test's own MQTT 5 client: publishes (QoS 1: returns once the broker has the
    message) and collects what its subscriptions receive."""

    def __init__(self, url: str, client_id: str | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 1883
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id or f"test-{uuid.uuid4().hex[:8]}",
            protocol=paho.MQTTv5,
        )
        if parts.username:
            self.client.username_pw_set(parts.username, parts.password)
        self.received: list[paho.MQTTMessage] = []
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client.on_connect = lambda *_: self._connected.set()
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = lambda _c, _u, message: self.received.append(message)

    def __enter__(self) -> Mqtt:
        self.client.connect(self.host, self.port)
        self.client.loop_start()
        assert self._connected.wait(10), "the test client could not connect"
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def publish(
        self,
        topic: str,
        body: Any,
        *,
        qos: int = 1,
        retain: bool = False,
        headers: dict[str, str] | None = None,
        **properties: Any,
    ) -> None:
        payload = body if isinstance(body, bytes | str) else json.dumps(body)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        if headers:
            props.UserProperty = list(headers.items())
        for name, value in properties.items():
            setattr(props, name, value)
        info = self.client.publish(topic, payload, qos, retain, props)
        info.wait_for_publish(10)
        assert info.is_published(), f"publishing to {topic} failed: {info.rc}"

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, 1)
        assert self._subscribed.wait(10)

    def wait_received(self, count: int) -> list[paho.MQTTMessage]:
        return list(
            wait_for(
                f"{count} messages at the test client",
                lambda: self.received if len(self.received) >= count else None,
            )
        )


def forget_session(url: str, client_id: str) -> None:
    """End a persistent session on the shared broker: connect with a clean start and
    no expiry, then leave."""
    client = Mqtt(url, client_id)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = 0
    client.client.connect(client.host, client.port, clean_start=True, properties=props)
    client.client.loop_start()
    try:
        client._connected.wait(10)
    finally:
        client.client.disconnect()
        client.client.loop_stop()


def mqtt(url: str, topic: str, name: str = "in", **fields: Any) -> dict[str, Any]:
    """An mqtt trigger spec; Nimbus's own records unless ``shape`` says otherwise (the
    sink reads ``Records``)."""
    return {"type": "mqtt", "name": name, "url": url, "topic": topic, "shape": "native", **fields}


def status(server: NimbusServer, function: str, name: str = "in") -> dict[str, Any]:
    return dict(trigger(server, function, name)["status"])


@pytest.fixture
def sink(server: NimbusServer) -> Iterator[Callable[..., str]]:
    """Deploy the sink under a name of this run's own (its triggers connected); deleted
    afterwards, with its sessions on the shared broker."""
    made: list[tuple[str, tuple[dict[str, Any], ...]]] = []

    def deploy(prefix: str, *triggers: dict[str, Any], connect: bool = True, **spec: Any) -> str:
        name = f"{prefix}-{uuid.uuid4().hex[:6]}"
        deploy_sink(server, name, *triggers, **spec)
        made.append((name, triggers))
        for t in triggers if connect else ():
            wait_state(server, name, t["name"])
        return name

    yield deploy
    for name, triggers in made:
        server.client.delete(f"/v1/functions/{name}")
        for t in triggers:
            if t["url"] == SHARED:
                forget_session(SHARED, t.get("client_id") or f"nimbus-{name}-{t['name']}")


@pytest.fixture
def base() -> str:
    """A topic prefix of this test's own."""
    return f"nimbus-test/{uuid.uuid4().hex[:10]}"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    with private_broker(tmp_path / "mosquitto", mosquitto(tmp_path / "mosquitto"), "mqtt") as b:
        yield b


# -- AWS IoT's shape ----------------------------------------------------------------------
def test_code_written_for_an_iot_rule_gets_the_payload_itself(
    server: NimbusServer, sink: Callable[..., str], base: str
) -> None:
    name = sink(
        "mqtt-iot",
        {"type": "mqtt", "name": "in", "url": SHARED, "topic": f"{base}/plain"},
        {
            "type": "mqtt",
            "name": "topic",
            "url": SHARED,
            "topic": f"{base}/with-topic/+",
            "topic_field": "source_topic",
        },
        fixture="iot-consumer",
    )
    with Mqtt(SHARED) as client:
        client.publish(f"{base}/plain", {"temperature": 21.5, "device": "d-1"})
        client.publish(f"{base}/plain", b"\xff\x00 binary")
        client.publish(f"{base}/plain", [1, 2])
        client.publish(f"{base}/with-topic/d-2", {"temperature": 19})
        client.publish(f"{base}/with-topic/d-3", b"\x01")
        got = wait_printed(server, name, "IOT", 5)
    # The JSON object as is (SELECT * FROM ...): nothing added to it.
    assert {"temperature": 21.5, "device": "d-1"} in got
    # Not a JSON object: base64 under "data", as SELECT encode(*, 'base64') AS data.
    assert {"data": base64.b64encode(b"\xff\x00 binary").decode()} in got
    assert {"data": base64.b64encode(b"[1, 2]").decode()} in got
    # topic_field: SELECT *, topic() AS source_topic.
    assert {"temperature": 19, "source_topic": f"{base}/with-topic/d-2"} in got
    assert {"data": "AQ==", "source_topic": f"{base}/with-topic/d-3"} in got
    for trigger_name in ("in", "topic"):
        wait_for(
            f"every message of {trigger_name} acked",
            lambda n=trigger_name: (
                (st := status(server, name, n))["succeeded"] == st["received"] > 0
            ),
            server=server,
        )


def test_an_iot_shaped_request_gets_the_functions_result(
    server: NimbusServer, sink: Callable[..., str], base: str
) -> None:
    name = sink(
        "mqtt-iot-rpc",
        {"type": "mqtt", "name": "in", "url": SHARED, "topic": f"{base}/requests"},
        fixture="iot-consumer",
    )
    with Mqtt(SHARED) as client:
        client.subscribe(f"{base}/replies")
        client.publish(
            f"{base}/requests",
            {"temperature": 30},
            ResponseTopic=f"{base}/replies",
            CorrelationData=b"req-9",
        )
        reply = client.wait_received(1)[0]
    assert json.loads(reply.payload) == {"temperature": 30, "keys": ["temperature"]}
    assert getattr(reply.properties, "CorrelationData", None) == b"req-9"
    assert wait_printed(server, name, "IOT", 1) == [{"temperature": 30}]


def test_an_iot_shaped_failure_is_retried_then_dead_lettered(
    server: NimbusServer, sink: Callable[..., str], broker: PrivateBroker, base: str
) -> None:
    with Mqtt(broker.url) as client:
        client.subscribe(f"{base}/dead")
        name = sink(
            "mqtt-iot-dlq",
            {
                "type": "mqtt",
                "name": "in",
                "url": broker.url,
                "topic": f"{base}/in",
                "dead_letter_topic": f"{base}/dead",
                "max_retries": 1,
                "retry_backoff": 0.1,
            },
            fixture="iot-consumer",
        )
        client.publish(f"{base}/in", {"fail": True})
        dead = client.wait_received(1)[0]
    assert json.loads(dead.payload) == {"fail": True}
    assert wait_printed(server, name, "IOT", 2) == [{"fail": True}] * 2  # a try, a retry
    st = wait_for(
        "the dead letter counted",
        lambda: s if (s := status(server, name))["dead_lettered"] == 1 else None,
        server=server,
    )
    assert (st["failed"], st["retried"]) == (1, 1)


# -- delivery --------------------------------------------------------------------------
def test_delivery_records_topic_qos_retain_headers_and_depth(
    server: NimbusServer, sink: Callable[..., str], base: str
) -> None:
    with Mqtt(SHARED) as client:
        # Published before the trigger exists: a new subscription gets it, retained.
        client.publish(f"{base}/retained", {"n": "retained"}, retain=True)
        try:
            name = sink("mqtt-basic", mqtt(SHARED, f"{base}/#"))
            client.publish(
                f"{base}/a",
                {"n": "headers"},
                headers={"trace": "abc", "nimbus-depth": "3"},
                ContentType="application/json",
            )
            client.publish(f"{base}/b", b"\xff\xfe binary")
            client.publish(f"{base}/c", {"n": "qos0"}, qos=0)
            got = wait_records(server, name, 4)
            wait_for("4 successes", lambda: status(server, name)["succeeded"] == 4, server=server)
        finally:
            client.publish(f"{base}/retained", b"", retain=True)  # clear it
    by_topic = {r["topic"]: r for r in got}
    assert set(by_topic) == {f"{base}/{t}" for t in ("retained", "a", "b", "c")}, got

    retained = by_topic[f"{base}/retained"]
    assert retained["retain"] is True and json.loads(retained["body"]) == {"n": "retained"}

    headers = by_topic[f"{base}/a"]
    assert headers["eventSource"] == "nimbus:mqtt"
    assert headers["eventSourceArn"] == f"nimbus:mqtt:{name}:in"
    assert headers["messageId"].isdigit()  # the MQTT packet id
    assert headers["qos"] == 1 and headers["retain"] is False and headers["duplicate"] is False
    assert headers["headers"] == {"trace": "abc", "nimbus-depth": "3"}
    assert headers["contentType"] == "application/json"
    assert headers["nimbusDepth"] == 4  # what the function should pass on: one deeper

    binary = by_topic[f"{base}/b"]
    assert binary["bodyEncoding"] == "base64" and binary["headers"] == {}
    assert binary["nimbusDepth"] == 1

    assert by_topic[f"{base}/c"]["qos"] == 0


def test_a_request_with_a_response_topic_gets_the_result(
    server: NimbusServer, sink: Callable[..., str], base: str
) -> None:
    name = sink("mqtt-rpc", mqtt(SHARED, f"{base}/requests"))
    with Mqtt(SHARED) as client:
        client.subscribe(f"{base}/replies")
        client.publish(
            f"{base}/requests",
            {"question": 42},
            ResponseTopic=f"{base}/replies",
            CorrelationData=b"req-1",
        )
        reply = client.wait_received(1)[0]
    assert json.loads(reply.payload) == {"ok": True, "count": 1, "bodies": [{"question": 42}]}
    assert getattr(reply.properties, "CorrelationData", None) == b"req-1"
    assert records(server, name)[0]["responseTopic"] == f"{base}/replies"


def test_wildcard_filters_route_by_topic(
    server: NimbusServer, sink: Callable[..., str], base: str
) -> None:
    name = sink(
        "mqtt-wild",
        mqtt(SHARED, f"{base}/sensors/+/temp", name="plus"),
        mqtt(SHARED, f"{base}/sensors/#", name="hash"),
    )
    with Mqtt(SHARED) as client:
        for topic in ("sensors/a/temp", "sensors/b/humidity", "sensors/a/b/temp", "other/a/temp"):
            client.publish(f"{base}/{topic}", {"topic": topic})
    wait_records(server, name, 4)
    time.sleep(0.5)  # nothing more comes
    got: dict[str, set[str]] = {"plus": set(), "hash": set()}
    for record in records(server, name):
        got[record["eventSourceArn"].rsplit(":", 1)[1]].add(record["topic"])
    assert got == {
        "plus": {f"{base}/sensors/a/temp"},
        "hash": {f"{base}/sensors/{t}" for t in ("a/temp", "b/humidity", "a/b/temp")},
    }


# -- acknowledgement, retries, dead letters ----------------------------------------------
def test_a_message_is_acked_only_after_its_function_succeeded(
    server: NimbusServer, sink: Callable[..., str], broker: PrivateBroker, base: str
) -> None:
    name = sink("mqtt-ack", mqtt(broker.url, base, max_retries=8, retry_backoff=0.3))
    client_id = f"nimbus-{name}-in"
    with Mqtt(broker.url) as client:
        client.publish(base, {"fail_until": time.time() + 4})

    # While the function fails and is retried, the broker has sent the message and
    # received no PUBACK. (The log is read first: a status read after it that shows
    # no success yet proves the log was read while the message was unsettled.)
    def unacked_while_retried() -> bool:
        log = broker_log(broker)
        if len(records(server, name)) < 2 or status(server, name)["succeeded"] != 0:
            return False
        assert [kind for kind, _ in packets(log, client_id)] == ["sent"], log
        return True

    wait_for("a retry of the unacked message", unacked_while_retried, server=server)
    wait_for("a success", lambda: status(server, name)["succeeded"] == 1, server=server)
    mid = packets(broker_log(broker), client_id)[0][1]
    wait_for(
        "the PUBACK",
        lambda: packets(broker_log(broker), client_id) == [("sent", mid), ("acked", mid)],
        server=server,
    )
    attempts = records(server, name)
    assert {r["messageId"] for r in attempts} == {str(mid)}
    assert all(r["duplicate"] is False for r in attempts)  # retried in Nimbus, not resent


def test_a_failed_message_is_retried_until_it_succeeds(
    server: NimbusServer, sink: Callable[..., str], base: str
) -> None:
    name = sink("mqtt-retry", mqtt(SHARED, base, max_retries=5, retry_backoff=0.3))
    with Mqtt(SHARED) as client:
        client.publish(base, {"fail_until": time.time() + 1})
    st = wait_for(
        "a success",
        lambda: s if (s := status(server, name))["succeeded"] == 1 else None,
        server=server,
    )
    assert st["retried"] >= 1 and st["failed"] == 0 and st["dead_lettered"] == 0
    assert len(records(server, name)) == st["retried"] + 1


def test_a_message_that_fails_every_retry_goes_to_the_dead_letter_topic_then_is_acked(
    server: NimbusServer, sink: Callable[..., str], broker: PrivateBroker, base: str
) -> None:
    with Mqtt(broker.url) as client:
        client.subscribe(f"{base}/dead")
        name = sink(
            "mqtt-dlq",
            mqtt(
                broker.url,
                f"{base}/in",
                dead_letter_topic=f"{base}/dead",
                max_retries=1,
                retry_backoff=0.1,
            ),
        )
        client.publish(f"{base}/in", {"fail": True}, headers={"trace": "t-1"})
        dead = client.wait_received(1)[0]
    assert json.loads(dead.payload) == {"fail": True}
    assert dict(getattr(dead.properties, "UserProperty", [])) == {
        "trace": "t-1",
        "nimbus-original-topic": f"{base}/in",
    }
    st = wait_for(
        "the dead letter counted",
        lambda: s if (s := status(server, name))["dead_lettered"] == 1 else None,
        server=server,
    )
    assert st["failed"] == 1 and st["retried"] == 1
    assert len(records(server, name)) == 2
    client_id = f"nimbus-{name}-in"
    wait_for(
        "the PUBACK after dead-lettering",
        lambda: [k for k, _ in packets(broker_log(broker), client_id)] == ["sent", "acked"],
    )


def test_without_a_dead_letter_topic_the_functions_destination_gets_it(
    server: NimbusServer, sink: Callable[..., str], base: str
) -> None:
    destination = f"mqtt-dest-{uuid.uuid4().hex[:6]}"
    assert server.deploy("async-sink", name=destination).status_code == 201
    try:
        name = sink(
            "mqtt-dl-fn",
            mqtt(SHARED, base, max_retries=1, retry_backoff=0.1),
            **{"async": {"dead_letter": f"function:{destination}"}},
        )
        with Mqtt(SHARED) as client:
            client.publish(base, {"fail": True})

        def dead_lettered() -> list[dict[str, Any]]:
            r = server.client.get("/v1/invocations", params={"function": destination})
            return [i for i in r.json()["invocations"] if i["status"] == "succeeded"]

        done = wait_for("the dead-letter record", dead_lettered, server=server)
        result = server.client.get(f"/v1/invocations/{done[0]['id']}").json()["result"]
    finally:
        server.client.delete(f"/v1/functions/{destination}")
    assert result["requestContext"]["condition"] == "RetriesExhausted"
    assert result["requestContext"]["approximateInvokeCount"] == 2
    assert result["requestPayload"]["Records"][0]["topic"] == base
    assert status(server, name)["dead_lettered"] == 1


# -- back-pressure -----------------------------------------------------------------------
def test_a_slow_function_takes_messages_only_as_fast_as_it_handles_them(
    server: NimbusServer, sink: Callable[..., str], broker: PrivateBroker, base: str
) -> None:
    name = sink("mqtt-slow", mqtt(broker.url, base, max_concurrency=1))
    client_id = f"nimbus-{name}-in"
    with Mqtt(broker.url, "publisher") as client:
        client.publish(base, {"i": 0, "sleep": 1.5})
        for i in range(1, 8):
            client.publish(base, {"i": i, "sleep": 0.2})
    # Nimbus holds at most (max_concurrency + 1) x batch_size = 2 unsettled messages:
    # one invoked, one waiting for it; the broker keeps the rest.
    samples = 0
    deadline = time.monotonic() + 30
    while len(records(server, name)) < 8 and time.monotonic() < deadline:
        st = trigger(server, name, "in")["status"]
        settled = st["succeeded"] + st["failed"] + st["dead_lettered"]
        assert st["received"] - settled <= 2, st
        assert st["in_flight"] <= 1, st
        samples += 1
        time.sleep(0.1)
    assert samples > 3
    wait_records(server, name, 8)
    assert [b["i"] for b in bodies(server, name)] == list(range(8))
    wait_for("8 successes", lambda: status(server, name)["succeeded"] == 8, server=server)
    # The broker's view: all 8 were published before the first PUBACK, yet it sent only
    # the Receive Maximum Nimbus asked for (2) until then.
    log = broker_log(broker)
    before_first_ack = log.split(f"Received PUBACK from {client_id}")[0]
    assert len([m for m in PUBLISHED.finditer(before_first_ack) if m[1] == "publisher"]) == 8
    assert [k for k, _ in packets(before_first_ack, client_id)] == ["sent", "sent"]
    wait_for(
        "8 PUBACKs",
        lambda: [k for k, _ in packets(broker_log(broker), client_id)].count("acked") == 8,
    )


# -- restarts ----------------------------------------------------------------------------
def test_a_broker_restart_mid_stream_loses_nothing(
    server: NimbusServer, sink: Callable[..., str], broker: PrivateBroker, base: str
) -> None:
    name = sink("mqtt-bounce", mqtt(broker.url, base, max_concurrency=1))
    with Mqtt(broker.url) as client:
        for i in range(5):
            client.publish(base, {"i": i, "sleep": 0.3})
    wait_records(server, name, 1)
    broker.stop()  # SIGTERM: Mosquitto saves its sessions and their messages
    down = wait_state(server, name, "in", "reconnecting")["status"]
    assert down["last_error"]
    broker.start()  # same port, same data dir
    up = wait_state(server, name, "in", "connected", timeout=30)["status"]
    assert up["last_error"]  # the reason it had to reconnect stays visible
    with Mqtt(broker.url) as client:
        for i in range(5, 10):
            client.publish(base, {"i": i})

    def all_ten() -> list[Any] | None:
        got = bodies(server, name)
        return got if {x["i"] for x in got} == set(range(10)) else None

    got = wait_for("all 10 messages", all_ten, server=server)
    duplicates = len(got) - 10
    assert duplicates <= 2, got  # at most what was in flight (Receive Maximum) when it went


def test_a_nimbus_killed_mid_stream_gets_every_message_again_after_restart(
    tmp_path: Path, broker: PrivateBroker, base: str
) -> None:
    data = tmp_path / "data"
    name = "mqtt-crash"
    spec = mqtt(broker.url, base, max_concurrency=2)
    with running(data) as first:
        deploy_sink(first, name, spec)
        wait_state(first, name, "in")
        with Mqtt(broker.url) as client:
            for i in range(8):
                client.publish(base, {"i": i, "sleep": 3 if i < 2 else 0})
        wait_records(first, name, 2)  # both slots busy for 3 s: nothing acked yet
        before = records(first, name)
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    with running(data) as second:
        wait_state(second, name, "in", timeout=30)

        def new_records() -> list[dict[str, Any]]:
            # The new server's logs hold what the first flushed before it died, too.
            return [r for r in records(second, name) if r not in before]

        def everything() -> list[dict[str, Any]] | None:
            got = new_records()
            seen = {json.loads(r["body"])["i"] for r in got}
            return got if seen == set(range(8)) else None

        after = wait_for("every message after the restart", everything, server=second)
        wait_for("8 successes", lambda: status(second, name)["succeeded"] == 8, server=second)
    # Nothing was acked before the kill: everything came again, and what had been sent
    # to the first server came flagged as sent before.
    resent = {json.loads(r["body"])["i"] for r in after if r["duplicate"]}
    assert resent >= {0, 1}, after
    duplicates = len(before) + len(after) - 8
    assert duplicates >= 2, (before, after)  # at least once: the two in flight ran twice


def test_a_nimbus_stopped_cleanly_acks_what_it_was_running_first(
    tmp_path: Path, broker: PrivateBroker, base: str
) -> None:
    data = tmp_path / "data"
    name = "mqtt-stop"
    with running(data) as first:
        deploy_sink(first, name, mqtt(broker.url, base, max_concurrency=1))
        wait_state(first, name, "in")
        with Mqtt(broker.url) as client:
            client.publish(base, {"i": 0, "sleep": 2})
        wait_records(first, name, 1)
        assert first.stop(signal.SIGTERM) in (0, -signal.SIGTERM)  # uvicorn re-raises it
    client_id = f"nimbus-{name}-in"
    assert [k for k, _ in packets(broker_log(broker), client_id)] == ["sent", "acked"]
    with running(data) as second:
        wait_state(second, name, "in", timeout=30)
        with Mqtt(broker.url) as client:
            client.publish(base, {"i": 1})
        wait_for("the next message", lambda: 1 in [b["i"] for b in bodies(second, name)])
        assert sorted(b["i"] for b in bodies(second, name)) == [0, 1]  # 0 not again


# -- credentials -------------------------------------------------------------------------
def test_credentials_work_and_are_never_shown(
    server: NimbusServer, sink: Callable[..., str], tmp_path: Path, base: str
) -> None:
    directory = tmp_path / "mosquitto"
    directory.mkdir()
    passwords = directory / "passwd"
    subprocess.run(
        [MOSQUITTO_PASSWD, "-b", "-c", str(passwords), "nimbus", "s3cr3t-pw"],
        check=True,
        capture_output=True,
    )
    config = mosquitto(directory, "allow_anonymous false", f"password_file {passwords}")
    with private_broker(directory, config, "mqtt") as b:
        good = f"mqtt://nimbus:s3cr3t-pw@127.0.0.1:{b.port}"
        bad = f"mqtt://nimbus:wr0ng-pw@127.0.0.1:{b.port}"
        name = sink("mqtt-auth", mqtt(good, base), mqtt(bad, base, name="bad"), connect=False)
        wait_state(server, name, "in")
        refused = wait_state(server, name, "bad", "error")["status"]
        # Mosquitto answers a wrong password with "not authorized" (0x87), others 0x86.
        assert re.search("not authorized|bad user name", refused["last_error"]), refused
        with Mqtt(good) as client:
            client.publish(base, {"hello": "world"})
        wait_records(server, name, 1)
        shown = [
            server.client.get(f"/v1/functions/{name}").text,
            server.client.get(f"/v1/functions/{name}/triggers").text,
        ]
        assert trigger(server, name, "in")["url"] == f"mqtt://nimbus:***@127.0.0.1:{b.port}"
        for text in [*shown, server.output()]:
            assert "s3cr3t-pw" not in text and "wr0ng-pw" not in text
