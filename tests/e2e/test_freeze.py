"""Between invocations an instance is frozen (its cgroup's freezer), as Lambda freezes
its execution environments: what an invocation left running stops at its reply and
resumes with the next invocation; and a frozen instance still dies cleanly every way
an instance can end.

The probe (tests/fixtures/functions/freeze-probe) leaves a thread and a forked child
behind, each recording ``time.monotonic()`` every 5 ms; the clock is the instance's
(a time namespace of its own: it starts near zero), so the test compares the ticks
with the instance's own times, and waits on its own clock.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from tests.security.attacks import cgroup_pids, instance_cgroups, wait_until
from tests.support import NimbusServer, instance_pids, node_cgroups, pid_alive, running

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxed instances need root")

PROBE = "freeze-probe"
#: How long the instance stays idle (frozen) between the two invocations.
GAP = 1.0
#: Slack at each end of the gap: the freeze comes a loop turn after the reply, the thaw
#: just before the next event, and the workers may tick in between.
SLACK = 0.25


def _is_frozen(cgroup: str) -> bool:
    try:
        with open(os.path.join(cgroup, "freezer.state")) as f:  # cgroup v1
            return f.read().strip() == "FROZEN"
    except FileNotFoundError:
        pass
    try:
        with open(os.path.join(cgroup, "cgroup.events")) as f:  # cgroup v2
            return "frozen 1" in f.read().splitlines()
    except FileNotFoundError:
        return False


def frozen_instances(data_dir: Path) -> dict[str, list[int]]:
    """The node's frozen instance cgroups (v1: their freezer directory) and their pids."""
    return {c: cgroup_pids(c) for c in instance_cgroups(data_dir) if _is_frozen(c)}


def one_frozen(data_dir: Path, besides: Iterable[str] = ()) -> tuple[str, list[int]]:
    """Wait for one instance (not in ``besides``: other tests' on a shared server) to be
    frozen; its cgroup and processes."""
    others = set(besides)

    def new() -> dict[str, list[int]]:
        return {c: p for c, p in frozen_instances(data_dir).items() if c not in others}

    frozen = wait_until(new)
    assert len(frozen) == 1, f"expected one frozen instance, got {frozen}"
    ((cgroup, pids),) = frozen.items()
    # init, the instance, and the child its invocation forked (the thread is no process)
    assert len(pids) == 3, pids
    return cgroup, pids


def start(server: NimbusServer, name: str) -> dict[str, Any]:
    r = server.invoke(name, {"action": "start"})
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    assert out["child"] > 0, out
    return out


def gone(cgroup: str, pids: list[int]) -> bool:
    return not any(pid_alive(p) for p in pids) and not os.path.exists(cgroup)


@pytest.mark.parametrize("freeze", [True, False], ids=["freeze-idle", "no-freeze-idle"])
def test_what_an_invocation_left_running_stops_until_the_next_one(
    tmp_path: Path, freeze: bool
) -> None:
    args = [] if freeze else ["--no-freeze-idle"]
    with running(tmp_path / "data", args=args) as s:
        assert s.deploy(PROBE, name="frz-ticks", scaling={"max": 1}).status_code == 201
        replied = start(s, "frz-ticks")["replied"]
        if freeze:
            one_frozen(s.data_dir)
        # Idle for GAP seconds (of our clock: the instance's runs as fast, from another
        # zero); frozen all along, or never.
        until = time.monotonic() + GAP
        while time.monotonic() < until:
            assert bool(frozen_instances(s.data_dir)) is freeze
            time.sleep(0.05)
        r = s.invoke("frz-ticks", {"action": "ticks"})
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["started"], "the second invocation ran on another instance"
        entered = out["entered"]
        assert entered - replied >= GAP
        for worker in ("thread", "child"):
            ticks = out[worker]
            assert any(t <= replied for t in ticks), f"the {worker} never ran"
            during = [t for t in ticks if replied + SLACK < t < entered - SLACK]
            if freeze:
                assert during == [], f"the {worker} ran while the instance was idle: {during}"
            else:
                # Not frozen: the worker ticked through the gap (every 5 ms, ~100 times).
                assert len(during) >= 20, f"the {worker} ticked {len(during)} times"
        if freeze:
            # Thawed: both run again, and the instance is frozen again afterwards.
            r = s.invoke("frz-ticks", {"action": "ticks", "wait": True})
            assert r.json()["resumed"], r.text
            one_frozen(s.data_dir)


def test_delete_kills_a_frozen_instance_and_what_it_left(server: NimbusServer) -> None:
    assert server.deploy(PROBE, name="frz-delete", scaling={"max": 1}).status_code == 201
    before = frozen_instances(server.data_dir)
    start(server, "frz-delete")
    cgroup, pids = one_frozen(server.data_dir, before)
    assert server.client.delete("/v1/functions/frz-delete").status_code in (200, 204)
    assert wait_until(lambda: gone(cgroup, pids)), (cgroup, pids)


def test_an_idle_frozen_instance_is_reaped_after_keep_warm(server: NimbusServer) -> None:
    scaling = {"max": 1, "keep_warm": 0.5, "zygote_keep_warm": 0}
    assert server.deploy(PROBE, name="frz-reap", scaling=scaling).status_code == 201
    before = frozen_instances(server.data_dir)
    start(server, "frz-reap")
    cgroup, pids = one_frozen(server.data_dir, before)
    assert wait_until(lambda: gone(cgroup, pids)), (cgroup, pids)
    r = server.client.get("/v1/functions/frz-reap")
    assert r.json()["instances"]["total"] == 0


@pytest.mark.parametrize(
    ("event", "error_type"),
    [({"action": "stuck"}, "Sandbox.Timedout"), ({"action": "memory", "mb": 256}, "OutOfMemory")],
    ids=["timeout", "oom"],
)
def test_a_thawed_instance_still_times_out_and_runs_out_of_memory(
    server: NimbusServer, event: dict[str, Any], error_type: str
) -> None:
    name = f"frz-{event['action']}"
    assert server.deploy(PROBE, name=name, timeout=2, scaling={"max": 1}).status_code == 201
    before = frozen_instances(server.data_dir)
    start(server, name)
    cgroup, pids = one_frozen(server.data_dir, before)
    r = server.invoke(name, event)
    assert error_type in r.text, r.text
    assert wait_until(lambda: gone(cgroup, pids)), (cgroup, pids)
    # And the function goes on: a new instance serves the next invocation.
    start(server, name)
    assert server.client.delete(f"/v1/functions/{name}").status_code in (200, 204)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_frozen_instance_dies_with_the_server(tmp_path: Path, sig: int) -> None:
    with running(tmp_path / "data") as s:
        assert s.deploy(PROBE, name="frz-stop", scaling={"max": 1}).status_code == 201
        start(s, "frz-stop")
        _, pids = one_frozen(s.data_dir)
        s.stop(sig)
        # SIGKILL: the zygote, told by its parent-death signal, kills (and thaws) them.
        assert wait_until(lambda: not any(pid_alive(p) for p in pids)), pids
        assert wait_until(lambda: not instance_pids(s.data_dir)), instance_pids(s.data_dir)
        if sig == signal.SIGTERM:
            assert node_cgroups(s.data_dir) == []
