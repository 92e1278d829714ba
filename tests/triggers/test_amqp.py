"""AMQP (RabbitMQ) triggers against a real ``nimbus up`` and real RabbitMQ brokers.

Most tests use the machine's broker (``NIMBUS_TEST_AMQP_URL``, default
``amqp://guest:guest@127.0.0.1:5672/``) with a queue of their own, removed afterwards.
The tests that need the broker's own count of unacknowledged messages, or that stop
and restart the broker, use a private RabbitMQ node (its own name, ports, data and
Erlang cookie in a temp dir), started once for the module and asked through
``rabbitmqctl``.

Proved here: delivery with the record's metadata; topic-exchange wildcard routing;
a message is acked only after its function succeeded (the broker holds it unacked
while it is retried) and is redelivered to the function until it succeeds; failed
messages dead-lettered by the broker (``x-death``) or to the function's dead-letter
destination; back-pressure (the broker keeps what a slow function has not taken);
request-reply; a missing queue; broker and Nimbus restarts losing nothing; and
credentials never shown.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel, ExchangeType
from aiormq.exceptions import ChannelNotFoundEntity

from nimbus.triggers.specs import redact_url
from tests.support import NimbusServer, free_port, pid_alive, running
from tests.triggers.support import (
    PrivateBroker,
    bodies,
    deploy_sink,
    env_url,
    printed,
    records,
    trigger,
    wait_for,
    wait_printed,
    wait_records,
    wait_state,
)

SHARED_URL = env_url("NIMBUS_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RABBITMQ_BIN = Path(os.environ.get("NIMBUS_TEST_RABBITMQ_BIN", "/usr/lib/rabbitmq/bin"))
T = TypeVar("T")


def unique(prefix: str) -> str:
    return f"nimbus-test-{prefix}-{uuid.uuid4().hex[:10]}"


# -- a test's side of a broker ---------------------------------------------------------
@dataclass
class Broker:
    """Publishes and inspects through plain AMQP; removes what a test made."""

    url: str
    queues: list[str] = field(default_factory=list)
    exchanges: list[str] = field(default_factory=list)
    functions: list[tuple[NimbusServer, str]] = field(default_factory=list)

    def run(self, work: Callable[[AbstractChannel], Awaitable[T]]) -> T:
        async def session() -> T:
            connection = await aio_pika.connect(self.url, timeout=10)
            try:
                return await work(await connection.channel())
            finally:
                await connection.close()

        return asyncio.run(session())

    def queue(self, prefix: str) -> str:
        name = unique(prefix)
        self.queues.append(name)
        return name

    def exchange(self, prefix: str, kind: ExchangeType = ExchangeType.TOPIC) -> str:
        name = unique(prefix)
        self.exchanges.append(name)

        async def declare(channel: AbstractChannel) -> None:
            await channel.declare_exchange(name, kind, durable=True)

        self.run(declare)
        return name

    def publish(
        self,
        routing_key: str,
        *payloads: Any,
        exchange: str = "",
        **properties: Any,
    ) -> None:
        """Persistent messages with JSON bodies, confirmed by the broker."""

        async def send(channel: AbstractChannel) -> None:
            target = (
                await channel.get_exchange(exchange, ensure=False)
                if exchange
                else channel.default_exchange
            )
            for payload in payloads:
                message = aio_pika.Message(
                    json.dumps(payload).encode(),
                    delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    **properties,
                )
                await target.publish(message, routing_key=routing_key)

        self.run(send)

    def ready(self, queue: str) -> int | None:
        """Messages ready in the queue (not counting those out unacked), None if none."""

        async def count(channel: AbstractChannel) -> int | None:
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except ChannelNotFoundEntity:
                return None
            return int(declared.declaration_result.message_count or 0)

        return self.run(count)

    def consumers(self, queue: str) -> int:
        async def count(channel: AbstractChannel) -> int:
            try:
                declared = await channel.declare_queue(queue, passive=True)
            except ChannelNotFoundEntity:
                return 0
            return int(declared.declaration_result.consumer_count or 0)

        return self.run(count)

    def get(self, queue: str) -> aio_pika.abc.AbstractIncomingMessage | None:
        async def take(channel: AbstractChannel) -> aio_pika.abc.AbstractIncomingMessage | None:
            declared = await channel.declare_queue(queue, passive=True)
            message = await declared.get(no_ack=True, fail=False)
            return message

        return self.run(take)

    def stop_function(self, server: NimbusServer, name: str) -> None:
        """Delete the function and wait until its trigger no longer consumes."""
        if server.proc is not None and server.proc.poll() is None:
            server.client.delete(f"/v1/functions/{name}")
        for queue in self.queues:
            wait_for(f"{queue} to have no consumers", partial(self.unconsumed, queue))

    def unconsumed(self, queue: str) -> bool:
        return self.consumers(queue) == 0

    def cleanup(self) -> None:
        for server, name in self.functions:
            self.stop_function(server, name)

        async def delete(channel: AbstractChannel) -> None:
            for queue in self.queues:
                await channel.queue_delete(queue)
            for exchange in self.exchanges:
                await channel.exchange_delete(exchange)

        self.run(delete)


@pytest.fixture
def shared() -> Iterator[Broker]:
    broker = Broker(SHARED_URL)
    try:
        yield broker
    finally:
        broker.cleanup()


# -- a private RabbitMQ node ------------------------------------------------------------
class PrivateRabbit:
    """A RabbitMQ node of this module's own: ``rabbitmq-server`` with a private node
    name, AMQP and distribution ports, data, config and Erlang cookie."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.dist_port = free_port()
        self.process = PrivateBroker(directory, self._argv, "amqp")
        self.port = self.process.port
        self.node = f"nimbus-test-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        home = directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        (directory / "rabbitmq-env.conf").write_text("")  # not the system's
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        self.env = {
            "HOME": str(home),
            "RABBITMQ_CONF_ENV_FILE": str(directory / "rabbitmq-env.conf"),
            "RABBITMQ_NODENAME": self.node,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_PID_FILE": str(directory / "rabbitmq.pid"),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    def _argv(self, port: int) -> list[str]:
        assert port == self.port
        return [
            "env",
            *(f"{k}={v}" for k, v in self.env.items()),
            str(RABBITMQ_BIN / "rabbitmq-server"),
        ]

    def start(self) -> None:
        self.process.start()

    def stop(self) -> None:
        """A clean shutdown (the script turns SIGTERM into one): persistent messages stay."""
        self.process.stop(signal.SIGTERM)

    @property
    def running(self) -> bool:
        return self.process.proc is not None and self.process.proc.poll() is None

    def vm_pids(self) -> list[int]:
        """This node's Erlang processes: they carry its home dir on their command line or
        its node name in their environment (never another node's, nor the shared epmd)."""
        home = f"-home {self.env['HOME']}".encode()
        marker = f"RABBITMQ_NODENAME={self.node}".encode()
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    cmdline = f.read().replace(b"\0", b" ")
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = f.read().split(b"\0")
            except OSError:
                continue
            if b"epmd" in cmdline.split(b" ")[0]:
                continue
            if (home in cmdline or marker in environ) and pid_alive(int(entry)):
                found.append(int(entry))
        return found

    def kill_leftovers(self) -> None:
        for pid in self.vm_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def queue(self, name: str) -> dict[str, int]:
        """The broker's own counts for a queue: ready, unacked, consumers."""
        out = subprocess.run(
            [
                str(RABBITMQ_BIN / "rabbitmqctl"),
                "-n",
                self.node,
                "list_queues",
                "--quiet",
                "--formatter",
                "json",
                "name",
                "messages_ready",
                "messages_unacknowledged",
                "consumers",
            ],
            env={**os.environ, **self.env},
            capture_output=True,
            timeout=60,
            check=True,
        )
        for row in json.loads(out.stdout):
            if row["name"] == name:
                return {
                    "ready": int(row["messages_ready"]),
                    "unacked": int(row["messages_unacknowledged"]),
                    "consumers": int(row["consumers"]),
                }
        raise AssertionError(f"no queue {name} on {self.node}: {out.stdout!r}")


@pytest.fixture(scope="module")
def rabbit_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRabbit]:
    node = PrivateRabbit(tmp_path_factory.mktemp("rabbitmq"))
    try:
        node.start()
        yield node
    finally:
        with contextlib.suppress(Exception):
            node.stop()
        node.kill_leftovers()
        wait_for(f"the Erlang VM of {node.node} to exit", lambda: not node.vm_pids())


