"""What a sandbox sees of the host through ``/proc``: its own view, not the host's.

A procfs shows a pid namespace's processes, but many of its files describe the
whole machine: the kernel's command line, its memory, every CPU's time, the load,
the disks, the interrupts. They tell a function what the host is, and, read twice,
what its neighbours do (``/proc/stat``'s busy time, ``/proc/uptime``'s idle time,
``/proc/loadavg`` all move with another tenant's CPU use). So every procfs Nimbus
mounts for a sandbox gets, on top of it, read-only:

- :data:`VIRTUAL` files replaced by a static view of the sandbox's own (:func:`render`):
  its memory size as ``MemTotal`` (and free), as many CPUs as it may run on with no
  time spent, no load, no swap, no disks; the sandbox's own boot time and uptime (with
  its time namespace, see :func:`nimbus.executor.sandbox.enter.unshare_namespaces`).
  Nothing in them moves, so nothing leaks from one sandbox to another through them;
  what code needs keeps working (``os.cpu_count()`` counts ``/proc/stat``'s CPUs when
  there is no ``/sys``, ``free`` and psutil read ``/proc/meminfo``).
- :data:`MASKED` files (the kernel's internals: symbols, keys, timers, memory maps,
  the scheduler's debug output) replaced by an empty file nobody may read, and
  :data:`MASKED_DIRS` by an empty directory (runc's masked paths, and more);
- :data:`READ_ONLY` directories bound read-only on themselves (runc's readonly paths).

The files live on a small tmpfs of the caller's (the *staging* tmpfs), bound over the
procfs entries; the caller unmounts the staging tmpfs itself before the sandbox is
entered (the binds keep its files). The function's memory size is only known on *go*:
:func:`write_meminfo` rewrites that one file until then.

Standard library only: this runs in the zygote and its forks.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass

from nimbus.executor.sandbox import linux

__all__ = [
    "MASKED",
    "MASKED_DIRS",
    "READ_ONLY",
    "VIRTUAL",
    "HostFacts",
    "boot_time",
    "host_facts",
    "mount_view",
    "render",
    "write_meminfo",
]

#: Generated per sandbox by :func:`render` (paths under /proc).
VIRTUAL = (
    "cmdline",
    "cpuinfo",
    "meminfo",
    "stat",
    "loadavg",
    "uptime",
    "swaps",
    "diskstats",
    "partitions",
    "vmstat",
    "zoneinfo",
    "buddyinfo",
    "interrupts",
    "softirqs",
    "locks",
    "pressure/cpu",
    "pressure/io",
    "pressure/memory",
    "pressure/irq",
    "sys/fs/file-nr",
    "sys/fs/inode-nr",
    "sys/fs/inode-state",
    "sys/fs/dentry-state",
    "sys/kernel/random/boot_id",
)

#: Replaced by an empty file of mode 000: reading it fails with EACCES.
MASKED = (
    "kallsyms",
    "kcore",
    "keys",
    "key-users",
    "kmsg",
    "kpagecgroup",
    "kpagecount",
    "kpageflags",
    "latency_stats",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "schedstat",
    "slabinfo",
    "vmallocinfo",
    "pagetypeinfo",
    "iomem",
    "ioports",
    "mtrr",
    "modules",
    "sysrq-trigger",
)

#: Replaced by an empty read-only directory.
MASKED_DIRS = ("acpi", "asound", "scsi", "driver")

#: Bound read-only on themselves (before the files above that are inside them).
READ_ONLY = ("bus", "fs", "irq", "sys")

_RO = linux.MS_RDONLY | linux.MS_NOSUID | linux.MS_NODEV | linux.MS_NOEXEC
_PSI = "".join(f"{kind} avg10=0.00 avg60=0.00 avg300=0.00 total=0\n" for kind in ("some", "full"))
_SOFTIRQS = (
    "HI",
    "TIMER",
    "NET_TX",
    "NET_RX",
    "BLOCK",
    "IRQ_POLL",
    "TASKLET",
    "SCHED",
    "HRTIMER",
    "RCU",
)
_MEMINFO_ZERO = (
    "Buffers",
    "Cached",
    "SwapCached",
    "Active",
    "Inactive",
    "Active(anon)",
    "Inactive(anon)",
    "Active(file)",
    "Inactive(file)",
    "Unevictable",
    "Mlocked",
    "SwapTotal",
    "SwapFree",
    "Dirty",
    "Writeback",
    "AnonPages",
    "Mapped",
    "Shmem",
    "KReclaimable",
    "Slab",
    "SReclaimable",
    "SUnreclaim",
    "KernelStack",
    "PageTables",
    "NFS_Unstable",
    "Bounce",
    "WritebackTmp",
)


@dataclass(frozen=True, slots=True)
class HostFacts:
    """What of the host a view keeps (read once, in the zygote, before any sandbox)."""

    cpus: int
    """CPUs a sandbox may run on (its affinity): as many ``cpuN`` lines in ``stat``."""
    cpuinfo: bytes
    """The host's ``/proc/cpuinfo`` as it was when read: the model and flags libraries
    look at, with its clock speeds frozen (they can follow the load)."""
    vmstat_keys: tuple[str, ...]
    """The names in the host's ``/proc/vmstat``, each shown as 0."""
    file_max: int
    """The third field of ``/proc/sys/fs/file-nr`` (a limit, not a count)."""


