"""Per-instance cgroups on cgroup v2 (the unified hierarchy).

Layout, with ``<own>`` this process's cgroup at start::

    <own>/                          subtree_control: +memory +cpu +pids
    <own>/nimbus-<node>-server/     this process, only if it had to move (see below)
    <own>/nimbus-<node>/            the base; subtree_control: +memory +cpu +pids
    <own>/nimbus-<node>/<instance>  one per instance: memory.max, cpu.weight, pids.max

Strategy of ``prepare()``. A child gets a controller only if every ancestor
enabled it in ``cgroup.subtree_control``; ancestors above ``<own>`` must have
done so already (that is what ``detect()`` checks: the controllers are
listed in ``<own>/cgroup.controllers``). We enable them in ``<own>`` and in
the base. The "no internal processes" rule makes the first step fail with
EBUSY while ``<own>`` holds processes, which is the usual case (a systemd
service or scope holds its main process). Then we move this process, and
only this one (``os.getpid()``), into the leaf ``<own>/nimbus-<node>-server``
and retry once. If ``<own>`` still holds other processes (a shell, siblings
of ours) that fails again, and we raise :class:`CgroupUnavailable` telling
the user to give Nimbus a delegated cgroup of its own, e.g.
``systemd-run --scope -p Delegate=yes nimbus up`` or ``Delegate=yes`` in
the service unit. We never move processes that are not ours.

Freezing is the core ``cgroup.freeze`` file (Linux 5.2+, no controller
needed): ``1`` freezes, ``0`` thaws, and ``cgroup.events`` says ``frozen 1``
once every process is stopped. A frozen process still dies of SIGKILL (v2's
freezer lets fatal signals through), so ``kill()`` needs no thaw.

The server leaf stays after ``cleanup()``: this process is still in it, and
moving back is impossible once ``<own>`` has controllers enabled. The next
``prepare()`` with the same node id reuses it.

Standard library only: this module is imported inside the zygote.
"""

from __future__ import annotations

import contextlib
import errno
import os

from nimbus.executor.sandbox.cgroups.base import (
    CPU_PERIOD_US,
    CgroupUnavailable,
    Kill,
    Limits,
    NodeLimits,
    Rmdir,
    TreeDriver,
    check_name,
    cpu_weight,
    ensure_dir,
    keyed_int,
    kill_loop,
    read_int,
    read_text,
    write_text,
)

__all__ = ["CONTROLLERS", "DELEGATE_HINT", "CgroupV2"]

CONTROLLERS = ("memory", "cpu", "pids")

DELEGATE_HINT = (
    "run Nimbus in a delegated cgroup of its own, e.g. "
    "`systemd-run --scope -p Delegate=yes nimbus up` or Delegate=yes in its service unit"
)