@pytest.fixture
def private(rabbit_node: PrivateRabbit) -> Iterator[Broker]:
    """The private node, running (a restart test may have left it stopped on failure)."""
    if not rabbit_node.running:
        rabbit_node.kill_leftovers()
        rabbit_node.start()
    broker = Broker(rabbit_node.url)
    try:
        yield broker
    finally:
        if rabbit_node.running:
            broker.cleanup()


def consume(server: NimbusServer, broker: Broker, function: str, queue: str, **fields: Any) -> None:
    """Deploy the sink with an AMQP trigger named ``q`` and wait until it consumes."""
    extra = fields.pop("function_spec", None) or {}
    spec = {"type": "amqp", "name": "q", "url": broker.url, "queue": queue, **fields}
    deploy_sink(server, function, spec, **extra)
    broker.functions.append((server, function))
    wait_state(server, function, "q")


# -- delivery --------------------------------------------------------------------------
def test_messages_arrive_with_their_amqp_metadata(server: NimbusServer, shared: Broker) -> None:
    queue = shared.queue("meta")
    consume(server, shared, "amqp-meta", queue)
    stamp = int(time.time())
    shared.publish(
        queue,
        {"n": 1},
        message_id="order-1",
        content_type="application/json",
        headers={"nimbus-depth": 2, "tenant": "acme", "route": ["a", 1]},
        timestamp=stamp,
    )
    shared.publish(queue, {"n": 2})
    # (Both run at once: their records may come in either order.)
    first, second = sorted(wait_records(server, "amqp-meta", 2), key=lambda r: str(r["body"]))
    assert first["body"] == '{"n": 1}'
    assert first["messageId"] == "order-1"
    assert first["eventSource"] == "aws:sqs"
    assert first["eventSourceARN"] == f"arn:aws:sqs:us-east-1:000000000000:{queue}"
    assert first["attributes"]["ApproximateReceiveCount"] == "1"
    assert first["attributes"]["SentTimestamp"] == str(stamp * 1000)
    attributes = first["messageAttributes"]
    assert {k: (a["dataType"], a["stringValue"]) for k, a in attributes.items()} == {
        "nimbus-depth": ("Number", "2"),
        "tenant": ("String", "acme"),
        "route": ("String", '["a",1]'),
    }
    meta = first["nimbus"]
    assert meta["queue"] == queue and meta["routingKey"] == queue
    assert meta["exchange"] == "" and meta["redelivered"] is False
    assert meta["contentType"] == "application/json"
    assert meta["headers"] == {"nimbus-depth": "2", "tenant": "acme", "route": '["a",1]'}
    assert meta["timestamp"].startswith(time.strftime("%Y-%m-%dT", time.gmtime(stamp)))
    assert meta["depth"] == 3  # what the function passes on when it publishes
    assert second["messageId"] and second["nimbus"]["headers"] == {}
    assert second["messageAttributes"] == {}
    assert isinstance(second["nimbus"]["deliveryTag"], int)
    assert second["nimbus"]["contentType"] is None
    status = wait_for(
        "both acked",
        lambda: (s := trigger(server, "amqp-meta", "q")["status"])["succeeded"] == 2 and s,
    )
    assert status["received"] == 2 and status["failed"] == 0
    # Acked: once the trigger stops consuming, nothing goes back to the queue.
    shared.stop_function(server, "amqp-meta")
    assert shared.ready(queue) == 0


