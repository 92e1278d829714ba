"""The fork chain that turns a zygote fork into a (sandboxed) instance.

Plain::

    zygote ─fork─► instance (own session) ── runs bootstrap.serve()

Sandboxed::

    zygote ─fork─► child: join cgroup, unshare namespaces ─fork─► init (pid 1): mounts,
            │      pivot_root, hostname, lo ─fork─► instance: drop privileges,
            │      seccomp, bootstrap.serve()
            └ the child reports init's pid and exits; init is adopted by the zygote
              (a subreaper), reaps zombies, and reports the instance's exit status.

Reports go up a pipe as ``b"P" + pid``, ``b"S" + wait status`` or
``b"E" + message``. Killing init (pid 1 of the namespace) kills everything in it.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import sys
import traceback
from typing import Any

REPORT = struct.Struct("=ci")
MAX_FD = 65536


def close_fds_except(keep: set[int]) -> None:
    low = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, MAX_FD)


def report(fd: int, kind: bytes, value: int) -> None:
    os.write(fd, REPORT.pack(kind, value))


def report_error(fd: int, message: str) -> None:
    data = message.encode("utf-8", "replace")[:4000]
    os.write(fd, REPORT.pack(b"E", len(data)) + data)


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)


def _become_instance(spec: dict[str, Any], sock_fd: int, out_fd: int, base_path: list[str]) -> None:
    """Final steps shared by both modes: fds 0-3, environment, sys.path, then serve."""
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    if sock_fd != 3:
        os.dup2(sock_fd, 3)
    close_fds_except({0, 1, 2, 3})
    os.chdir(spec["task_root"])
    os.environ.clear()
    os.environ.update(spec["env"])
    bootstrap = sys.modules["nimbus.runtimes.python.bootstrap"]
    # Nothing of Nimbus is importable from the function: only the stdlib remains.
    sys.path[:] = base_path
    for name in [m for m in sys.modules if m == "nimbus" or m.startswith("nimbus.")]:
        del sys.modules[name]
    random.seed()  # a fork shares the zygote's random state: never reuse it
    bootstrap.serve(3, spec["token"].encode())


def exit_code(e: SystemExit) -> int:
    """What the interpreter would exit with for ``sys.exit(e.code)``."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def _run_instance(spec: dict[str, Any], sock_fd: int, out_fd: int, base_path: list[str]) -> None:
    """Serve, then leave the way a Python program would. Never returns."""
    code = 1
    try:
        _become_instance(spec, sock_fd, out_fd, base_path)
        code = 0
    except SystemExit as e:
        code = exit_code(e)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def plain(spec: dict[str, Any], sock_fd: int, out_fd: int, base_path: list[str]) -> None:
    """The forked child of a plain (unsandboxed) spawn. Never returns."""
    try:
        _reset_signals()
        os.setsid()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    _run_instance(spec, sock_fd, out_fd, base_path)


def sandboxed(
    spec: dict[str, Any],
    sock_fd: int,
    out_fd: int,
    report_fd: int,
    base_path: list[str],
    seccomp_bpf: bytes | None,
) -> None:
    """The zygote's forked child of a sandboxed spawn. Never returns."""
    from nimbus.executor.sandbox import enter, linux

    box = spec["sandbox"]
    try:
        _reset_signals()
        close_fds_except({sock_fd, out_fd, report_fd})
        os.dup2(out_fd, 1)
        os.dup2(out_fd, 2)
        enter.join_cgroups(box["cgroup_procs"])
        enter.unshare_namespaces(box.get("netns"))
        init_pid = os.fork()
    except BaseException as e:
        report_error(report_fd, f"sandbox setup failed: {type(e).__name__}: {e}")
        os._exit(1)
    if init_pid:
        report(report_fd, b"P", init_pid)
        os._exit(0)

    # -- pid 1 of the new pid namespace -------------------------------------------------
    try:
        enter.enter_root(
            rootfs=box["rootfs"],
            prefix=box["prefix"],
            hidden=box["hidden"],
            code=box["code"],
            layer=box.get("layer"),
            tmp_mb=box["tmp_mb"],
        )
        linux.sethostname(box["hostname"])
        if box.get("netns") is None:
            enter.loopback_up()
        instance_pid = os.fork()
    except BaseException as e:
        traceback.print_exc()
        report_error(report_fd, f"sandbox setup failed: {type(e).__name__}: {e}")
        os._exit(1)
    if instance_pid == 0:
        # -- the instance ----------------------------------------------------------------
        try:
            os.close(report_fd)
            enter.drop_privileges(
                uid=box["uid"],
                gid=box["uid"],
                nofile=box["nofile"],
                fsize=box["fsize"],
                seccomp_bpf=seccomp_bpf,
            )
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        _run_instance(spec, sock_fd, out_fd, base_path)
    # init keeps nothing of the instance's: its socket must close when the instance dies.
    os.close(sock_fd)
    os.close(out_fd)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(devnull, fd)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == instance_pid:
            report(report_fd, b"S", status)
            os._exit(0)  # pid 1 leaving takes every other process of the namespace with it
