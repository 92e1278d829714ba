"""Where Nimbus itself may send requests on a user's behalf: callbacks and destinations.

An ``X-Callback-Url`` or an ``async.on_success`` URL is written by whoever calls or
deploys a function; Nimbus POSTs to it from the node. Unchecked, that is a
server-side request forgery: the node's own API, its loopback services, the
cloud's metadata address, the private network behind it. So a target must be a
*public* address (``ipaddress``'s ``is_global``) and none of the node's own:

* :func:`check_url` at accept time (a request, a deploy): the scheme, and a host that
  is a refused literal in any notation (``127.0.0.1``, ``[::ffff:127.0.0.1]``,
  ``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``…) or a loopback name
  (``localhost``, ``*.localhost``) is a ``400``.
* :meth:`OutboundPolicy.resolve` at send time: the name is resolved, *every*
  address it has must pass, and the connection goes to that checked address (the
  name only for ``Host``/TLS), so a name that resolves to a public address when
  checked and to a private one when connected (DNS rebinding) cannot get through.

Operators who do want internal targets list them (``--outbound-allow``:
``10.1.0.0/16``, ``hooks.internal``); nothing else is allowed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from nimbus.errors import InvalidParameterValue

__all__ = ["OutboundPolicy", "OutboundRefused", "check_url", "literal_address", "local_addresses"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")
MAX_URL = 2048


class OutboundRefused(InvalidParameterValue):
    """A callback or destination that would reach a non-public or the node's own address."""


def literal_address(host: str) -> Address | None:
    """``host`` as an IP address, in any notation the C library would accept (dotted,
    one number, hexadecimal or octal parts, an IPv6 literal with or without brackets,
    IPv4-mapped IPv6 reduced to its IPv4 address), or None for a name."""
    text = host.strip().strip("[]")
    if "%" in text:  # a zone id: only link-local addresses have one
        text = text.split("%", 1)[0]
    try:
        address: Address = ipaddress.ip_address(text)
    except ValueError:
        try:
            address = ipaddress.IPv4Address(socket.inet_aton(text))  # 2130706433, 0x7f.1…
        except OSError:
            return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return bool(address.is_global) and not address.is_multicast


def check_url(url: str, what: str, allow: OutboundPolicy | None = None) -> str:
    """``url`` if it may be a callback or destination (see the module docstring), else
    :class:`OutboundRefused` naming ``what`` it is."""
    policy = allow or OutboundPolicy()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or len(url) > MAX_URL:
        raise InvalidParameterValue(f"{what} must be an http(s) URL (got {url[:100]!r})")
    host = parts.hostname
    if policy.allows_name(host):
        return url
    address = literal_address(host)
    if address is not None and not policy.allows_address(address):
        raise OutboundRefused(
            f"{what} must reach a public address, not {host} (loopback, private, link-local "
            "and the node's own addresses are refused; an operator can allow some with "
            "--outbound-allow)"
        )
    lowered = host.lower().rstrip(".")
    if lowered in _LOOPBACK_NAMES or lowered.endswith(".localhost"):
        raise OutboundRefused(f"{what} must not name the node itself ({host})")
    return url


@dataclass(frozen=True)
class OutboundPolicy:
    """What besides public addresses an operator allows (networks and host names)."""

    networks: tuple[Network, ...] = ()
    names: frozenset[str] = frozenset()
    #: The node's own addresses (refused even when public); None: read them when needed.
    own: frozenset[Address] | None = None

    @classmethod
    def parse(cls, spec: str) -> OutboundPolicy:
        """``"10.1.0.0/16, hooks.internal"`` (comma or space separated)."""
        networks: list[Network] = []
        names: set[str] = set()
        for item in spec.replace(",", " ").split():
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                if not item.replace("-", "").replace(".", "").isalnum():
                    raise InvalidParameterValue(
                        f"--outbound-allow: {item!r} is neither a network nor a host name"
                    ) from None
                names.add(item.lower().rstrip("."))
        return cls(tuple(networks), frozenset(names))

    def allows_name(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.names

    def allows_address(self, address: Address) -> bool:
        if any(address in net for net in self.networks):
            return True
        own = self.own if self.own is not None else local_addresses()
        return is_public(address) and address not in own

    async def resolve(self, host: str, port: int) -> str:
        """The address to connect to for ``host``: every address the name has must be
        allowed (else :class:`OutboundRefused`); the first of them."""
        literal = literal_address(host)
        if literal is not None:
            if not self.allows_address(literal) and not self.allows_name(host):
                raise OutboundRefused(f"{host} is not a public address")
            return str(literal)
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        addresses = [literal_address(str(info[4][0])) for info in infos]
        found = [a for a in addresses if a is not None]
        if not found:
            raise OutboundRefused(f"{host} has no address")
        if not self.allows_name(host):
            refused = [a for a in found if not self.allows_address(a)]
            if refused:
                raise OutboundRefused(
                    f"{host} resolves to {refused[0]}, which is not a public address"
                )
        return str(found[0])


def local_addresses() -> frozenset[Address]:
    """Every address of this node's interfaces (IPv4 from /proc/net/fib_trie's LOCAL
    entries, IPv6 from /proc/net/if_inet6)."""
    found: set[Address] = set()
    try:
        with open("/proc/net/fib_trie") as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    for previous, line in itertools.pairwise(lines):
        if line.strip() == "/32 host LOCAL":
            address = literal_address(previous.strip().lstrip("|-").strip())
            if address is not None:
                found.add(address)
    try:
        with open("/proc/net/if_inet6") as f:
            for row in f:
                hexa = row.split()[0]
                found.add(ipaddress.IPv6Address(int(hexa, 16)))
    except (OSError, ValueError, IndexError):
        pass
    return frozenset(found)