def test_a_topic_exchange_routes_by_wildcard(server: NimbusServer, shared: Broker) -> None:
    queue = shared.queue("wild")
    exchange = unique("orders")
    shared.exchanges.append(exchange)  # the trigger declares it; the test removes it
    consume(
        server,
        shared,
        "amqp-wild",
        queue,
        exchange=exchange,
        routing_keys=["orders.*", "audit.#"],
    )
    keys = ["orders.created", "orders.eu.created", "audit", "audit.x.y", "billing.paid"]
    for key in keys:
        shared.publish(key, {"key": key}, exchange=exchange)
    wait_records(server, "amqp-wild", 3)
    time.sleep(1.0)  # and nothing else comes
    got = records(server, "amqp-wild")
    got_keys = sorted(r["nimbus"]["routingKey"] for r in got)
    assert got_keys == ["audit", "audit.x.y", "orders.created"]
    assert {r["nimbus"]["exchange"] for r in got} == {exchange}


def test_request_reply_publishes_the_result_to_reply_to(
    server: NimbusServer, shared: Broker
) -> None:
    queue = shared.queue("rpc")
    consume(server, shared, "amqp-rpc", queue)

    async def call(channel: AbstractChannel) -> tuple[str | None, Any]:
        replies = await channel.declare_queue(exclusive=True)
        await channel.default_exchange.publish(
            aio_pika.Message(b'{"question": 42}', reply_to=replies.name, correlation_id="c-1"),
            routing_key=queue,
        )
        async with replies.iterator(timeout=20) as it:
            async for message in it:
                await message.ack()
                return message.correlation_id, json.loads(message.body)
        raise AssertionError("no reply")

    correlation, result = shared.run(call)
    assert correlation == "c-1"
    assert result == {"ok": True, "count": 1, "bodies": [{"question": 42}]}