class CgroupV2(TreeDriver):
    """``own`` is the absolute directory of this process's cgroup, e.g.
    ``/sys/fs/cgroup/system.slice/nimbus.service``.
    """

    version: int = 2

    def __init__(
        self,
        node_id: str,
        own: str,
        *,
        rmdir: Rmdir = os.rmdir,
        kill: Kill = os.kill,
    ) -> None:
        self.own = own
        super().__init__(node_id, [os.path.join(own, f"nimbus-{node_id}")], rmdir=rmdir, kill=kill)
        self.base = self.bases[0]
        self.server_leaf = os.path.join(own, f"nimbus-{self.node_id}-server")

    def _dir(self, name: str) -> str:
        return os.path.join(self.base, check_name(name))

    def prepare(self) -> None:
        try:
            _enable_controllers(self.own)
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise _unavailable(self.own, e) from e
            self._move_self_to_leaf()
            try:
                _enable_controllers(self.own)
            except OSError as e2:
                raise _unavailable(self.own, e2) from e2
        self._make_bases()
        self._clear()
        try:
            _enable_controllers(self.base)
        except OSError as e:
            raise _unavailable(self.base, e) from e

    def _move_self_to_leaf(self) -> None:
        ensure_dir(self.server_leaf)
        try:
            write_text(os.path.join(self.server_leaf, "cgroup.procs"), str(os.getpid()))
        except OSError as e:
            raise CgroupUnavailable(
                f"cannot move the server into {self.server_leaf} ({e.strerror}): {DELEGATE_HINT}"
            ) from e

    def limit_node(self, limits: NodeLimits) -> None:
        base = self.base
        write_text(os.path.join(base, "memory.max"), str(limits.memory_bytes or "max"))
        swap = os.path.join(base, "memory.swap.max")
        if limits.memory_bytes and os.path.exists(swap):
            write_text(swap, "0")
        write_text(os.path.join(base, "pids.max"), str(limits.pids_max or "max"))
        quota = str(limits.cpu_quota_us(CPU_PERIOD_US)) if limits.cpus else "max"
        write_text(os.path.join(base, "cpu.max"), f"{quota} {CPU_PERIOD_US}")

    def create(self, name: str, limits: Limits) -> list[str]:
        d = self._dir(name)
        ensure_dir(d)
        write_text(os.path.join(d, "memory.max"), str(limits.memory_bytes))
        swap = os.path.join(d, "memory.swap.max")
        if os.path.exists(swap):
            # Without this an instance could swap past its memory limit.
            write_text(swap, "0")
        write_text(os.path.join(d, "cpu.weight"), str(cpu_weight(limits)))
        write_text(os.path.join(d, "pids.max"), str(limits.pids_max))
        return [os.path.join(d, "cgroup.procs")]

    def memory_peak(self, name: str) -> int | None:
        # memory.peak exists since Linux 5.19.
        return read_int(os.path.join(self._dir(name), "memory.peak"))

    def oom_killed(self, name: str) -> bool:
        text = read_text(os.path.join(self._dir(name), "memory.events"))
        return (keyed_int(text, "oom_kill") or 0) > 0

    @property
    def freezer(self) -> bool:
        # In every non-root cgroup since Linux 5.2; the base exists once prepare() ran.
        return os.path.exists(os.path.join(self.base, "cgroup.freeze"))

    def freeze(self, name: str) -> None:
        # Nothing if the cgroup is gone, or on a kernel before 5.2 (no cgroup.freeze).
        self._write_freezer(name, os.path.join(self._dir(name), "cgroup.freeze"), b"1")

    def thaw(self, name: str) -> None:
        self._write_freezer(name, os.path.join(self._dir(name), "cgroup.freeze"), b"0")

    def frozen(self, name: str) -> bool:
        text = read_text(os.path.join(self._dir(name), "cgroup.events"))
        return keyed_int(text, "frozen") == 1

    def kill(self, name: str) -> None:
        d = self._dir(name)
        kill_file = os.path.join(d, "cgroup.kill")
        if os.path.exists(kill_file):
            # Linux 5.14+: the kernel kills the whole subtree, forks included.
            with contextlib.suppress(FileNotFoundError):  # removed meanwhile: nothing to kill
                write_text(kill_file, "1")
            return
        kill_loop([os.path.join(d, "cgroup.procs")], self._kill)


def _enable_controllers(cgroup: str) -> None:
    """Enable our controllers in ``cgroup``'s children (only those missing)."""
    path = os.path.join(cgroup, "cgroup.subtree_control")
    enabled = set((read_text(path) or "").split())
    missing = [c for c in CONTROLLERS if c not in enabled]
    if missing:
        write_text(path, " ".join(f"+{c}" for c in missing))


def _unavailable(cgroup: str, e: OSError) -> CgroupUnavailable:
    what = f"cannot enable the {', '.join(CONTROLLERS)} controllers in {cgroup}"
    if e.errno == errno.EBUSY:
        why = "other processes live in that cgroup"
    elif e.errno in (errno.ENOENT, errno.EINVAL):
        why = "a controller is not available there (check cgroup.controllers)"
    elif e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied"
    else:
        why = e.strerror or str(e)
    return CgroupUnavailable(f"{what}: {why}; {DELEGATE_HINT}")
