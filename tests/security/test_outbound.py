"""Callbacks and destinations (SSRF): Nimbus never POSTs to loopback, private,
link-local or its own addresses on a caller's behalf, whatever the spelling."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from tests.support import NimbusServer

SPELLINGS = ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]", "2130706433", "0x7f.1", "127.1"]


@pytest.fixture
def listener() -> Iterator[tuple[int, list[int]]]:
    """A TCP listener on loopback counting the connections it gets."""
    accepted: list[int] = []
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    sock.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except TimeoutError:
                continue
            accepted.append(1)
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(sock.getsockname()[1]), accepted
    stop.set()
    thread.join()
    sock.close()


def test_callbacks_to_the_node_are_refused_in_every_spelling(server: NimbusServer) -> None:
    for host in SPELLINGS:
        url = f"http://{host}:{server.port}/v1/functions/sec-neighbour/invoke"
        for path in ("/async-function/sec-neighbour", "/v1/functions/sec-neighbour/invoke"):
            r = server.client.post(
                path,
                content=b"{}",
                headers={"x-callback-url": url, "x-nimbus-invocation-type": "Event"},
            )
            assert r.status_code == 400, (host, path, r.text)
            assert r.json()["error"]["code"] == "InvalidParameterValue"


def test_destinations_to_the_node_are_refused_at_deploy(server: NimbusServer) -> None:
    for host in SPELLINGS:
        r = server.deploy(
            "hello",
            name="sec-dest",
            **{"async": {"on_success": f"http://{host}:{server.port}/v1/functions"}},
        )
        assert r.status_code == 400, (host, r.text)
        assert "public address" in r.json()["error"]["message"] or "the node" in r.text


def test_a_name_that_resolves_to_loopback_is_refused_when_sent(
    server: NimbusServer, listener: tuple[int, list[int]]
) -> None:
    port, accepted = listener
    name = socket.gethostname()  # in /etc/hosts, a loopback address
    if not socket.gethostbyname(name).startswith("127."):
        pytest.skip(f"{name} does not resolve to loopback here")
    url = f"http://{name}:{port}/cb"
    r = server.client.post(
        "/async-function/sec-neighbour", content=b"{}", headers={"x-callback-url": url}
    )
    assert r.status_code == 202, r.text  # a public-looking name: checked when sent
    deadline = time.monotonic() + 20
    while f"POST {url} refused" not in server.output():
        assert time.monotonic() < deadline, "the delivery was never refused"
        time.sleep(0.05)
    assert accepted == []  # nothing ever connected to the loopback listener