# -- acknowledgement, retries, dead letters ---------------------------------------------
def test_a_message_is_acked_only_after_its_function_succeeds(
    server: NimbusServer, private: Broker, rabbit_node: PrivateRabbit
) -> None:
    queue = private.queue("ack")
    consume(server, private, "amqp-ack", queue, max_retries=10, retry_backoff=0.5)
    private.publish(queue, {"fail_until": time.time() + 6})
    wait_records(server, "amqp-ack", 1)
    # Failing and retried: the broker has given it to Nimbus, which has not acked it.
    assert rabbit_node.queue(queue) == {"ready": 0, "unacked": 1, "consumers": 1}
    assert trigger(server, "amqp-ack", "q")["status"]["succeeded"] == 0
    wait_for(
        "the retried message to succeed",
        lambda: trigger(server, "amqp-ack", "q")["status"]["succeeded"] == 1,
        timeout=25,
        server=server,
    )
    assert rabbit_node.queue(queue) == {"ready": 0, "unacked": 0, "consumers": 1}
    wait_records(server, "amqp-ack", 2)


def test_a_failing_message_is_delivered_again_until_it_succeeds(
    server: NimbusServer, shared: Broker
) -> None:
    queue = shared.queue("retry")
    consume(server, shared, "amqp-retry", queue, max_retries=5, retry_backoff=0.2)
    shared.publish(queue, {"fail_until": time.time() + 1.5}, message_id="m-1")
    status = wait_for(
        "the message to succeed after retries",
        lambda: (s := trigger(server, "amqp-retry", "q")["status"])["succeeded"] == 1 and s,
        timeout=25,
        server=server,
    )
    assert status["retried"] >= 1 and status["dead_lettered"] == 0
    got = wait_records(server, "amqp-retry", status["retried"] + 1)
    assert len(got) == status["retried"] + 1  # one delivery per attempt
    assert {r["messageId"] for r in got} == {"m-1"}
    shared.stop_function(server, "amqp-retry")
    assert shared.ready(queue) == 0


