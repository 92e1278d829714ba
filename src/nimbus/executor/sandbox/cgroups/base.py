"""The cgroup interface every driver implements, and the helpers they share.

A driver owns one *base* cgroup per hierarchy (``<own cgroup>/nimbus-<node>``)
and makes one child per instance under it. Everything here is synchronous
file I/O on cgroupfs; callers that must not block run it in a thread.

Standard library only: this module is imported inside the zygote.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = [
    "CgroupDriver",
    "CgroupUnavailable",
    "Limits",
    "TreeDriver",
]

#: Memory that buys one full vCPU, as on AWS Lambda.
MB_PER_VCPU = 1769

#: How many read-procs-and-SIGKILL rounds ``kill()`` makes when the kernel
#: cannot kill the whole cgroup at once (v1, v2 before 5.14): processes may
#: fork between our read of ``cgroup.procs`` and the signal.
KILL_ROUNDS = 50

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

Rmdir = Callable[[str], None]
Kill = Callable[[int, int], None]


class CgroupUnavailable(Exception):
    """No usable cgroup hierarchy; ``str(exc)`` is one line that says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Limits:
    """What one instance may use.

    ``cpu_weight`` is a relative CPU share in vCPUs (``memory_mb / 1769``),
    never a quota: an instance may use idle CPU, and under contention gets
    CPU in proportion to its memory.
    """

    memory_bytes: int
    cpu_weight: float
    pids_max: int = 1024

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValueError(f"memory_bytes must be positive, got {self.memory_bytes}")
        if not self.cpu_weight > 0:
            raise ValueError(f"cpu_weight must be positive, got {self.cpu_weight}")
        if self.pids_max <= 0:
            raise ValueError(f"pids_max must be positive, got {self.pids_max}")

    @classmethod
    def for_memory_mb(cls, memory_mb: int, *, pids_max: int = 1024) -> Limits:
        """Lambda's rule: the CPU share is proportional to memory."""
        return cls(memory_mb * 1024 * 1024, memory_mb / MB_PER_VCPU, pids_max)


@dataclass(frozen=True, slots=True)
class NodeLimits:
    """What all of a node's instances may use together (0: no limit): memory in
    bytes (swap included where the kernel accounts it), processes, and CPUs (a hard
    quota, e.g. 1.5)."""

    memory_bytes: int = 0
    pids_max: int = 0
    cpus: float = 0.0

    def __post_init__(self) -> None:
        if self.memory_bytes < 0 or self.pids_max < 0 or self.cpus < 0:
            raise ValueError("node limits cannot be negative")

    def cpu_quota_us(self, period_us: int) -> int:
        """The CFS quota per ``period_us`` (at least 1 ms, as the kernel needs)."""
        return max(1000, round(self.cpus * period_us))


#: The CFS period node CPU quotas are expressed in.
CPU_PERIOD_US = 100_000


