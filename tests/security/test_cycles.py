"""A hundred instances started and ended in every way an instance can end leave no
process, cgroup or mount behind (on a server of their own, to see the whole node)."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.security.attacks import (
    FIRST_UID,
    NEIGHBOUR,
    POOL,
    assert_unharmed,
    cgroup_pids,
    deploy,
    describe_pids,
    function_error,
    instance_cgroups,
    invoke,
    mount_count,
    proc_uid,
    processes_named,
    unique,
    wait_no_instances,
    wait_until,
    zygote_pid,
)
from tests.support import NimbusServer, instance_pids, node_cgroups, running

CYCLES = 100

EVENTS: dict[str, dict[str, Any]] = {
    "hello": {"attack": "hello"},
    "timeout": {"attack": "stuck"},
    "oom": {"attack": "memory", "mb": 256},
    "exit": {"attack": "exit", "code": 3},
    "orphans": {"attack": "orphans", "count": 2},
    "forkbomb": {"attack": "forkbomb", "max": 50},
}
EXPECTED_ERROR = {"timeout": "Timeout", "oom": "OutOfMemory", "exit": "Crash"}


def plan(n: int) -> str:
    """How the n-th instance ends: mostly normally, and every other way in between."""
    return {3: "timeout", 7: "oom", 11: "exit", 15: "orphans", 19: "forkbomb"}.get(n % 20, "hello")


def what_is_left(data: Path, zygote: int) -> str | None:
    """None when the node holds only its zygote and its ready sandboxes; else what is wrong.

    A ready sandbox is an instance cgroup whose processes all run as root: a function's
    instance runs as the function's uid (>= 200,000)."""
    pids = set(instance_pids(data)) - {zygote}
    cgroups = instance_cgroups(data)
    members = {c: cgroup_pids(c) for c in cgroups}
    problems = []
    instances = sorted(p for p in pids if (proc_uid(p) or 0) >= FIRST_UID)
    if instances:
        problems.append(f"instance processes left:\n{describe_pids(instances)}")
    stray = sorted(pids - {p for m in members.values() for p in m})
    if stray:
        problems.append(f"processes outside any instance cgroup:\n{describe_pids(stray)}")
    empty = [c for c, m in members.items() if not m]
    if empty:
        problems.append(f"empty instance cgroups: {empty}")
    foreign = {c: m for c, m in members.items() if not set(m) <= pids}
    if foreign:
        problems.append(f"cgroups holding what is not the node's: {foreign}")
    ready = {os.path.basename(c) for c, m in members.items() if m and set(m) <= pids}
    if len(ready) != POOL:
        problems.append(f"{len(ready)} sandboxes ready, the pool is {POOL}: {sorted(ready)}")
    return "\n".join(problems) or None


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NimbusServer]:
    """A server of its own: the test looks at every process and cgroup of the node."""
    with running(tmp_path / "data") as s:
        # No function zygote made ahead for it: the node must hold only what the test
        # expects (the runtime zygote and its ready sandboxes).
        deploy(s, NEIGHBOUR, "hello", scaling={"zygote_keep_warm": 0})
        yield s


def test_start_kill_cycles_leave_nothing_behind(node: NimbusServer) -> None:
    data = node.data_dir
    mounts = mount_count()
    zygote = zygote_pid(data)
    assert "zygote/main.py" in Path(f"/proc/{zygote}/cmdline").read_text()

    # keep_warm 0 for instances and for the function zygote: nothing should outlive a cycle.
    deploy(node, "sec-cycles", timeout=1, scaling={"keep_warm": 0, "zygote_keep_warm": 0})
    marker = unique("nbcyc-")
    outcomes: Counter[str] = Counter()
    for n in range(CYCLES):
        how = plan(n)
        r = invoke(node, "sec-cycles", {**EVENTS[how], "marker": marker})
        error, body = function_error(r)
        assert error == EXPECTED_ERROR.get(how), f"cycle {n} ({how}): {error} {body}"
        outcomes[how] += 1
    assert sum(outcomes.values()) == CYCLES and len(outcomes) == len(EVENTS), outcomes

    wait_no_instances(node, "sec-cycles")
    left = processes_named(marker)
    assert wait_until(lambda: not processes_named(marker), 10), describe_pids(left)
    # The node is back to its zygote and its ready sandboxes (refilled in the background).
    wait_until(lambda: what_is_left(data, zygote) is None, 15, interval=0.1)
    assert what_is_left(data, zygote) is None, what_is_left(data, zygote)
    assert zygote_pid(data) == zygote
    # Every sandbox mounted in a mount namespace of its own.
    assert mount_count() == mounts
    assert_unharmed(node)

    # And once the server stops, nothing of the node is left at all.
    node.stop()
    assert wait_until(lambda: not instance_pids(data), 10), describe_pids(instance_pids(data))
    assert wait_until(lambda: not node_cgroups(data), 10), node_cgroups(data)
    assert mount_count() == mounts
