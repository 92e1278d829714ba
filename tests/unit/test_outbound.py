"""nimbus.outbound: callbacks and destinations reach public addresses only."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from nimbus.errors import InvalidParameterValue
from nimbus.outbound import OutboundPolicy, OutboundRefused, check_url, literal_address

NO_OWN = OutboundPolicy(own=frozenset())

#: Every spelling of a non-public address an attacker tried, and more.
REFUSED = [
    "http://127.0.0.1/",
    "http://127.0.0.1:8080/v1/functions/x/invoke",
    "http://localhost/",
    "http://LOCALHOST./",
    "http://api.localhost/",
    "http://ip6-localhost/",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[0:0:0:0:0:ffff:7f00:1]/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://0x7f000001/",
    "http://0177.0.0.1/",
    "http://127.1/",
    "http://0/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1%25eth0]/",
    "http://10.0.0.5/",
    "http://172.16.3.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://[fd00::1]/",
    "http://224.0.0.1/",
    "https://[::ffff:10.0.0.1]:8443/x",
]


@pytest.mark.parametrize("url", REFUSED)
def test_refused_in_every_notation(url: str) -> None:
    with pytest.raises(InvalidParameterValue):
        check_url(url, "X-Callback-Url", NO_OWN)


@pytest.mark.parametrize(
    "url", ["https://hooks.example.com/cb", "http://93.184.215.14/x", "http://[2606:4700::1]/"]
)
def test_public_targets_pass(url: str) -> None:
    assert check_url(url, "X-Callback-Url", NO_OWN) == url


def test_bad_urls_are_refused_with_a_clear_message() -> None:
    for url in (
        "ftp://x/y",
        "/relative",
        "http://",
        "javascript:alert(1)",
        "http://a/" + "x" * 3000,
    ):
        with pytest.raises(InvalidParameterValue, match="must be an http"):
            check_url(url, "X-Callback-Url", NO_OWN)


def test_the_nodes_own_public_address_is_refused() -> None:
    own = OutboundPolicy(own=frozenset({ipaddress.ip_address("93.184.215.14")}))
    with pytest.raises(OutboundRefused):
        check_url("http://93.184.215.14/", "x", own)


def test_an_operator_allows_networks_and_names() -> None:
    policy = OutboundPolicy.parse("10.1.0.0/16, hooks.internal 127.0.0.1/32")
    assert check_url("http://10.1.2.3/x", "x", policy)
    assert check_url("http://127.0.0.1:9/x", "x", policy)
    assert check_url("http://hooks.internal/x", "x", policy)
    with pytest.raises(OutboundRefused):
        check_url("http://10.2.0.1/x", "x", policy)
    with pytest.raises(InvalidParameterValue, match="neither a network nor a host name"):
        OutboundPolicy.parse("10.1.0.0/16, bad/host!")


def test_literal_addresses() -> None:
    assert literal_address("2130706433") == ipaddress.ip_address("127.0.0.1")
    assert literal_address("[::ffff:127.0.0.1]") == ipaddress.ip_address("127.0.0.1")
    assert literal_address("example.com") is None


def test_resolve_checks_every_address_of_a_name() -> None:
    # localhost resolves to loopback (from /etc/hosts): refused at send time even when a
    # check at accept time was fooled by some other name.
    with pytest.raises(OutboundRefused, match="not a public address"):
        asyncio.run(NO_OWN.resolve("localhost", 80))
    allowed = OutboundPolicy.parse("127.0.0.0/8")
    assert asyncio.run(allowed.resolve("localhost", 80)) in ("127.0.0.1", "::1")
    with pytest.raises(OutboundRefused):
        asyncio.run(NO_OWN.resolve("0x7f.1", 80))


def test_the_node_knows_its_own_addresses() -> None:
    from nimbus.outbound import local_addresses

    assert ipaddress.ip_address("127.0.0.1") in local_addresses()