class CgroupDriver(Protocol):
    """Per-instance cgroups on one hierarchy layout (v1 or v2).

    ``name`` is an instance id (letters, digits, ``-``); it becomes a
    directory name, so anything else is refused with ``ValueError``.
    """

    version: int

    def prepare(self) -> None:
        """Once at server start: make the base cgroup(s) and clear leftovers
        of a previous run with the same node id."""
        ...

    def create(self, name: str, limits: Limits) -> list[str]:
        """Make the instance cgroup(s) and write ``limits``; return the
        absolute paths of the ``cgroup.procs`` files a process writes its pid
        into to join (v1: one per hierarchy; v2: one). Idempotent."""
        ...

    def limit_node(self, limits: NodeLimits) -> None:
        """After ``prepare()``: cap the base, so that every instance together
        stays within ``limits`` (a zero field: unlimited)."""
        ...

    def memory_peak(self, name: str) -> int | None:
        """The highest memory use seen, in bytes; None when the kernel
        does not report it."""
        ...

    def oom_killed(self, name: str) -> bool:
        """True once the OOM killer has killed a process of this cgroup."""
        ...

    def procs(self, name: str) -> list[int]:
        """The pids in the instance cgroup (v1: union over hierarchies)."""
        ...

    @property
    def freezer(self) -> bool:
        """Whether ``freeze()`` stops anything here (v1: a freezer hierarchy is
        mounted and ours; v2: Linux 5.2 or later). Asked after ``prepare()``."""
        ...

    def freeze(self, name: str) -> None:
        """Stop every process of the instance cgroup with the kernel's freezer
        until ``thaw()``: they get no CPU, and cannot fork (v2 still lets a
        fatal signal through; v1 holds even SIGKILL until the thaw, which
        ``kill()`` takes care of). Returns at once; the kernel finishes
        freezing asynchronously (``frozen()`` says when). Does nothing without
        a freezer or once the cgroup is gone."""
        ...

    def thaw(self, name: str) -> None:
        """Let a frozen instance cgroup run again (nothing if it is not frozen,
        if there is no freezer or if the cgroup is gone)."""
        ...

    def frozen(self, name: str) -> bool:
        """True once every process of the instance cgroup is frozen."""
        ...

    def kill(self, name: str) -> None:
        """SIGKILL every process in the instance cgroup, frozen ones too.
        Returns without waiting for them to be gone."""
        ...

    def remove(self, name: str) -> bool:
        """rmdir the instance cgroup(s): True when gone (missing counts as
        gone), False while still busy; the caller retries later."""
        ...

    def cleanup(self) -> None:
        """At server stop: kill and remove every instance cgroup, then the
        base. Best effort within a few seconds; what stays busy is removed
        by the next ``prepare()`` with the same node id."""
        ...


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"invalid cgroup name {name!r}: use letters, digits and '-'")
    return name


def check_node_id(node_id: str) -> str:
    if not _NODE_ID.fullmatch(node_id):
        raise ValueError(f"invalid node id {node_id!r}: use letters, digits, '.', '_' and '-'")
    return node_id


def cpu_shares(limits: Limits) -> int:
    """v1 ``cpu.shares``: 1024 is one CPU's worth; the kernel's range is 2..262144."""
    return min(262144, max(2, round(1024 * limits.cpu_weight)))


def cpu_weight(limits: Limits) -> int:
    """v2 ``cpu.weight``: 100 is the default (one CPU's worth); range 1..10000."""
    return min(10000, max(1, round(100 * limits.cpu_weight)))


def read_text(path: str) -> str | None:
    """The file's content, or None if it does not exist."""
    try:
        with open(path) as f:
            return f.read()
    except FileNotFoundError:
        return None


def write_text(path: str, value: str) -> None:
    # cgroupfs takes a value per write(2); a short string is one write.
    with open(path, "w") as f:
        f.write(value)


def keyed_int(text: str | None, key: str) -> int | None:
    """The value of ``key`` in a flat-keyed file (``oom_kill 3`` lines)."""
    if text is None:
        return None
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key:
            try:
                return int(parts[1])
            except ValueError:
                return None
    return None


