"""Exhaustion from the network: the listener's limits hold against a real ``nimbus up``.

Huge or countless headers get 431, a slow head or a stalled body 408, an idle
connection is closed, a body cut short is never invoked, connections from one
address are capped (429), and an upload over the limit is refused (413) before it
is read. The raw-socket clients connect from 127.0.0.2, so their connections are
counted apart from the test's own httpx client on 127.0.0.1.
"""

from __future__ import annotations

import json
import select
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import NimbusServer, make_zip, running

ECHO = b"""
def handler(event, context):
    print("body length", len(event.get("body") or ""))
    return {"statusCode": 200, "body": "ok"}
"""
SPEC = {"name": "limits-echo", "runtime": "python3.11", "handler": "app.handler"}
PER_CLIENT = 4
CLIENT_ADDR = "127.0.0.2"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NimbusServer]:
    args = [
        "--insecure-no-sandbox",
        "--header-timeout",
        "1",
        "--body-timeout",
        "1",
        "--max-connections-per-client",
        str(PER_CLIENT),
        "--max-zip-entries",
        "200",
    ]
    data = tmp_path_factory.mktemp("limits") / "data"
    with running(data, args=args, env={"NIMBUS_MAX_ZIP_BYTES": str(2 << 20)}) as s:
        r = s.create(SPEC, make_zip({"app.py": ECHO}))
        assert r.status_code == 201, r.text
        yield s


def connect(server: NimbusServer) -> socket.socket:
    sock = socket.create_connection(
        ("127.0.0.1", server.port), timeout=10, source_address=(CLIENT_ADDR, 0)
    )
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


def error_code(response: bytes) -> str:
    return str(json.loads(response.partition(b"\r\n\r\n")[2])["error"]["code"])


def request_head(server: NimbusServer, path: str, extra: bytes = b"") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n".encode()
        + extra
        + b"content-type: application/json\r\n"
    )


def test_headers_over_the_byte_limit_get_431_and_the_server_stays_quick(
    server: NimbusServer,
) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        for _ in range(200):  # 200 x 1 KiB: past 64 KiB, until the server answers
            if select.select([sock], [], [], 0)[0]:
                break
            sock.sendall(b"x-pad: " + b"a" * 1024 + b"\r\n")
        response = read_all(sock)
    assert status_of(response) == 431, response[:200]
    assert error_code(response) == "RequestHeaderFieldsTooLarge"
    assert server.client.get("/healthz").status_code == 200


def test_too_many_header_fields_get_431(server: NimbusServer) -> None:
    with connect(server) as sock:
        fields = b"".join(b"x-h%d: 1\r\n" % i for i in range(101))
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        response = read_all(sock)
    assert status_of(response) == 431, response[:200]


