"""Run one command in a sandbox of its own: how dependency builds run.

``python -I -S jail.py <nimbus root>``, the spec as JSON on stdin, started by the server
as root (see :mod:`nimbus.packaging.builder`). The spec::

    {"rootfs", "base", "prefix", "hidden": [...],   the instance root (rootfs.py)
     "procs": [...],          the cgroup's cgroup.procs files, joined first
     "netns": path | null,    an egress namespace to join; null: loopback only
     "binds": [[host, inside, writable], ...]        inside: under /var/task,
                              /var/runtime or /mnt (tmpfs-backed where needed)
     "uid", "tmp_mb", "memory_bytes", "nofile", "seccomp": path, "hostname",
     "argv": [...], "env": {...}, "cwd"}

The steps are an instance's (:mod:`.enter`): the cgroup, new mount, pid, ipc and
uts namespaces (and network, unless an egress one is given), pid 1 of its own with
loopback up, the read-only root with the binds, ``pivot_root``, the capability
bounding set dropped, ``no_new_privs``, the command's own uid, the instance
seccomp filter; then ``exec``. Nothing of the host is visible but the root and the
binds. It exits with the command's status (128 + signal when killed), and dies
with the server (``PR_SET_PDEATHSIG``); killing it kills its pid 1, and the whole
namespace with it.

Standard library only, like the zygote.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before any nimbus import: make the package importable
    sys.path.insert(0, sys.argv[1])

import json
import os
import signal
from typing import Any

from nimbus.executor.sandbox import enter, linux

#: Where binds may go: these are mountpoints of the root (made writable tmpfs first).
BIND_ROOTS = ("/var/task", "/var/runtime", "/mnt")


def main() -> None:
    spec = json.loads(sys.stdin.buffer.read())  # not argv: the build could read that
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    with open(spec["seccomp"], "rb") as f:
        spec["seccomp_bpf"] = f.read()  # read now: the host path is gone after pivot_root
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)  # the server is already gone
    enter.join_cgroups(spec["procs"])
    enter.unshare_namespaces(spec.get("netns"))
    init = os.fork()
    if init == 0:
        _init(spec)
    signal.signal(signal.SIGTERM, lambda *_: os.kill(init, signal.SIGKILL))
    sys.exit(_exit_code(_wait(init)))


def _init(spec: dict[str, Any]) -> None:
    """pid 1 of the build's pid namespace: fork the command, reap, report its status."""
    try:
        linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
        if spec.get("netns") is None:
            enter.loopback_up()
        worker = os.fork()
        if worker == 0:
            _command(spec)
        status = _wait(worker, reap_all=True)
    except BaseException as e:
        print(f"nimbus: the build sandbox could not start: {type(e).__name__}: {e}", flush=True)
        os._exit(125)
    os._exit(_exit_code(status))


def _command(spec: dict[str, Any]) -> None:
    try:
        rootfs = spec["rootfs"]
        # hidepid: the build sees its own processes only, not pid 1 (root, this script).
        enter.prepare_root(
            rootfs=rootfs,
            base=spec["base"],
            prefix=spec["prefix"],
            hidden=spec["hidden"],
            memory_bytes=spec.get("memory_bytes", 3 << 30),
            proc_options="hidepid=invisible",
        )
        _binds(rootfs, spec["binds"])
        enter.pivot_into(rootfs, spec["tmp_mb"])
        os.chdir(spec.get("cwd") or "/")
        linux.sethostname(spec["hostname"])
        enter.harden(nofile=spec["nofile"])
        uid = int(spec["uid"])
        bpf = spec["seccomp_bpf"]
        enter.drop_privileges(uid=uid, gid=uid, fsize=spec["fsize"], seccomp_bpf=bpf)
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except BaseException as e:
        print(f"nimbus: the build sandbox could not start: {type(e).__name__}: {e}", flush=True)
    os._exit(125)


def _binds(rootfs: str, binds: list[list[Any]]) -> None:
    """Each ``[host, inside, writable]``: a tmpfs on the root's mountpoint it is under
    (the root is read-only), the directory made there, the bind."""
    backed: set[str] = set()
    for host, inside, writable in binds:
        top = next((r for r in BIND_ROOTS if inside == r or inside.startswith(r + "/")), None)
        if top is None:
            raise ValueError(f"cannot bind at {inside}: not under {', '.join(BIND_ROOTS)}")
        if inside != top and top not in backed:
            linux.mount(
                "tmpfs",
                rootfs + top,
                "tmpfs",
                linux.MS_NOSUID | linux.MS_NODEV,
                "size=64k,mode=755",
            )
            backed.add(top)
        target = rootfs + inside
        if os.path.isdir(host):
            os.makedirs(target, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            open(target, "a").close()
        linux.mount(host, target, None, linux.MS_BIND | linux.MS_REC)
        flags = linux.MS_REMOUNT | linux.MS_BIND | linux.MS_NOSUID | linux.MS_NODEV
        if not writable:
            flags |= linux.MS_RDONLY
        linux.mount(None, target, None, flags)


def _wait(pid: int, *, reap_all: bool = False) -> int:
    """The wait status of ``pid``; as pid 1, also reaps every orphan meanwhile."""
    while True:
        try:
            got, status = os.waitpid(-1 if reap_all else pid, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            return 0
        if got == pid:
            return status


def _exit_code(status: int) -> int:
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


if __name__ == "__main__":
    main()
