"""``network: none``: an instance has its own network namespace with only ``lo``; the
Nimbus API, and a listener the test itself runs on this machine's addresses, are
unreachable. Only this machine's own addresses are ever used."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import secrets
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.security.attacks import assert_unharmed, attack, deploy, wait_until
from tests.support import NimbusServer

#: How a connection from an empty network namespace fails: nothing listens on its
#: own loopback, and there is no route anywhere else.
UNREACHABLE = {"ECONNREFUSED", "ENETUNREACH", "EHOSTUNREACH", "EADDRNOTAVAIL"}


def host_addresses() -> list[str]:
    """This machine's own addresses (never another's): loopback plus every global or
    unique-local address of its interfaces. Link-local ones need a scope; skipped."""
    found = {"127.0.0.1", "::1"}
    if shutil.which("ip"):
        out = subprocess.run(
            ["ip", "-j", "addr"], capture_output=True, text=True, check=False
        ).stdout
        with contextlib.suppress(ValueError):
            for link in json.loads(out or "[]"):
                for a in link.get("addr_info", []):
                    addr = ipaddress.ip_address(a["local"])
                    if not addr.is_link_local and not addr.is_multicast:
                        found.add(str(addr))
    return sorted(found)


@dataclass
class Listener:
    """TCP and UDP on every address of this machine (one dual-stack port), plus an
    abstract unix socket; records anything that reaches them."""

    port: int
    abstract: str
    connections: list[str] = field(default_factory=list)
    datagrams: list[str] = field(default_factory=list)


@pytest.fixture
def listener() -> Iterator[Listener]:
    tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    tcp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    tcp.bind(("::", 0))
    tcp.listen(16)
    port = tcp.getsockname()[1]
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    udp.bind(("::", port))
    name = f"nimbus-sec-{secrets.token_hex(6)}"
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    unix.bind("\0" + name)
    unix.listen(16)
    found = Listener(port, name)
    stop = threading.Event()

    def serve() -> None:
        for s in (tcp, udp, unix):
            s.settimeout(0.05)
        while not stop.is_set():
            for s in (tcp, unix):
                with contextlib.suppress(TimeoutError):
                    conn, addr = s.accept()
                    found.connections.append(repr(addr) if addr else "unix")
                    conn.close()
            with contextlib.suppress(TimeoutError):
                _, addr = udp.recvfrom(100)
                found.datagrams.append(repr(addr))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join(5)
        for s in (tcp, udp, unix):
            s.close()


def test_only_loopback_and_nothing_of_the_host_is_reachable(
    server: NimbusServer, listener: Listener
) -> None:
    # The listener works: the host itself can reach it on every address.
    addresses = host_addresses()
    for host in addresses:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect((host, listener.port))
    assert wait_until(lambda: len(listener.connections) == len(addresses), 5), (
        f"the test's own listener is not reachable from the host: {listener.connections}"
    )
    listener.connections.clear()

    deploy(server, "sec-network")
    tcp = [["127.0.0.1", server.port], ["::1", server.port]]
    tcp += [[host, listener.port] for host in addresses]
    result = attack(
        server,
        "sec-network",
        {
            "attack": "network",
            "tcp": tcp,
            "udp": [[host, listener.port] for host in addresses],
            "abstract": [listener.abstract],
        },
    )
    assert result["interfaces"] == ["lo"], f"interfaces inside: {result['interfaces']}"
    for target, outcome in result["tcp"].items():
        assert not outcome["ok"], f"connected to {target}: {outcome}"
        assert outcome["errno"] in UNREACHABLE, f"connecting to {target}: {outcome}"
    outcome = result["unix"][listener.abstract]
    assert not outcome["ok"], f"connected to the host's abstract socket: {outcome}"
    assert outcome["errno"] == "ECONNREFUSED", outcome
    # UDP sends may "succeed" into the sandbox's own loopback: what matters is arrival.
    wait_until(lambda: listener.connections or listener.datagrams, timeout=1)
    assert listener.connections == [], f"the host's listener was reached: {listener.connections}"
    assert listener.datagrams == [], f"the host's UDP port got: {listener.datagrams}"
    assert_unharmed(server)