def host_facts(proc: str = "/proc") -> HostFacts:
    """Read :class:`HostFacts` from the host's procfs at ``proc``."""

    def read(name: str) -> bytes:
        try:
            with open(os.path.join(proc, name), "rb") as f:
                return f.read()
        except OSError:
            return b""

    file_nr = read("sys/fs/file-nr").split()
    return HostFacts(
        cpus=len(os.sched_getaffinity(0)) or 1,
        cpuinfo=read("cpuinfo"),
        vmstat_keys=tuple(line.split()[0].decode() for line in read("vmstat").splitlines() if line),
        file_max=int(file_nr[2]) if len(file_nr) > 2 else 1 << 20,
    )


def render(memory_bytes: int, facts: HostFacts, *, booted: float, now: float) -> dict[str, bytes]:
    """The :data:`VIRTUAL` files of a sandbox of ``memory_bytes`` that booted (was made)
    at wall-clock time ``booted``, as they read at ``now``. Pure."""
    uptime = max(0.0, now - booted)
    cpus = range(facts.cpus)
    idle = max(1, int(uptime * 100))  # in USER_HZ; never 0, so a single read divides

    def cpu(name: str, idle: int) -> str:
        return f"{name} 0 0 0 {idle} 0 0 0 0 0 0\n"

    stat = (
        cpu("cpu ", idle * facts.cpus)
        + "".join(cpu(f"cpu{n}", idle) for n in cpus)
        + "intr 0\nctxt 0\n"
        + f"btime {int(booted)}\n"
        + "processes 0\nprocs_running 1\nprocs_blocked 0\n"
        + "softirq 0"
        + " 0" * len(_SOFTIRQS)
        + "\n"
    )
    header = " " * 11 + "".join(f"CPU{n:<8}" for n in cpus).rstrip() + "\n"
    softirqs = header + "".join(
        f"{name:>12}:" + "          0" * facts.cpus + "\n" for name in _SOFTIRQS
    )
    files = {
        "cmdline": "\n",
        "meminfo": meminfo(memory_bytes),
        "stat": stat,
        "loadavg": "0.00 0.00 0.00 1/1 1\n",
        "uptime": f"{uptime:.2f} {uptime * facts.cpus:.2f}\n",
        "swaps": "Filename\t\t\t\tType\t\tSize\t\tUsed\t\tPriority\n",
        "diskstats": "",
        "partitions": "major minor  #blocks  name\n\n",
        "vmstat": "".join(f"{key} 0\n" for key in facts.vmstat_keys),
        "zoneinfo": "",
        "buddyinfo": "",
        "interrupts": header,
        "softirqs": softirqs,
        "locks": "",
        "pressure/cpu": _PSI,
        "pressure/io": _PSI,
        "pressure/memory": _PSI,
        "pressure/irq": _PSI.splitlines(keepends=True)[1],
        "sys/fs/file-nr": f"0\t0\t{facts.file_max}\n",
        "sys/fs/inode-nr": "0\t0\n",
        "sys/fs/inode-state": "0\t0\t0\t0\t0\t0\t0\n",
        "sys/fs/dentry-state": "0\t0\t45\t0\t0\t0\n",
        # The host's is the same for every sandbox on it: a way to tell neighbours.
        "sys/kernel/random/boot_id": f"{uuid.uuid4()}\n",
    }
    out = {name: data.encode() for name, data in files.items()}
    out["cpuinfo"] = facts.cpuinfo
    return out


