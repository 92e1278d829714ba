"""Outbound networking for ``network: egress`` functions: a namespace per function.

Made once per function (not per instance: instances of one function share it)
with ``ip`` and ``iptables`` (Debian's iproute2 and iptables packages), kept
until the function is deleted or the node stops::

    host ── nb<node><n> (100.80.x.y/30, the gateway) ══ veth ══ eth0 (…y+1/30) ── function netns

- Outbound traffic is forwarded and masqueraded by the host.
- The host itself is unreachable from the namespace: its INPUT chain drops
  everything arriving on this node's veths (so the Nimbus API and every
  host service, loopback-bound or not, are out of reach).
- Inside the namespace, link-local ``169.254.0.0/16``, the gateway and every
  address of the host have ``unreachable`` routes and ``REJECT`` rules: the
  function cannot change either (it has no capabilities), and the rules can
  be read back (``ip netns exec … ip route``) to prove it.
- Sandboxes cannot reach each other (FORWARD drops veth-to-veth); IPv6 is
  disabled inside.
- A namespace made ``public_only`` (dependency builds) also rejects every private
  range (RFC 1918, shared address space, benchmarking), but the host's name servers
  and what the operator allowed: a build reaches package indexes on the internet,
  not the network the node sits in.

Forwarding (``net.ipv4.ip_forward``) is switched on for the host when the
first egress namespace is made, and left on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
from collections import defaultdict
from dataclasses import dataclass

log = logging.getLogger("nimbus.network")

SUBNET = ipaddress.IPv4Network("100.80.0.0/16")
LINK_LOCAL = "169.254.0.0/16"
#: What a ``public_only`` namespace rejects besides the host and link-local.
PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10", "198.18.0.0/15")


def name_servers(resolv_conf: str = "/etc/resolv.conf") -> list[str]:
    """The IPv4 name servers the host uses (a build must reach them, private or not)."""
    found = []
    try:
        with open(resolv_conf) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    with contextlib.suppress(ValueError):
                        if ipaddress.ip_address(parts[1]).version == 4:
                            found.append(parts[1])
    except OSError:
        pass
    return found


class NetworkUnavailable(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Egress:
    function: str
    name: str  # the netns name, under /run/netns
    host_if: str
    gateway: str
    address: str

    @property
    def path(self) -> str:
        return f"/run/netns/{self.name}"


async def _run(*argv: str, stdin: str | None = None, check: bool = True) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await proc.communicate(stdin.encode() if stdin is not None else None)
    text = out.decode(errors="replace")
    if check and proc.returncode != 0:
        raise NetworkUnavailable(f"{' '.join(argv)} failed: {text.strip()}")
    return text


class EgressNetworks:
    """The egress namespaces of one node (``node_id`` keeps nodes apart)."""

    def __init__(self, node_id: str) -> None:
        self._tag = node_id[:5]
        self._comment = f"nimbus:{node_id}"
        self._prefix = f"nimbus-{node_id}-"
        self._nets: dict[str, Egress] = {}
        self._locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._next = 0
        self._host_ready = False

    @property
    def available(self) -> str | None:
        """None when ``ip`` and ``iptables`` are installed, else why not."""
        missing = [t for t in ("ip", "iptables", "iptables-restore") if shutil.which(t) is None]
        if missing:
            return f"egress networking needs {', '.join(missing)} (Debian: iproute2, iptables)"
        return None

    def _veth_glob(self) -> str:
        return f"nb{self._tag}+"

    def _host_rules(self) -> list[tuple[str, ...]]:
        veths, c = self._veth_glob(), ("-m", "comment", "--comment", self._comment)
        return [
            ("filter", "INPUT", "-i", veths, *c, "-j", "DROP"),
            ("filter", "FORWARD", "-i", veths, "-d", LINK_LOCAL, *c, "-j", "DROP"),
            ("filter", "FORWARD", "-i", veths, "-o", veths, *c, "-j", "DROP"),
            ("filter", "FORWARD", "-i", veths, *c, "-j", "ACCEPT"),
            ("filter", "FORWARD", "-o", veths, "-m", "conntrack", "--ctstate",
             "RELATED,ESTABLISHED", *c, "-j", "ACCEPT"),
            ("nat", "POSTROUTING", "-s", str(SUBNET), "!", "-d", str(SUBNET), *c,
             "-j", "MASQUERADE"),
        ]  # fmt: skip

    async def _host_setup(self) -> None:
        if self._host_ready:
            return
        problem = self.available
        if problem:
            raise NetworkUnavailable(problem)
        await self._remove_host_rules()
        # Inserted in reverse so they end up first, in order, ahead of other rules.
        for table, chain, *rule in reversed(self._host_rules()):
            await _run("iptables", "-w", "-t", table, "-I", chain, "1", *rule)
        with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
            f.write("1")
        self._host_ready = True

    async def _remove_host_rules(self) -> None:
        for table, chain, *rule in self._host_rules():
            for _ in range(10):  # a crashed run may have left duplicates
                # Silent on success; once the rule is gone, iptables says so and we stop.
                out = await _run("iptables", "-w", "-t", table, "-D", chain, *rule, check=False)
                if out:
                    break

    async def prepare(self) -> None:
        """Remove what a previous run of this node left (namespaces, links, rules)."""
        if self.available:
            return
        with contextlib.suppress(FileNotFoundError):
            for name in os.listdir("/run/netns"):
                if name.startswith(self._prefix):
                    await _run("ip", "netns", "del", name, check=False)
        links = await _run("ip", "-o", "link", "show", check=False)
        for line in links.splitlines():
            parts = line.split(":")
            if len(parts) > 1:
                ifname = parts[1].strip().split("@")[0]
                if ifname.startswith(f"nb{self._tag}"):
                    await _run("ip", "link", "del", ifname, check=False)
        await self._remove_host_rules()

    async def ensure(
        self, function: str, *, public_only: bool = False, allow: tuple[str, ...] = ()
    ) -> Egress:
        """The function's egress namespace, made on first use (``public_only``: no
        private ranges either, but the name servers and the ``allow``ed networks)."""
        async with self._locks[function]:
            net = self._nets.get(function)
            if net is not None:
                return net
            await self._host_setup()
            # Another node on this machine may hold the next block already: skip those.
            taken = set(await self._host_addresses())
            while True:
                index = self._next
                self._next += 1
                block = list(SUBNET.subnets(new_prefix=30))[index % 16384]
                gateway, address = (str(h) for h in block.hosts())
                if gateway not in taken or self._next > 16384:
                    break
            net = Egress(
                function=function,
                name=f"{self._prefix}{index}",
                host_if=f"nb{self._tag}{index:04x}"[:15],
                gateway=gateway,
                address=address,
            )
            try:
                await self._create(net, public_only=public_only, allow=allow)
            except NetworkUnavailable:
                await self._destroy(net)
                raise
            self._nets[function] = net
            return net

    async def _host_addresses(self) -> list[str]:
        out = await _run("ip", "-4", "-o", "addr", "show")
        found = []
        for line in out.split("\n"):
            fields = line.split()
            if "inet" in fields:
                addr = fields[fields.index("inet") + 1].split("/")[0]
                if not addr.startswith("127."):
                    found.append(addr)
        return found

    async def _create(
        self, net: Egress, *, public_only: bool = False, allow: tuple[str, ...] = ()
    ) -> None:
        ns, peer = net.name, f"{net.host_if}p"[:15]
        await _run(
            "ip",
            "-batch",
            "-",
            stdin="\n".join(
                [
                    f"netns add {ns}",
                    f"link add {net.host_if} type veth peer name {peer}",
                    f"link set {peer} netns {ns}",
                    f"addr add {net.gateway}/30 dev {net.host_if}",
                    f"link set {net.host_if} up",
                ]
            )
            + "\n",
        )
        inside = [
            "link set lo up",
            f"link set {peer} name eth0",
            f"addr add {net.address}/30 dev eth0",
            "link set eth0 up",
            f"route add default via {net.gateway}",
            f"route add unreachable {LINK_LOCAL}",
        ]
        blocked = list(dict.fromkeys([net.gateway, *await self._host_addresses()]))
        inside += [f"route add unreachable {a}/32" for a in blocked]
        await _run("ip", "-n", ns, "-batch", "-", stdin="\n".join(inside) + "\n")
        rules = ["*filter", ":INPUT ACCEPT [0:0]", ":FORWARD ACCEPT [0:0]", ":OUTPUT ACCEPT [0:0]"]
        for dest in (LINK_LOCAL, *(f"{a}/32" for a in blocked)):
            rules.append(f"-A OUTPUT -d {dest} -j REJECT --reject-with icmp-net-unreachable")
        if public_only:
            for server in name_servers():
                rules.append(f"-A OUTPUT -d {server}/32 -p udp --dport 53 -j ACCEPT")
                rules.append(f"-A OUTPUT -d {server}/32 -p tcp --dport 53 -j ACCEPT")
            for network in allow:
                rules.append(f"-A OUTPUT -d {network} -j ACCEPT")
            for dest in PRIVATE:
                rules.append(f"-A OUTPUT -d {dest} -j REJECT --reject-with icmp-net-unreachable")
        rules.append("COMMIT")
        await _run("ip", "netns", "exec", ns, "iptables-restore", stdin="\n".join(rules) + "\n")
        await _run(
            "ip", "netns", "exec", ns, "sh", "-c",
            "echo 1 > /proc/sys/net/ipv6/conf/all/disable_ipv6",
        )  # fmt: skip

    async def _destroy(self, net: Egress) -> None:
        await _run("ip", "link", "del", net.host_if, check=False)
        await _run("ip", "netns", "del", net.name, check=False)

    async def remove(self, function: str) -> None:
        async with self._locks[function]:
            net = self._nets.pop(function, None)
            if net is not None:
                await self._destroy(net)

    async def close(self) -> None:
        for function in list(self._nets):
            await self.remove(function)
        if self._host_ready:
            await self._remove_host_rules()
            self._host_ready = False