def test_a_head_sent_slowly_gets_408(server: NimbusServer) -> None:
    with connect(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        response = read_all(sock)
    assert status_of(response) == 408, response[:200]
    assert error_code(response) == "RequestTimeout"


def test_a_connection_that_sends_nothing_is_closed(server: NimbusServer) -> None:
    with connect(server) as sock:
        assert read_all(sock) == b""


def _invoked_lengths(server: NimbusServer) -> list[str]:
    return [r["message"] for r in server.logs(SPEC["name"]) if "body length" in r["message"]]


def test_a_stalled_body_gets_408_and_is_not_invoked(server: NimbusServer) -> None:
    before = _invoked_lengths(server)
    with connect(server) as sock:
        head = request_head(server, f"/function/{SPEC['name']}", b"content-length: 100\r\n")
        sock.sendall(head + b"\r\n" + b"a" * 10)
        response = read_all(sock)
    assert status_of(response) == 408, response[:200]
    # A complete request after it is invoked; the stalled one never was.
    assert server.client.post(f"/function/{SPEC['name']}", content=b"abc").status_code == 200
    after = _wait_for_more(server, before)
    assert after[len(before) :] == ["body length 3"]


def test_a_body_cut_short_is_never_invoked(server: NimbusServer) -> None:
    before = _invoked_lengths(server)
    with connect(server) as sock:
        head = request_head(server, f"/function/{SPEC['name']}", b"content-length: 100\r\n")
        sock.sendall(head + b"\r\n" + b"a" * 10)
        sock.shutdown(socket.SHUT_WR)
        read_all(sock)
    assert server.client.post(f"/function/{SPEC['name']}", content=b"abcd").status_code == 200
    after = _wait_for_more(server, before)
    assert after[len(before) :] == ["body length 4"]


def _wait_for_more(server: NimbusServer, before: list[str]) -> list[str]:
    deadline = time.monotonic() + 10
    while True:
        now = _invoked_lengths(server)
        if len(now) > len(before) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


def test_connections_from_one_address_are_capped(server: NimbusServer) -> None:
    held = []
    try:
        for _ in range(PER_CLIENT):
            sock = connect(server)
            # A request on each proves the server took it (not only the kernel's backlog).
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            held.append(sock)
        with connect(server) as extra:
            response = read_all(extra)
        assert status_of(response) == 429, response[:200]
        assert b"per client" in response
        # The test's own client, from another address, is not affected.
        assert server.client.get("/healthz").status_code == 200
    finally:
        for sock in held:
            sock.close()
    # Once they are closed, the address may connect again.
    deadline = time.monotonic() + 10
    while True:
        with connect(server) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            if status_of(read_all(sock)) == 200:
                break
        assert time.monotonic() < deadline, "the closed connections were never released"
        time.sleep(0.05)


def test_an_upload_declared_over_the_limit_is_refused_before_it_is_sent(
    server: NimbusServer,
) -> None:
    with connect(server) as sock:
        head = (
            "POST /v1/functions HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {server.admin_key}\r\n"
            "content-type: multipart/form-data; boundary=b\r\ncontent-length: 1000000000\r\n\r\n"
        )
        sock.sendall(head.encode())
        response = read_all(sock)  # answered without a byte of the body
    assert status_of(response) == 413, response[:300]
    assert error_code(response) == "RequestTooLarge"


def test_a_chunked_upload_is_cut_off_at_the_limit(server: NimbusServer, tmp_path: Path) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"--b\r\ncontent-disposition: form-data; name=code; filename=c.zip\r\n\r\n"
        for _ in range(64):  # 64 MiB, far past the 2 MiB limit
            yield b"\0" * (1 << 20)

    r = server.client.post(
        "/v1/functions",
        content=chunks(),
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "RequestTooLarge"
    assert server.client.get("/healthz").status_code == 200


def test_a_zip_entry_too_deep_is_refused(server: NimbusServer) -> None:
    deep = "d/" * 2000 + "x.py"
    r = server.create({**SPEC, "name": "limits-deep"}, make_zip({"app.py": ECHO, deep: b""}))
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "InvalidParameterValue"
    assert "levels deep" in r.json()["error"]["message"]
    assert server.client.get("/v1/functions/limits-deep").status_code == 404


def test_a_zip_of_too_many_entries_is_refused(server: NimbusServer) -> None:
    many = {"app.py": ECHO, **{f"e/{i}": b"" for i in range(300)}}
    r = server.create({**SPEC, "name": "limits-many"}, make_zip(many))
    assert r.status_code == 400, r.text
    assert "301 entries; the limit is 200" in r.json()["error"]["message"]
    assert server.client.get("/v1/functions/limits-many").status_code == 404


def test_an_early_answer_closes_the_connection_without_losing_the_response(
    server: NimbusServer,
) -> None:
    size = 20 << 20  # over the 6 MB payload limit: 413 from the declared length
    with connect(server) as sock:
        head = request_head(server, f"/function/{SPEC['name']}", b"content-length: %d\r\n" % size)
        sock.sendall(head + b"\r\n")
        sent = 0
        try:  # the client goes on sending, as HTTP clients do, while the answer comes
            while sent < size and not select.select([sock], [], [], 0)[0]:
                sock.sendall(b"a" * 65536)
                sent += 65536
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = read_all(sock)
    assert status_of(response) == 413, response[:200]
    assert b"connection: close" in response.partition(b"\r\n\r\n")[0].lower()
