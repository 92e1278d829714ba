"""``network: egress`` end to end: out through NAT to a test host in a network
namespace this test makes; never to the host, the API, or link-local.

Traffic goes only to addresses on this machine: the test's own namespace and
the host's addresses.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import NimbusServer, free_port, running

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("iptables") is None or shutil.which("ip") is None,
    reason="needs root, iproute2 and iptables (make installs them)",
)

ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(16)
print("listening", flush=True)
while True:
    c, peer = s.accept()
    c.recv(100); c.sendall(b"pong from test host\\n"); c.close()
"""


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def test_host() -> Iterator[tuple[str, str, int]]:
    """A namespace of our own with an echo server: (its address, host-side address, port)."""
    tag = secrets.token_hex(3)
    ns, host_if = f"nbtest-{tag}", f"nbt{tag}"
    third = int(tag[:2], 16)
    host_ip, peer_ip = f"10.251.{third}.1", f"10.251.{third}.2"
    port = free_port()
    sh("ip", "netns", "add", ns)
    server = None
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{host_ip}/30", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        sh("ip", "-n", ns, "addr", "add", f"{peer_ip}/30", "dev", "eth0")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", host_ip)
        server = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", ECHO_SERVER, peer_ip, str(port)],
            stdout=subprocess.PIPE,
        )
        assert server.stdout is not None and server.stdout.readline() == b"listening\n"
        yield peer_ip, host_ip, port
    finally:
        if server is not None:
            server.kill()
            server.wait()
            if server.stdout is not None:
                server.stdout.close()
        with contextlib.suppress(subprocess.CalledProcessError):
            sh("ip", "link", "del", host_if)
        sh("ip", "netns", "del", ns)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NimbusServer]:
    with running(tmp_path_factory.mktemp("nimbus") / "data") as s:
        yield s


def node_id(server: NimbusServer) -> str:
    return hashlib.sha256(str(server.data_dir.resolve()).encode()).hexdigest()[:12]


def test_egress_reaches_a_test_host_but_not_the_host_or_link_local(
    server: NimbusServer, test_host: tuple[str, str, int]
) -> None:
    peer_ip, host_ip, port = test_host
    assert server.deploy("netprobe", name="net-egress").status_code == 201
    api_port = server.port
    out = server.invoke(
        "net-egress",
        {"targets": [[peer_ip, port], [host_ip, api_port], ["127.0.0.1", api_port]]},
    ).json()
    assert out[f"{peer_ip}:{port}"] == "ok:pong from test host"
    # The host, through any of its addresses, is not reachable: neither is the API.
    assert out[f"{host_ip}:{api_port}"].startswith("error:")
    # 127.0.0.1 is the sandbox's own loopback, where nothing listens.
    assert out[f"127.0.0.1:{api_port}"].startswith("error:")

    # Prove the link-local and host blocks from the rules inside the namespace.
    netns = f"nimbus-{node_id(server)}-0"
    routes = sh("ip", "-n", netns, "route")
    assert "unreachable 169.254.0.0/16" in routes
    assert f"unreachable {host_ip}" in routes
    rules = sh("ip", "netns", "exec", netns, "iptables", "-S", "OUTPUT")
    assert "-A OUTPUT -d 169.254.0.0/16 -j REJECT" in rules
    assert f"-A OUTPUT -d {host_ip}/32 -j REJECT" in rules
    host_rules = sh("iptables", "-S", "INPUT")
    assert f"nimbus:{node_id(server)}" in host_rules and "-j DROP" in host_rules


def test_instances_of_one_function_share_its_namespace(server: NimbusServer) -> None:
    def namespaces() -> set[str]:
        return {n for n in os.listdir("/run/netns") if n.startswith(f"nimbus-{node_id(server)}-")}

    before = namespaces()
    assert server.deploy("netprobe", name="net-shared", scaling={"keep_warm": 0}).status_code == 201
    for _ in range(3):  # each call is a new instance (keep_warm 0); one namespace serves all
        assert server.invoke("net-shared", {"targets": []}).status_code == 200
    assert len(namespaces() - before) == 1


def test_network_none_reaches_nothing(
    server: NimbusServer, test_host: tuple[str, str, int]
) -> None:
    peer_ip, _, port = test_host
    assert server.deploy("netprobe", name="net-none", network="none").status_code == 201
    out = server.invoke("net-none", {"targets": [[peer_ip, port]]}).json()
    assert out[f"{peer_ip}:{port}"].startswith("error:")


def test_delete_and_shutdown_remove_namespaces_and_rules(tmp_path: Path) -> None:
    with running(tmp_path / "data") as s:
        assert s.deploy("netprobe", name="net-gone").status_code == 201
        assert s.invoke("net-gone", {"targets": []}).status_code == 200
        prefix = f"nimbus-{node_id(s)}-"
        assert any(n.startswith(prefix) for n in os.listdir("/run/netns"))
        assert s.client.delete("/v1/functions/net-gone").status_code == 204
        deadline = time.monotonic() + 5
        while any(n.startswith(prefix) for n in os.listdir("/run/netns")):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert s.deploy("netprobe", name="net-gone2").status_code == 201
        assert s.invoke("net-gone2", {"targets": []}).status_code == 200
        s.stop()
        assert not any(n.startswith(prefix) for n in os.listdir("/run/netns"))
        assert f"nimbus:{node_id(s)}" not in sh("iptables-save")


def test_a_public_only_namespace_reaches_no_private_network(
    tmp_path: Path, test_host: tuple[str, str, int]
) -> None:
    """What dependency builds get: the test host (a private address) is out of reach,
    unless the operator allowed its network; the name servers stay reachable."""
    import asyncio

    from nimbus.executor.sandbox.network import EgressNetworks, name_servers

    peer_ip, _, port = test_host
    probe = (
        "import socket, sys\n"
        "try:\n"
        "    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()\n"
        "    print('ok')\n"
        "except OSError as e:\n"
        "    print('error', e.errno)\n"
    )

    async def scenario() -> tuple[str, str, str]:
        nets = EgressNetworks(secrets.token_hex(6))
        await nets.prepare()
        try:
            closed = await nets.ensure("!build", public_only=True)
            opened = await nets.ensure("!build-allowed", public_only=True, allow=("10.251.0.0/16",))
            outs = []
            for net in (closed, opened):
                outs.append(sh("ip", "netns", "exec", net.name, sys.executable, "-c", probe,
                               peer_ip, str(port)).strip())  # fmt: skip
            rules = sh("ip", "netns", "exec", closed.name, "iptables", "-S", "OUTPUT")
            return outs[0], outs[1], rules
        finally:
            await nets.close()

    closed, opened, rules = asyncio.run(scenario())
    assert closed.startswith("error"), closed
    assert opened == "ok"
    assert "-A OUTPUT -d 10.0.0.0/8 -j REJECT" in rules
    for server in name_servers():
        assert f"-A OUTPUT -d {server}/32 -p udp -m udp --dport 53 -j ACCEPT" in rules
