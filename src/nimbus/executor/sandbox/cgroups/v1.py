"""Per-instance cgroups on cgroup v1: one directory per controller hierarchy.

The memory, cpu and pids controllers each live in their own hierarchy (or
share one when co-mounted, e.g. ``cpu,cpuacct``). The base is, in each
hierarchy, this process's cgroup + ``/nimbus-<node_id>``; an instance is a
directory of its own name under every base, and a process joins it by
writing its pid into each of their ``cgroup.procs``.

There is no freezer in our controller set, so ``kill()`` repeats
read-and-SIGKILL until the cgroup is empty (see ``base.kill_loop``).

Standard library only: this module is imported inside the zygote.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping

from nimbus.executor.sandbox.cgroups.base import (
    Kill,
    Limits,
    Rmdir,
    TreeDriver,
    check_name,
    cpu_shares,
    ensure_dir,
    keyed_int,
    read_int,
    read_text,
    write_text,
)

__all__ = ["CONTROLLERS", "CgroupV1"]

CONTROLLERS = ("memory", "cpu", "pids")


class CgroupV1(TreeDriver):
    """``hierarchies`` maps each of :data:`CONTROLLERS` to the absolute
    directory of this process's own cgroup in that controller's hierarchy,
    e.g. ``{"memory": "/sys/fs/cgroup/memory/user.slice", ...}``.
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
        self._base_of = {c: os.path.join(hierarchies[c], base) for c in CONTROLLERS}
        super().__init__(node_id, (self._base_of[c] for c in CONTROLLERS), rmdir=rmdir, kill=kill)

    def _dir(self, controller: str, name: str) -> str:
        return os.path.join(self._base_of[controller], check_name(name))

    def prepare(self) -> None:
        self._make_bases()
        self._clear()

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