def test_the_broker_dead_letters_to_the_queues_dead_letter_exchange(
    server: NimbusServer, shared: Broker
) -> None:
    queue = shared.queue("dlx-src")
    dead = shared.queue("dlx-dead")
    dlx = shared.exchange("dlx", ExchangeType.FANOUT)

    async def bind(channel: AbstractChannel) -> None:
        declared = await channel.declare_queue(dead, durable=True)
        await declared.bind(dlx)

    shared.run(bind)
    consume(
        server,
        shared,
        "amqp-dlx",
        queue,
        dead_letter_exchange=dlx,
        max_retries=1,
        retry_backoff=0.1,
    )
    shared.publish(queue, {"fail": True}, message_id="doomed")
    message = wait_for("the dead-lettered message", lambda: shared.get(dead), server=server)
    assert json.loads(message.body) == {"fail": True}
    assert message.message_id == "doomed"
    death = message.headers["x-death"][0]
    assert death["queue"] == queue and death["reason"] == "rejected"
    status = trigger(server, "amqp-dlx", "q")["status"]
    assert status["dead_lettered"] == 1 and status["retried"] == 1
    wait_records(server, "amqp-dlx", 2)
    assert len(records(server, "amqp-dlx")) == 2  # tried twice, then handed to the broker


def test_without_a_dead_letter_exchange_failures_go_to_the_functions_destination(
    server: NimbusServer, shared: Broker
) -> None:
    r = server.deploy("async-sink", name="amqp-dlq")
    assert r.status_code == 201, r.text
    queue = shared.queue("dlq")
    consume(
        server,
        shared,
        "amqp-failing",
        queue,
        max_retries=1,
        retry_backoff=0.1,
        function_spec={"async": {"dead_letter": "function:amqp-dlq"}},
    )
    shared.publish(queue, {"fail": True}, message_id="to-dlq")

    def dead_lettered() -> list[dict[str, Any]]:
        r = server.client.get("/v1/invocations", params={"function": "amqp-dlq"})
        return [i for i in r.json()["invocations"] if i["status"] == "succeeded"]

    done = wait_for("the dead-letter record", dead_lettered, server=server)
    result = server.client.get(f"/v1/invocations/{done[0]['id']}").json()["result"]
    assert result["requestContext"]["condition"] == "RetriesExhausted"
    assert result["requestContext"]["approximateInvokeCount"] == 2
    record = result["requestPayload"]["Records"][0]
    assert record["messageId"] == "to-dlq" and record["nimbus"]["queue"] == queue
    assert "told to fail" in result["responsePayload"]["errorMessage"]
    # Nimbus's destination took it, so it was acked: nothing returns to the queue.
    shared.stop_function(server, "amqp-failing")
    assert shared.ready(queue) == 0
    server.client.delete("/v1/functions/amqp-dlq")


def test_a_trigger_stopped_mid_message_lets_it_finish_and_acks_it(
    server: NimbusServer, private: Broker, rabbit_node: PrivateRabbit
) -> None:
    queue = private.queue("stop")
    consume(server, private, "amqp-stop", queue)
    private.publish(queue, {"sleep": 2}, message_id="in-flight")
    wait_records(server, "amqp-stop", 1)
    r = server.client.delete("/v1/functions/amqp-stop/triggers/q")
    assert r.status_code < 300, r.text
    # The consumer goes at once; the message is acked on its channel before that closes
    # (a message still unacked when it closes would be back in the queue, ready).
    settled = wait_for(
        "the message in flight to settle",
        lambda: (c := rabbit_node.queue(queue))["unacked"] == 0 and c,
        server=server,
    )
    assert settled == {"ready": 0, "unacked": 0, "consumers": 0}
    assert len(records(server, "amqp-stop")) == 1


