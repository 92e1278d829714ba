"""Init code cannot flood the runtime zygote: a function zygote that sends anything
after its one handshake message is stopped, with one log line, and its neighbours
keep starting and serving."""

from __future__ import annotations

from tests.security.attacks import assert_unharmed
from tests.support import NimbusServer


def test_a_control_socket_flood_from_init_stops_only_that_zygote(server: NimbusServer) -> None:
    before = len(server.output())
    r = server.deploy("ctl-flooder", name="sec-ctl-flood", force=True)
    assert r.status_code == 201, r.text
    # The version serves (a new zygote floods and is stopped again, or the instance
    # runs without one); what matters is the node: quiet and healthy.
    server.invoke("sec-ctl-flood", {})
    assert_unharmed(server)
    # A neighbour deployed now starts a zygote of its own and serves.
    assert server.deploy("hello", name="sec-ctl-after").status_code == 201
    assert server.invoke("sec-ctl-after", {}).json() == {"hello": "world"}
    log = server.output()[before:]
    assert "cannot map" not in log, log[-2000:]
    assert log.count("sent an unexpected control message") <= 4, log[-2000:]
    assert len(log) < 64 * 1024, f"{len(log)} bytes of server log"