def meminfo(memory_bytes: int) -> str:
    """``/proc/meminfo`` of a machine of ``memory_bytes``, all of it free, no swap."""
    kb = memory_bytes // 1024

    def line(key: str, value: int, unit: str = " kB") -> str:
        return f"{key + ':':<16}{value:>8}{unit}\n"

    return (
        line("MemTotal", kb)
        + line("MemFree", kb)
        + line("MemAvailable", kb)
        + "".join(line(key, 0) for key in _MEMINFO_ZERO)
        + line("CommitLimit", kb)
        + line("Committed_AS", 0)
        + line("VmallocTotal", 0)
        + line("VmallocUsed", 0)
        + line("VmallocChunk", 0)
        + line("Percpu", 0)
        + "".join(line(f"HugePages_{k}", 0, "") for k in ("Total", "Free", "Rsvd", "Surp"))
        + line("Hugepagesize", 2048)
        + line("Hugetlb", 0)
    )


def boot_time(pid: int | None = None) -> float:
    """When our time namespace booted, as a wall-clock time (what its ``/proc/stat``
    says as ``btime``); with ``pid``, seen from the host: process ``pid``'s."""
    offset = 0.0
    if pid is not None:
        try:
            with open(f"/proc/{pid}/timens_offsets") as f:
                for line in f:
                    name, secs, nsecs = line.split()
                    if name in ("boottime", "7"):  # the clock's name, or CLOCK_BOOTTIME's id
                        offset = int(secs) + int(nsecs) / 1e9
        except (OSError, ValueError):
            pass  # no time namespaces: the host's clock
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) + offset)


def mount_view(proc: str, staging: str, files: Mapping[str, bytes]) -> None:
    """Put the view over the procfs mounted at ``proc``: :data:`READ_ONLY` first, then
    ``files`` (:func:`render`), :data:`MASKED` and :data:`MASKED_DIRS`, each written to
    (or made in) the tmpfs at ``staging`` and bound read-only over its entry. Entries
    this kernel does not have are skipped."""
    for name in READ_ONLY:
        _bind_ro(os.path.join(proc, name), os.path.join(proc, name))
    old_umask = os.umask(0o022)
    try:
        for name, data in files.items():
            target = os.path.join(proc, name)
            if not os.path.exists(target):
                continue
            source = os.path.join(staging, name)
            os.makedirs(os.path.dirname(source), exist_ok=True)
            with open(source, "wb") as f:
                f.write(data)
            os.chmod(source, 0o444)
            _bind_ro(source, target)
        nothing = os.path.join(staging, ".masked")
        with open(nothing, "wb"):
            pass
        os.chmod(nothing, 0)
        empty = os.path.join(staging, ".empty")
        os.mkdir(empty, 0o555)
    finally:
        os.umask(old_umask)
    for name in MASKED:
        target = os.path.join(proc, name)
        if os.path.exists(target):
            _bind_ro(nothing, target)
    for name in MASKED_DIRS:
        target = os.path.join(proc, name)
        if os.path.isdir(target):
            _bind_ro(empty, target)


def write_meminfo(staging: str, memory_bytes: int) -> None:
    """Rewrite the view's ``meminfo`` (bound over /proc/meminfo) for ``memory_bytes``."""
    with open(os.path.join(staging, "meminfo"), "wb") as f:
        f.write(meminfo(memory_bytes).encode())


def _bind_ro(source: str, target: str) -> None:
    linux.mount(source, target, None, linux.MS_BIND)
    linux.mount(None, target, None, linux.MS_REMOUNT | linux.MS_BIND | _RO)
