"""Resource attacks: fork bombs, memory hogs, runaway and stuck instances. Each is
contained by the instance's cgroup and timeout, leaves nothing behind, and the
host and a neighbour keep serving."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

from tests.security.attacks import (
    PeakRss,
    assert_no_leaked_cgroups,
    assert_unharmed,
    attack,
    deploy,
    describe_pids,
    function_error,
    invoke,
    processes_named,
    unique,
    wait_no_instances,
    wait_until,
)
from tests.support import NimbusServer, node_cgroups, running

PIDS_MAX = 1024


def test_fork_bomb_hits_the_pids_limit(server: NimbusServer) -> None:
    # Enough memory that the pids limit, not the memory limit, is what stops it.
    deploy(server, "sec-forkbomb", memory=1024, scaling={"keep_warm": 0})
    marker = unique("nbfb-")
    result = attack(server, "sec-forkbomb", {"attack": "forkbomb", "marker": marker})
    assert result["failure"] is not None, f"forked {result['children']} times without a failure"
    assert result["failure"]["errno"] == "EAGAIN", result
    # init and the instance count too: the bomb gets the rest of the 1,024.
    assert PIDS_MAX - 16 <= result["children"] <= PIDS_MAX - 2, result

    # keep_warm 0: the instance is stopped now, and every child with it.
    wait_no_instances(server, "sec-forkbomb")
    left = wait_until(lambda: not processes_named(marker), 10)
    assert left, f"fork bomb children still alive:\n{describe_pids(processes_named(marker))}"
    assert_no_leaked_cgroups(server.data_dir)
    assert attack(server, "sec-forkbomb", {"attack": "hello"})["hello"] == "from the attacker"
    assert_unharmed(server)


def test_fork_bomb_with_little_memory_is_contained_too(server: NimbusServer) -> None:
    # At 128 MB the memory limit may stop the bomb first: either way, it is contained.
    deploy(server, "sec-forkbomb-small", scaling={"keep_warm": 0})
    marker = unique("nbfs-")
    r = invoke(server, "sec-forkbomb-small", {"attack": "forkbomb", "marker": marker})
    error, body = function_error(r)
    if error is None:
        assert body["failure"]["errno"] == "EAGAIN", body
    else:
        assert (error, body["errorType"]) == ("OutOfMemory", "Runtime.OutOfMemory"), body
    wait_no_instances(server, "sec-forkbomb-small")
    left = wait_until(lambda: not processes_named(marker), 10)
    assert left, f"fork bomb children still alive:\n{describe_pids(processes_named(marker))}"
    assert_no_leaked_cgroups(server.data_dir)
    assert_unharmed(server)


def test_allocating_twice_the_memory_is_out_of_memory(server: NimbusServer) -> None:
    deploy(server, "sec-memory", memory=128)
    r = invoke(server, "sec-memory", {"attack": "memory", "mb": 256})
    error, body = function_error(r)
    assert error == "OutOfMemory", f"allocating 256 MB in a 128 MB function: {error} {body}"
    assert body["errorType"] == "Runtime.OutOfMemory", body
    # The next invocation gets a new instance, and works.
    again = attack(server, "sec-memory", {"attack": "hello"})
    assert again["hello"] == "from the attacker"
    # Up to the limit is fine.
    assert attack(server, "sec-memory", {"attack": "memory", "mb": 64})["allocated_mb"] == 64
    assert_no_leaked_cgroups(server.data_dir)
    assert_unharmed(server)


def test_runaway_that_ignores_sigterm_and_double_forks_is_killed(server: NimbusServer) -> None:
    deploy(server, "sec-runaway", timeout=2)
    marker = unique("nbrun-")
    seen: list[int] = []
    done = threading.Event()

    def watch() -> None:  # proves the runaway processes really existed
        while not done.is_set():
            seen.append(len(processes_named(marker)))
            done.wait(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        r = invoke(server, "sec-runaway", {"attack": "runaway", "marker": marker})
    finally:
        done.set()
        watcher.join(5)
    error, body = function_error(r)
    assert error == "Timeout", f"{error}: {body}"
    assert body["errorMessage"] == "Task timed out after 2.00 seconds", body
    # Two children, each with a setsid grandchild: four processes ignoring SIGTERM.
    assert max(seen, default=0) >= 4, f"the runaway never got going: {seen}"
    left = wait_until(lambda: not processes_named(marker), 10)
    assert left, f"runaway processes survived:\n{describe_pids(processes_named(marker))}"
    assert_no_leaked_cgroups(server.data_dir)
    # A new instance serves the next call.
    assert attack(server, "sec-runaway", {"attack": "hello"})["hello"] == "from the attacker"
    assert_unharmed(server)


def test_stuck_instance_is_killed_and_replaced(server: NimbusServer) -> None:
    deploy(server, "sec-stuck", timeout=2)
    marker = unique("nbstk-")
    r = invoke(server, "sec-stuck", {"attack": "stuck", "marker": marker})
    error, body = function_error(r)
    assert error == "Timeout", f"{error}: {body}"
    assert body["errorMessage"] == "Task timed out after 2.00 seconds", body
    left = wait_until(lambda: not processes_named(marker), 10)
    assert left, f"the stuck instance is still alive:\n{describe_pids(processes_named(marker))}"
    assert_no_leaked_cgroups(server.data_dir)
    assert attack(server, "sec-stuck", {"attack": "hello"})["hello"] == "from the attacker"
    assert_unharmed(server)


def test_orphans_die_with_their_instance(server: NimbusServer) -> None:
    deploy(server, "sec-orphans", scaling={"keep_warm": 0})
    marker = unique("nborph-")
    result = attack(server, "sec-orphans", {"attack": "orphans", "marker": marker, "count": 3})
    assert result == {"orphans": 3}
    wait_no_instances(server, "sec-orphans")
    left = wait_until(lambda: not processes_named(marker), 10)
    assert left, f"orphans outlived their instance:\n{describe_pids(processes_named(marker))}"
    assert_no_leaked_cgroups(server.data_dir)
    assert_unharmed(server)


def test_flooding_its_socket_cannot_exhaust_the_servers_memory(server: NimbusServer) -> None:
    """The instance's socket is the function's too (fd 3): a frame header that claims a
    4 GB reply, then 256 MB of it, from a 128 MB function. The server must not buffer
    what no reply may be (Lambda: 6 MB), or one function can take the node down."""
    assert server.proc is not None
    deploy(server, "sec-flood", timeout=3)
    with PeakRss(server.proc.pid) as rss:
        r = invoke(server, "sec-flood", {"attack": "flood_socket", "mb": 256, "then_sleep": 10})
    error, body = function_error(r)
    assert error is not None, f"the flood was taken as a reply: {body}"
    assert rss.growth < 64, (
        f"the server's memory grew by {rss.growth} MB ({rss.start} -> {rss.peak} MB) while one "
        f"function wrote 256 MB into its socket ({error}: {body.get('errorMessage')})"
    )
    assert attack(server, "sec-flood", {"attack": "hello"})["hello"] == "from the attacker"
    assert_unharmed(server)


def test_an_oversized_result_is_refused(server: NimbusServer) -> None:
    """A result over the synchronous limit (6 MB, as on Lambda) is an error, and the
    server does not hold several copies of it on the way."""
    assert server.proc is not None
    deploy(server, "sec-big-result", memory=512)
    with PeakRss(server.proc.pid) as rss:
        r = invoke(server, "sec-big-result", {"attack": "big_result", "mb": 64})
    error = r.headers.get("X-Nimbus-Function-Error")
    assert error is not None, f"a {len(r.content) >> 20} MB result was returned as it is"
    assert len(r.content) < 1 << 20, f"the error is {len(r.content)} bytes"
    assert rss.growth < 64, (
        f"the server's memory grew by {rss.growth} MB for a 64 MB result it then refused"
    )
    assert attack(server, "sec-big-result", {"attack": "hello"})["hello"] == "from the attacker"
    assert_unharmed(server)


def test_cpu_hogs_do_not_starve_the_host_or_a_neighbour(server: NimbusServer) -> None:
    """Four instances, four processes each, spinning: the server and a neighbour (each
    with its own CPU share) still answer promptly."""
    deploy(server, "sec-spin", timeout=10)
    assert_unharmed(server)  # the neighbour is warm: what is measured is not a cold start
    event = json.dumps({"attack": "spin", "seconds": 3, "processes": 4})
    errors: list[str] = []

    def hog() -> None:
        with server.new_client(timeout=30) as client:
            r = client.post("/v1/functions/sec-spin/invoke", content=event)
            if r.status_code != 200 or "X-Nimbus-Function-Error" in r.headers:
                errors.append(f"{r.status_code} {r.text}")

    hogs = [threading.Thread(target=hog) for _ in range(4)]
    for t in hogs:
        t.start()
    try:
        time.sleep(0.5)  # let them get going
        slowest = 0.0
        for _ in range(10):
            started = time.monotonic()
            assert_unharmed(server)
            slowest = max(slowest, time.monotonic() - started)
            time.sleep(0.1)
    finally:
        for t in hogs:
            t.join(30)
    assert slowest < 1.0, f"the server and the neighbour took {slowest:.2f} s to answer"
    assert errors == [], errors
    assert_unharmed(server)


def test_the_node_cap_bounds_every_instance_together(tmp_path: Path) -> None:
    """Per-instance limits multiply by the instances; the node's cgroup caps their sum."""
    args = ["--node-pids-max", "200", "--node-memory-mb", "3000", "--node-cpus", "1.5"]
    with running(tmp_path / "data", args=args) as s:
        node_id = hashlib.sha256(str(s.data_dir.resolve()).encode()).hexdigest()[:12]
        bases = [d for d in node_cgroups(s.data_dir) if os.path.basename(d) == f"nimbus-{node_id}"]
        pids = [Path(d, "pids.max") for d in bases if Path(d, "pids.max").exists()]
        assert pids and all(p.read_text().strip() == "200" for p in pids), bases
        for d in bases:
            if Path(d, "memory.limit_in_bytes").exists():  # v1
                assert int(Path(d, "memory.limit_in_bytes").read_text()) == 3000 * 1024 * 1024
            if Path(d, "cpu.cfs_quota_us").exists():
                assert Path(d, "cpu.cfs_quota_us").read_text().strip() == "150000"
            if Path(d, "cpu.max").exists():  # v2
                assert Path(d, "cpu.max").read_text().split() == ["150000", "100000"]

        deploy(s, "sec-nodebomb", memory=1024, scaling={"keep_warm": 0})
        result = attack(s, "sec-nodebomb", {"attack": "forkbomb", "marker": unique("nbnode-")})
        assert result["failure"] is not None and result["failure"]["errno"] == "EAGAIN", result
        assert result["children"] < 200 < PIDS_MAX, result  # the node's cap, not the instance's
        assert s.client.get("/healthz").status_code == 200