def read_int(path: str) -> int | None:
    text = read_text(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def read_pids(procs_file: str) -> list[int]:
    text = read_text(procs_file)
    if text is None:
        return []
    return [int(line) for line in text.split()]


def ensure_dir(path: str) -> None:
    """mkdir, fine if it exists. Never makes parents: a missing parent
    cgroup is an error, not something to create."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)


def subdirs(path: str) -> list[str]:
    """Names of the child cgroups of ``path`` (none if it does not exist)."""
    try:
        with os.scandir(path) as it:
            return sorted(e.name for e in it if e.is_dir(follow_symlinks=False))
    except FileNotFoundError:
        return []


def signal_all(procs_files: Iterable[str], kill: Kill = os.kill) -> bool:
    """SIGKILL every pid listed in ``procs_files`` once; False if none was listed."""
    me = os.getpid()  # never ourselves, even if someone put us in there
    pids = {pid for f in procs_files for pid in read_pids(f)} - {me}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            kill(pid, signal.SIGKILL)
    return bool(pids)


def kill_loop(procs_files: Iterable[str], kill: Kill = os.kill) -> None:
    """SIGKILL everything listed in ``procs_files`` until they list nothing.

    A running process can fork between our read and our signal, so repeat; a
    killed process cannot fork again, so this converges quickly.
    """
    files = list(procs_files)
    for _ in range(KILL_ROUNDS):
        if not signal_all(files, kill):
            return
        # Give the dying a moment to leave the cgroup before we look again.
        time.sleep(0.002)


def rmdir_tree(path: str, rmdir: Rmdir = os.rmdir) -> bool:
    """Remove the cgroup ``path`` and any child cgroups, deepest first.

    True when gone (or never there); False when the kernel says EBUSY
    (processes still in it). Other errors propagate.
    """
    for child in subdirs(path):
        if not rmdir_tree(os.path.join(path, child), rmdir):
            return False
    try:
        rmdir(path)
    except FileNotFoundError:
        return True
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        raise
    return True


def retry_until(done: Callable[[], bool], timeout: float) -> bool:
    """Call ``done`` until it returns True or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if done():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


class TreeDriver:
    """What v1 and v2 share: an instance is a directory of the same name
    under each base directory, and a process is in it when its pid is in
    that directory's ``cgroup.procs``.

    ``rmdir`` and ``kill`` default to the real ``os`` calls; unit tests on a
    fake tree of plain files pass stand-ins that behave like cgroupfs.
    """

    #: Seconds ``prepare()`` and ``cleanup()`` wait for killed cgroups to empty.
    drain_timeout = 5.0

    def __init__(
        self,
        node_id: str,
        bases: Iterable[str],
        *,
        rmdir: Rmdir = os.rmdir,
        kill: Kill = os.kill,
    ) -> None:
        self.node_id = check_node_id(node_id)
        # Controllers co-mounted in one v1 hierarchy share a directory: once.
        self.bases: list[str] = list(dict.fromkeys(bases))
        self._rmdir = rmdir
        self._kill = kill
        #: An open descriptor of each instance's freezer file, by instance name: a
        #: freeze or a thaw on the warm path is then one pwrite(2), no path lookup.
        self._freezer_fds: dict[str, int] = {}

    def _dirs(self, name: str) -> list[str]:
        check_name(name)
        return [os.path.join(base, name) for base in self.bases]

    def _make_bases(self) -> None:
        for base in self.bases:
            ensure_dir(base)

    def instances(self) -> list[str]:
        """Names of the instance cgroups under the base(s). A directory with
        a name we never give (someone else's) is left alone."""
        names = {name for base in self.bases for name in subdirs(base)}
        return sorted(n for n in names if _NAME.fullmatch(n))

    def procs(self, name: str) -> list[int]:
        pids = {pid for d in self._dirs(name) for pid in read_pids(os.path.join(d, "cgroup.procs"))}
        return sorted(pids)

    def kill(self, name: str) -> None:
        kill_loop((os.path.join(d, "cgroup.procs") for d in self._dirs(name)), self._kill)

    def _write_freezer(self, name: str, path: str, value: bytes) -> None:
        """Write ``value`` to the instance's freezer file ``path`` (kept open); nothing
        if the cgroup is gone."""
        fd = self._freezer_fds.get(name)
        try:
            if fd is None:
                fd = self._freezer_fds[name] = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            # Offset 0: cgroupfs ignores it, and a fake tree's file stays readable.
            os.pwrite(fd, value, 0)
        except FileNotFoundError:
            return
        except OSError as e:
            self._close_freezer(name)
            if e.errno != errno.ENODEV:  # removed while open: gone too
                raise

    def _close_freezer(self, name: str) -> None:
        fd = self._freezer_fds.pop(name, None)
        if fd is not None:
            os.close(fd)

    def remove(self, name: str) -> bool:
        self._close_freezer(name)
        # Try every hierarchy even when one is busy, so each gets as far as it can.
        gone = [rmdir_tree(d, self._rmdir) for d in self._dirs(name)]
        return all(gone)

    def _clear(self) -> None:
        """Kill and remove every instance cgroup, and any process left in a base."""
        kill_loop((os.path.join(b, "cgroup.procs") for b in self.bases), self._kill)
        names = self.instances()
        for name in names:
            self.kill(name)
        pending = set(names)

        def removed_all() -> bool:
            pending.difference_update([n for n in list(pending) if self.remove(n)])
            return not pending

        retry_until(removed_all, self.drain_timeout)

    def cleanup(self) -> None:
        self._clear()
        for name in list(self._freezer_fds):
            self._close_freezer(name)
        for base in self.bases:
            retry_until(functools.partial(rmdir_tree, base, self._rmdir), self.drain_timeout)