# -- back-pressure -----------------------------------------------------------------------
def test_a_slow_function_leaves_the_rest_in_the_broker(
    server: NimbusServer, private: Broker, rabbit_node: PrivateRabbit
) -> None:
    queue = private.queue("slow")
    consume(server, private, "amqp-slow", queue, max_concurrency=1, prefetch=1)
    total = 6
    private.publish(queue, *({"n": i, "sleep": 1.5} for i in range(total)))
    wait_records(server, "amqp-slow", 1)
    counts = rabbit_node.queue(queue)
    started = len(records(server, "amqp-slow"))  # at least as many as were acked
    # Prefetch 1: Nimbus holds at most one message; everything not yet started is
    # still the broker's, ready for any consumer.
    assert counts["unacked"] <= 1, counts
    assert counts["ready"] >= total - started - 1 and counts["ready"] > 0, (counts, started)
    assert trigger(server, "amqp-slow", "q")["status"]["in_flight"] <= 1
    wait_records(server, "amqp-slow", total, timeout=30)
    assert sorted(b["n"] for b in bodies(server, "amqp-slow")) == list(range(total))
    wait_for(
        "all acked",
        lambda: rabbit_node.queue(queue) == {"ready": 0, "unacked": 0, "consumers": 1},
        server=server,
    )


# -- configuration problems and credentials -----------------------------------------------
def test_a_missing_queue_is_an_error_until_it_exists(server: NimbusServer, shared: Broker) -> None:
    queue = shared.queue("later")
    spec = {"type": "amqp", "name": "q", "url": shared.url, "queue": queue, "declare": False}
    deploy_sink(server, "amqp-later", spec)
    shared.functions.append((server, "amqp-later"))
    status = wait_state(server, "amqp-later", "q", "error")["status"]
    assert f"queue {queue!r} does not exist" in status["last_error"]
    assert shared.ready(queue) is None  # not declared behind the user's back

    async def declare(channel: AbstractChannel) -> None:
        await channel.declare_queue(queue, durable=True)

    shared.run(declare)
    wait_state(server, "amqp-later", "q", "connected", timeout=30)
    shared.publish(queue, {"n": 1})
    wait_records(server, "amqp-later", 1)


def test_credentials_never_show(server: NimbusServer, shared: Broker) -> None:
    queue = shared.queue("creds")
    parts = urlsplit(SHARED_URL)
    assert parts.password, "the test needs a broker URL with a password"
    consume(server, shared, "amqp-creds", queue)
    shown = server.client.get("/v1/functions/amqp-creds").text
    listed = server.client.get("/v1/functions/amqp-creds/triggers").text
    for text in (shown, listed):
        assert f"{parts.username}:{parts.password}@" not in text, text
        assert f"{parts.username}:***@" in text and str(redact_url(SHARED_URL)) in text, text

    # A wrong password: the login is refused, the trigger says so, the secret stays hidden.
    secret = f"s3cret-{uuid.uuid4().hex}"
    host = parts.netloc.rpartition("@")[2]
    wrong = {
        "type": "amqp",
        "name": "q",
        "url": urlunsplit((parts.scheme, f"{parts.username}:{secret}@{host}", parts.path, "", "")),
        "queue": queue,
    }
    deploy_sink(server, "amqp-wrong", wrong)
    shared.functions.append((server, "amqp-wrong"))
    status = wait_state(server, "amqp-wrong", "q", "error")["status"]
    assert "refused the login" in status["last_error"]
    # And a trigger without a URL shows the server's default, redacted too.
    implicit = {"type": "amqp", "name": "d", "queue": unique("none"), "declare": False}
    r = server.client.post("/v1/functions/amqp-wrong/triggers", json=implicit)
    assert r.status_code == 201, r.text
    texts = [
        server.client.get("/v1/functions/amqp-wrong").text,
        server.client.get("/v1/functions/amqp-wrong/triggers").text,
        server.output(),
    ]
    assert all(secret not in t for t in texts)
    assert f"{parts.username}:***@" in texts[1]
    assert trigger(server, "amqp-wrong", "d")["url_in_use"] == "amqp://guest:***@127.0.0.1:5672/"


