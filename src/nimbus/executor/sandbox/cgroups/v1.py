"""Per-instance cgroups on cgroup v1: one directory per controller hierarchy.

The memory, cpu and pids controllers each live in their own hierarchy (or
share one when co-mounted, e.g. ``cpu,cpuacct``). The base is, in each
hierarchy, this process's cgroup + ``/nimbus-<node_id>``; an instance is a
directory of its own name under every base, and a process joins it by
writing its pid into each of their ``cgroup.procs``.

The freezer hierarchy is used when it is mounted (and ours to write): an
instance's directory is made there too, ``freeze()`` writes ``FROZEN`` to its
``freezer.state`` (``FREEZING`` until every task is stopped) and ``thaw()``
``THAWED``. Without it nothing is frozen. A frozen task does not act on
SIGKILL until it is thawed, so ``kill()`` signals every process (a frozen one
cannot fork meanwhile), thaws, and then repeats read-and-SIGKILL until the
cgroup is empty (see ``base.kill_loop``).

The first ``freeze()`` also makes ``<freezer>/nimbus-<node_id>-frozen``, an
empty cgroup that stays frozen until ``cleanup()``. The kernel switches its
freezer on and off with a static key, patching its own code on every CPU,
whenever the first cgroup freezes or the last one thaws: measured on Linux
6.18, a freeze or a thaw costs 90-130 µs when it is the only frozen cgroup, and
under 1 µs while another one is held frozen.

Standard library only: this module is imported inside the zygote.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping

from nimbus.executor.sandbox.cgroups.base import (
    CPU_PERIOD_US,
    Kill,
    Limits,
    NodeLimits,
    Rmdir,
    TreeDriver,
    check_name,
    cpu_shares,
    ensure_dir,
    keyed_int,
    kill_loop,
    read_int,
    read_text,
    rmdir_tree,
    signal_all,
    write_text,
)

__all__ = ["CONTROLLERS", "OPTIONAL", "CgroupV1"]

CONTROLLERS = ("memory", "cpu", "pids")
#: Used when mounted, not required: without it idle instances are not frozen.
OPTIONAL = ("freezer",)


class CgroupV1(TreeDriver):
    """``hierarchies`` maps each of :data:`CONTROLLERS` (and, when it is
    mounted, ``freezer``) to the absolute directory of this process's own
    cgroup in that controller's hierarchy, e.g.
    ``{"memory": "/sys/fs/cgroup/memory/user.slice", ...}``.
    """

    version: int = 1

    def __init__(
        self,
        node_id: str,
        hierarchies: Mapping[str, str],
        *,
        rmdir: Rmdir = os.rmdir,
        kill: Kill = os.kill,
    ) -> None:
        missing = [c for c in CONTROLLERS if c not in hierarchies]
        if missing:
            raise ValueError(f"no hierarchy given for {', '.join(missing)}")
        base = f"nimbus-{node_id}"
        used = [*CONTROLLERS, *(c for c in OPTIONAL if c in hierarchies)]
        self._base_of = {c: os.path.join(hierarchies[c], base) for c in used}
        #: Whether instances get a freezer cgroup (see ``freeze()``).
        self.freezer = "freezer" in self._base_of
        self._held = os.path.join(hierarchies["freezer"], f"{base}-frozen") if self.freezer else ""
        self._holding = False
        super().__init__(node_id, (self._base_of[c] for c in used), rmdir=rmdir, kill=kill)

    def _dir(self, controller: str, name: str) -> str:
        return os.path.join(self._base_of[controller], check_name(name))

    def prepare(self) -> None:
        self._make_bases()
        self._clear()

    def limit_node(self, limits: NodeLimits) -> None:
        memory = self._base_of["memory"]
        if limits.memory_bytes:
            self._set_memory(memory, limits.memory_bytes)
        else:
            self._set_memory(memory, -1)
        pids = "max" if not limits.pids_max else str(limits.pids_max)
        write_text(os.path.join(self._base_of["pids"], "pids.max"), pids)
        cpu = self._base_of["cpu"]
        write_text(os.path.join(cpu, "cpu.cfs_period_us"), str(CPU_PERIOD_US))
        quota = limits.cpu_quota_us(CPU_PERIOD_US) if limits.cpus else -1
        write_text(os.path.join(cpu, "cpu.cfs_quota_us"), str(quota))

    def create(self, name: str, limits: Limits) -> list[str]:
        dirs = self._dirs(name)
        for d in dirs:
            ensure_dir(d)
        self._set_memory(self._dir("memory", name), limits.memory_bytes)
        write_text(os.path.join(self._dir("cpu", name), "cpu.shares"), str(cpu_shares(limits)))
        write_text(os.path.join(self._dir("pids", name), "pids.max"), str(limits.pids_max))
        return [os.path.join(d, "cgroup.procs") for d in dirs]

    @staticmethod
    def _set_memory(d: str, limit: int) -> None:
        mem = os.path.join(d, "memory.limit_in_bytes")
        # memsw (memory + swap) exists only with swap accounting; without it
        # an instance could swap past its limit. The kernel keeps
        # memsw >= limit at every step, so the order depends on the direction.
        memsw = os.path.join(d, "memory.memsw.limit_in_bytes")
        if not os.path.exists(memsw):
            write_text(mem, str(limit))
            return
        try:
            write_text(mem, str(limit))
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # Raising an existing cgroup's limit above its memsw: memsw first.
            write_text(memsw, str(limit))
            write_text(mem, str(limit))
        else:
            write_text(memsw, str(limit))

    def memory_peak(self, name: str) -> int | None:
        return read_int(os.path.join(self._dir("memory", name), "memory.max_usage_in_bytes"))

    def oom_killed(self, name: str) -> bool:
        # memory.oom_control reads "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n";
        # the oom_kill counter exists since Linux 4.13.
        text = read_text(os.path.join(self._dir("memory", name), "memory.oom_control"))
        return (keyed_int(text, "oom_kill") or 0) > 0

    def _freezer_state(self, name: str) -> str:
        return os.path.join(self._dir("freezer", name), "freezer.state")

    def freeze(self, name: str) -> None:
        if not self.freezer:
            return
        if not self._holding:
            ensure_dir(self._held)  # see the module's docstring
            write_text(os.path.join(self._held, "freezer.state"), "FROZEN")
            self._holding = True
        self._write_freezer(name, self._freezer_state(name), b"FROZEN")

    def thaw(self, name: str) -> None:
        if self.freezer:
            self._write_freezer(name, self._freezer_state(name), b"THAWED")

    def frozen(self, name: str) -> bool:
        if not self.freezer:
            return False
        return (read_text(self._freezer_state(name)) or "").strip() == "FROZEN"

    def cleanup(self) -> None:
        super().cleanup()
        if self._held:
            # Empty (nothing ever joins it), so it goes at once, frozen or not.
            self._holding = not rmdir_tree(self._held, self._rmdir)

    def kill(self, name: str) -> None:
        files = [os.path.join(d, "cgroup.procs") for d in self._dirs(name)]
        if self.freezer:
            # A frozen task keeps the SIGKILL pending until it is thawed; signalled
            # first, everything dies as it thaws, and nothing frozen could fork meanwhile.
            signal_all(files, self._kill)
            self.thaw(name)
        kill_loop(files, self._kill)
