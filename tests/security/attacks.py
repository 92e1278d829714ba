"""Helpers for the attack tests: run an attack, read its outcome, check the host survived.

The attacker is ``tests/fixtures/functions/attack-probe``: one handler, an event
``{"attack": name, ...}``, a dict back. Every attempt inside it is reported as
``{"ok": True, "value": ...}`` or ``{"ok": False, "error": "...", "errno": "EPERM"}``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import httpx

from nimbus.config import Settings
from tests.support import FIXTURES, NimbusServer, instance_pids, node_cgroups, pid_alive

ATTACKER = "attack-probe"
VICTIM = "attack-victim"
NEIGHBOUR = "sec-neighbour"

#: Put in the server's environment; no function may ever see it.
ENV_MARKER_NAME = "NIMBUS_SECURITY_TEST_MARKER"
ENV_MARKER = f"nimbus-sec-env-{secrets.token_hex(8)}"

#: A function's sandbox uid is at least this (see store/sqlite.py).
FIRST_UID = 200000

#: Sandboxes a node keeps ready ahead of demand (test servers run with the defaults):
#: a cgroup and processes each, running as root until a function claims one.
POOL = getattr(Settings(), "sandbox_pool", 0)


def unique(prefix: str) -> str:
    """A process name no other process on this machine has: at most 15 characters (comm)."""
    return f"{prefix}{secrets.token_hex(5)}"[:15]


def deploy(server: NimbusServer, name: str, fixture: str = ATTACKER, **overrides: Any) -> None:
    r = server.deploy(fixture, name=name, **overrides)
    assert r.status_code == 201, f"deploying {name} failed: {r.status_code} {r.text}"


def invoke(server: NimbusServer, name: str, event: Any, **kw: Any) -> httpx.Response:
    r = server.invoke(name, event, **kw)
    assert r.status_code == 200, f"invoking {name} with {event!r}: {r.status_code} {r.text}"
    return r


def attack(server: NimbusServer, name: str, event: dict[str, Any]) -> dict[str, Any]:
    """Run an attack that must *return* (the attempts inside it fail); its result."""
    r = invoke(server, name, event)
    error = r.headers.get("X-Nimbus-Function-Error")
    assert error is None, f"attack {event['attack']!r} itself failed ({error}): {r.text}"
    result: dict[str, Any] = r.json()
    return result


def function_error(r: httpx.Response) -> tuple[str | None, dict[str, Any]]:
    return r.headers.get("X-Nimbus-Function-Error"), r.json()


def assert_denied(outcome: dict[str, Any], errnos: Iterable[str], what: str) -> None:
    """The attempt failed, with one of the expected errnos."""
    allowed = sorted(errnos)
    assert not outcome["ok"], f"{what}: SUCCEEDED, expected it to fail with {allowed}: {outcome}"
    assert outcome["errno"] in allowed, f"{what}: expected {allowed}, got {outcome}"


def assert_unharmed(server: NimbusServer) -> None:
    """The host and a neighbour function keep serving."""
    assert server.proc is not None and server.proc.poll() is None, (
        f"the server died (exit {server.proc and server.proc.returncode}):\n"
        + server.output()[-3000:]
    )
    health = server.client.get("/healthz")
    assert health.status_code == 200, f"/healthz: {health.status_code} {health.text}"
    r = server.invoke(NEIGHBOUR, {})
    assert r.status_code == 200, f"the neighbour: {r.status_code} {r.text}"
    assert "X-Nimbus-Function-Error" not in r.headers, f"the neighbour failed: {r.text}"
    assert r.json() == {"hello": "world"}, f"the neighbour answered {r.text}"


def wait_until(predicate: Callable[[], Any], timeout: float = 10, interval: float = 0.05) -> Any:
    """Poll until ``predicate()`` is truthy; its last value either way."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def instance_count(server: NimbusServer, name: str) -> int:
    r = server.client.get(f"/v1/functions/{name}")
    r.raise_for_status()
    return int(r.json()["instances"]["total"])


def wait_no_instances(server: NimbusServer, name: str, timeout: float = 10) -> None:
    assert wait_until(lambda: instance_count(server, name) == 0, timeout), (
        f"{name} still has instances after {timeout} s: "
        + json.dumps(server.client.get(f"/v1/functions/{name}").json()["instances"])
    )


# -- processes ------------------------------------------------------------------------------


def processes_named(name: str) -> list[int]:
    """Live processes whose comm (``prctl(PR_SET_NAME)``) or command line contains ``name``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/comm", "rb") as f:
                comm = f.read()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if (name.encode() in comm or name.encode() in cmdline) and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def proc_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def proc_cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "<gone>"


def describe_pids(pids: Iterable[int]) -> str:
    return "\n".join(f"  {p} uid={proc_uid(p)} {proc_cmdline(p)[:160]}" for p in pids)


def zygote_pid(data_dir: Path) -> int:
    """The node's zygote: the one process of the node whose parent is not of the node."""
    pids = instance_pids(data_dir)
    roots = [p for p in pids if _ppid(p) not in pids and "zygote/main.py" in proc_cmdline(p)]
    assert len(roots) == 1, f"expected one zygote, found:\n{describe_pids(pids)}"
    return roots[0]


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


# -- cgroups ----------------------------------------------------------------------------------


def instance_cgroups(data_dir: Path) -> list[str]:
    """The per-instance cgroup directories under the node's base cgroup(s), all hierarchies."""
    found: set[str] = set()
    bases = {os.path.realpath(p) for p in node_cgroups(data_dir) if not p.endswith("-server")}
    for base in bases:
        with contextlib.suppress(FileNotFoundError):
            found.update(e.path for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
    return sorted(found)


def cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f.read().split()]
    except FileNotFoundError:
        return []


def empty_cgroups(data_dir: Path) -> list[str]:
    """Instance cgroups with no process in them: leaked, unless on their way out."""
    return [c for c in instance_cgroups(data_dir) if not cgroup_pids(c)]


def assert_no_leaked_cgroups(data_dir: Path, timeout: float = 10) -> None:
    """Every instance cgroup of the node still holds a process (a live instance, or a
    sandbox made ahead of demand); an empty one must go away by itself."""
    leaked = wait_until(lambda: not empty_cgroups(data_dir), timeout)
    assert leaked, f"empty instance cgroups left behind: {empty_cgroups(data_dir)}"


# -- files ------------------------------------------------------------------------------------


def fixture_sha256(fixture: str, filename: str = "app.py") -> str:
    return hashlib.sha256((FIXTURES / fixture / filename).read_bytes()).hexdigest()


def codes(text: str) -> list[int]:
    """``text`` as a list of byte values: sent like this, the string itself never
    appears in the attacker's memory except where it really came from."""
    return list(text.encode())


def mount_count() -> int:
    with open("/proc/self/mountinfo") as f:
        return len(f.read().splitlines())


# -- the server's memory ------------------------------------------------------------------------


def rss_mb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError(f"no VmRSS for {pid}")


class PeakRss:
    """Samples a process's resident memory while the block runs: ``growth`` is the
    highest value seen minus the value at the start, in MB."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = rss_mb(pid)
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError, AssertionError):
                self.peak = max(self.peak, rss_mb(self.pid))
            self._stop.wait(0.01)

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        with contextlib.suppress(OSError, AssertionError):
            self.peak = max(self.peak, rss_mb(self.pid))