# -- restarts ------------------------------------------------------------------------------
def test_a_broker_restart_mid_stream_loses_nothing(
    server: NimbusServer, private: Broker, rabbit_node: PrivateRabbit
) -> None:
    queue = private.queue("restart")
    consume(server, private, "amqp-brestart", queue, max_concurrency=1, prefetch=1)
    private.publish(queue, *({"n": i, "sleep": 0.3} for i in range(5)))
    wait_records(server, "amqp-brestart", 2)
    rabbit_node.stop()  # mid-stream: some delivered, one in flight, the rest queued
    status = wait_state(server, "amqp-brestart", "q", "reconnecting")["status"]
    assert status["last_error"]
    rabbit_node.start()  # same node, port and data: the durable queue and its messages
    wait_state(server, "amqp-brestart", "q", "connected", timeout=30)
    private.publish(queue, *({"n": i} for i in range(5, 10)))
    wait_for(
        "every message",
        lambda: {b["n"] for b in bodies(server, "amqp-brestart")} == set(range(10)),
        timeout=30,
        server=server,
    )
    assert trigger(server, "amqp-brestart", "q")["status"]["last_error"]


def test_a_nimbus_restart_mid_stream_loses_nothing(tmp_path: Path, shared: Broker) -> None:
    queue = shared.queue("nrestart")
    total = 8
    data = tmp_path / "data"
    first = NimbusServer(data)
    try:
        first.start()
        consume(first, shared, "amqp-nrestart", queue, max_concurrency=2, prefetch=4)
        shared.publish(queue, *({"n": i, "sleep": 2} for i in range(total)))
        wait_records(first, "amqp-nrestart", 2)
        # Every invocation prints its record before it sleeps: whatever the first server
        # could have acked by the kill is in this snapshot.
        before = records(first, "amqp-nrestart")
        first.stop(signal.SIGKILL)  # invocations in flight, messages prefetched: unacked
    finally:
        first.close()
    with running(data) as second:
        shared.functions.append((second, "amqp-nrestart"))
        wait_state(second, "amqp-nrestart", "q")

        def delivered() -> list[dict[str, Any]] | None:
            seen = records(second, "amqp-nrestart")  # the first server's, kept, and its own
            seen += [r for r in before if r not in seen]
            return (
                seen
                if {r["body"] for r in seen}
                == {json.dumps({"n": i, "sleep": 2}) for i in range(total)}
                else None
            )

        got = wait_for("every message", delivered, timeout=60, server=second)
        duplicates = len(got) - total
        print(f"{total} messages, {len(got)} deliveries: {duplicates} after the restart again")
        assert any(r["nimbus"]["redelivered"] for r in got)  # the in-flight ones came back
        status = wait_for(
            "every message taken to be acked",
            lambda: (
                (s := trigger(second, "amqp-nrestart", "q")["status"])["in_flight"] == 0
                and s["received"] == s["succeeded"]
                and s
            ),
            server=second,
        )
        assert status["failed"] == 0
        shared.stop_function(second, "amqp-nrestart")
        assert shared.ready(queue) == 0  # nothing was left unacked


# -- Lambda's SQS shape ------------------------------------------------------------------
def test_sqs_consumer_code_reads_every_field_of_a_message(
    server: NimbusServer, shared: Broker
) -> None:
    queue = shared.queue("sqs")
    consume(server, shared, "amqp-sqs", queue, function_spec={"fixture": "sqs-consumer"})
    stamp = int(time.time())
    shared.publish(
        queue,
        {"order": 7},
        message_id="order-7",
        user_id="guest",  # RabbitMQ checks it is the publishing connection's user
        timestamp=stamp,
        headers={
            "tenant": "acme",
            "attempts": 5,
            "ratio": 1.5,
            "raw": bytearray(b"\x00\xff"),
            "vip": True,
        },
    )
    [seen] = wait_printed(server, "amqp-sqs", "SQS", 1)
    assert seen["message_id"] == "order-7" and json.loads(seen["body"]) == {"order": 7}
    assert seen["receipt_handle"]
    assert seen["approximate_receive_count"] == 1
    assert seen["sent_timestamp"] == stamp * 1000
    assert seen["first_receive_timestamp"] >= seen["sent_timestamp"]
    assert seen["sender_id"] == "guest"
    assert seen["message_attributes"] == {
        "tenant": {"string_value": "acme", "binary_value": None, "data_type": "String"},
        "attempts": {"string_value": "5", "binary_value": None, "data_type": "Number"},
        "ratio": {"string_value": "1.5", "binary_value": None, "data_type": "Number"},
        "raw": {"string_value": None, "binary_value": "00ff", "data_type": "Binary"},
        "vip": {"string_value": "true", "binary_value": None, "data_type": "String"},
    }
    assert seen["md5_ok"] is True and seen["event_source"] == "aws:sqs"
    assert seen["event_source_arn"] == f"arn:aws:sqs:us-east-1:000000000000:{queue}"
    assert seen["aws_region"] == seen["function_region"] == "us-east-1"
    assert seen["queue_url"] == f"https://sqs.us-east-1.amazonaws.com/000000000000/{queue}"
    assert seen["nimbus"]["queue"] == queue and seen["nimbus"]["routingKey"] == queue


def test_a_partial_batch_response_retries_and_dead_letters_only_the_failed_messages(
    server: NimbusServer, private: Broker, rabbit_node: PrivateRabbit
) -> None:
    queue, dead = private.queue("partial"), private.queue("partial-dead")
    dlx = private.exchange("partial-dlx", ExchangeType.FANOUT)

    async def bind(channel: AbstractChannel) -> None:
        declared = await channel.declare_queue(dead, durable=True)
        await declared.bind(dlx)

    private.run(bind)
    consume(
        server,
        private,
        "amqp-partial",
        queue,
        batch_size=3,
        batch_window=3,
        max_retries=1,
        retry_backoff=5,
        dead_letter_exchange=dlx,
        function_spec={"fixture": "sqs-consumer"},
    )
    for message_id, body in (("ok-1", {"n": 1}), ("doomed", {"fail": True}), ("ok-2", {"n": 3})):
        private.publish(queue, body, message_id=message_id)
    # The two that succeeded are acked at once; the broker still has the failed one
    # out, unacknowledged, while it waits for its retry.
    wait_printed(server, "amqp-partial", "SQS", 3)
    wait_for(
        "only the failed message unacknowledged",
        lambda: rabbit_node.queue(queue) == {"ready": 0, "unacked": 1, "consumers": 1},
        server=server,
    )
    assert len(printed(server, "amqp-partial", "SQS")) == 3  # its retry has not run yet
    message = wait_for("the dead-lettered message", lambda: private.get(dead), server=server)
    assert message.message_id == "doomed" and json.loads(message.body) == {"fail": True}
    wait_for(
        "every message settled",
        lambda: rabbit_node.queue(queue) == {"ready": 0, "unacked": 0, "consumers": 1},
    )
    seen = wait_printed(server, "amqp-partial", "SQS", 4)
    assert [s["batch"] for s in seen] == [["ok-1", "doomed", "ok-2"]] * 3 + [["doomed"]]
    tries = [s["approximate_receive_count"] for s in seen if s["message_id"] == "doomed"]
    assert tries == [1, 2]
    assert private.get(dead) is None  # only the failed one was dead-lettered
    status = wait_for(
        "the dead letter counted",
        lambda: (s := trigger(server, "amqp-partial", "q")["status"])["dead_lettered"] and s,
    )
    assert (status["succeeded"], status["retried"], status["dead_lettered"]) == (2, 1, 1)
