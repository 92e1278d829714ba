"""Function zygotes: a function's init runs once, and its instances are forks of it.

A function zygote starts like an instance (a shell's waiter gets *go*: cgroup,
egress namespace, the function's root), but instead of dropping to the
function's uid on the host directly it enters a **user namespace** of its own,
where the function's uid is the only id (mapped to itself by the runtime zygote,
which is root) and where it keeps capabilities. It then imports the handler module
(the function's init, once), answers ``READY`` on its socket like an instance, and
serves *fork* requests::

    function zygote ─fork─► C: unshare(pid|mount|uts|ipc[|net]) ─fork─► init; C exits

    init (pid 1 of the instance's own pid namespace), all ahead of demand and at idle
      CPU priority: reports its pid (the runtime zygote reads it from the socket's
      credentials, moves it into the instance's own cgroup (slow on cgroup v1) and
      mounts its /proc, under the sandbox's view, and /tmp: enter.mount_instance),
      then enters a cgroup namespace of its own, sets its hostname, brings up
      loopback, drops every capability, stacks the full seccomp filter
      ─fork─► instance-to-be (pid 2): reports ready, waits for *go* (its socket and
      output pipe; the runtime zygote restores its priority first), then closes every
      file descriptor of the zygote's, reseeds ``random``, reads its SPEC frame and
      serves (the handler module is already imported); init reaps zombies and
      reports the instance's wait status.

The zygote runs with a seccomp filter that still allows ``unshare`` (not ``mount``:
see :func:`nimbus.executor.sandbox.enter.mount_instance`); its mount namespace
belongs to the host's user namespace, so it could not change its own mounts anyway.
Everything here is standard library and runs in forks of the runtime zygote.

Messages on the zygote's control socket (``SOCK_SEQPACKET``, from the runtime
zygote): ``b"U"`` → (map written) ``b"M"`` once; then JSON ``{"op": "shell",
"netns", "idle", "tmp_mb", "hostname"}`` with one fd, the shell's report socket
(``netns``: share the zygote's egress network namespace instead of a new one). On
the report socket init sends ``b"P"`` (its credentials carry its pid), the runtime
zygote answers ``b"M"`` once it is in its cgroup; the instance-to-be sends ``b"R"``
(its pid), and later gets *go*, ``{"id"}`` with its socket and output pipe (or the
socket closes: retired); init sends ``b"S" + wait status`` when the instance
ends.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import signal
import socket
import sys
import traceback
from typing import Any

from nimbus.executor.sandbox import enter, linux
from nimbus.executor.zygote.spawn import (
    REPORT,
    close_fds_except,
    leave_as_a_program,
    private_spec,
    standard_fds,
)

#: The instance's namespaces (a network namespace too, unless the function's egress
#: namespace is shared).
INSTANCE_NAMESPACES = (
    linux.CLONE_NEWPID | linux.CLONE_NEWNS | linux.CLONE_NEWUTS | linux.CLONE_NEWIPC
)


def enter_user_namespace(ctl: socket.socket, uid: int) -> None:
    """Become the function's uid in a user namespace of our own, keeping capabilities
    there. The runtime zygote writes the id maps (``uid uid 1``) when asked."""
    os.setgroups([])  # while still root: supplementary groups cannot be dropped later
    linux.unshare(linux.CLONE_NEWUSER)
    ctl.send(b"U")
    if ctl.recv(16) != b"M":
        raise RuntimeError("the runtime zygote did not map the user namespace")
    # Until now this process had the host root's credentials; with the map in place,
    # these make it the function's uid on the host too (and keep its capabilities in
    # the namespace: 0 is not mapped, so this is no change away from root).
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)


def unforkable(renewed: set[int] | frozenset[int] = frozenset()) -> str | None:
    """Why this function zygote, its init done, must not be forked; None if it can be.

    A fork copies one thread and every descriptor: threads the init started would be
    missing (and any lock one held, stuck), and files or sockets it opened would be
    shared by every instance, or, closed, their numbers reused under the objects that
    still hold them. Such a version runs without a function zygote instead."""
    import threading

    threads = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    files = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 4 or fd in renewed:
            continue  # ours (/dev/null, the output pipe, our socket, the control socket),
            # or what each fork renews (the init's event loops)
        try:
            files.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue  # the listing's own descriptor, closed by now
    if not threads and not files:
        return None
    parts = []
    if files:
        parts.append(f"{len(files)} open file(s) ({', '.join(sorted(files)[:3])})")
    if threads:
        parts.append(f"{len(threads)} thread(s) ({', '.join(threads[:3])})")
    return "its init left " + " and ".join(parts) + " that forked instances cannot share"


def serve_forks(ctl: socket.socket, own_sock: int, strict_bpf: bytes | None) -> None:
    """The zygote's loop after its init: fork an instance shell per request. Never
    returns."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the C processes report for themselves
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ, "ctl")
    sel.register(own_sock, selectors.EVENT_READ, "own")
    while True:
        for key, _ in sel.select():
            if key.data == "own":
                # The server closed the zygote's socket (or wrote to it: never): stop.
                try:
                    data = os.read(own_sock, 1)
                except OSError:
                    data = b""
                if not data:
                    os._exit(0)
                continue
            try:
                data, fds, _, _ = socket.recv_fds(ctl, 1 << 16, 1)
            except InterruptedError:
                continue
            if not data:
                os._exit(0)  # the runtime zygote is gone
            if len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                continue
            msg = json.loads(data)
            sys.stdout.flush()
            sys.stderr.flush()
            try:
                pid = os.fork()
            except OSError:
                pid = -1  # out of pids or memory: this shell fails (its socket closes)
            if pid == 0:
                _instance_parent(msg, fds[0], strict_bpf)
            os.close(fds[0])


def _instance_parent(shell: dict[str, Any], report_fd: int, strict_bpf: bytes | None) -> None:
    """C: new namespaces for an instance, fork its init, leave. Never returns."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        # The init's event loops' descriptors stay until the instance renews them.
        close_fds_except({report_fd} | _bootstrap().event_loop_fds())
        if shell.get("idle"):
            # Made ahead of demand: never in the way of a cold start in progress (the
            # runtime zygote, root, gives the instance its normal priority back on go).
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        shared_net = bool(shell.get("netns"))
        linux.unshare(INSTANCE_NAMESPACES | (0 if shared_net else linux.CLONE_NEWNET))
        if os.fork() == 0:
            _init(shell, report_fd, strict_bpf)
    finally:
        os._exit(0)  # init is reparented; its report socket says how the instance ends


def _init(shell: dict[str, Any], report_fd: int, strict_bpf: bytes | None) -> None:
    """pid 1 of an instance's pid namespace, made ahead of demand: once in its cgroup,
    set the namespace up and fork the instance-to-be, then reap zombies and report the
    instance's status. Never returns."""
    try:
        linux.set_title(enter.INIT_TITLE)
        report = socket.socket(fileno=report_fd)
        # The credentials carry our pid: the runtime zygote moves us into our cgroup and
        # mounts our /proc and /tmp (enter.mount_instance: we may not mount).
        report.send(b"P")
        if report.recv(16) != b"M":
            os._exit(0)  # retired unused, or the move failed
        linux.unshare(linux.CLONE_NEWCGROUP)  # our new cgroup as the root we see
        linux.sethostname(shell["hostname"])
        if not shell.get("netns"):
            enter.loopback_up()
        for cap in range(linux.last_cap() + 1):
            linux.prctl(linux.PR_CAPBSET_DROP, cap)
        linux.prctl(linux.PR_CAP_AMBIENT, linux.PR_CAP_AMBIENT_CLEAR_ALL)
        linux.clear_capabilities()
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
        if strict_bpf:
            linux.load_seccomp_bpf(strict_bpf)
        instance = os.fork()
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    if instance == 0:
        _wait_for_go(report)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):  # init keeps nothing of the zygote's output
        os.dup2(devnull, fd)
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except InterruptedError:
            continue
        except ChildProcessError:
            os._exit(0)
        if pid == instance:
            try:
                report.send(REPORT.pack(b"S", status))
            finally:
                os._exit(0)  # pid 1 leaving takes every other process of the namespace


def _wait_for_go(report: socket.socket) -> None:
    """The instance-to-be (pid 2): get as far as it can without its socket (the runtime
    shim up to its init, which the zygote already did), say it is ready, wait for *go*
    (its socket and output pipe), serve. Never returns."""
    try:
        linux.set_title(enter.RUNTIME_TITLE)
        report.send(b"R")  # the credentials carry our pid: the one to prioritise on go
    except BaseException:
        os._exit(1)
    bootstrap = _bootstrap()

    def connect() -> tuple[int, bytes]:
        data, fds, _, _ = socket.recv_fds(report, 1 << 16, 2)
        if not data or len(fds) != 2:
            os._exit(0)  # retired unused, or the runtime zygote is gone
        report.close()
        standard_fds(fds[0], fds[1], keep=bootstrap.event_loop_fds())
        random.seed()  # a fork shares the zygote's random state: never reuse it
        return 3, private_spec(bootstrap)

    leave_as_a_program(lambda: bootstrap.serve(3, b"", connect=connect))


_BOOTSTRAP: list[Any] = []


def _bootstrap() -> Any:
    """The runtime shim module (kept: Nimbus's modules leave ``sys.modules`` before the
    function's init, so that the function cannot import them)."""
    return _BOOTSTRAP[0] if _BOOTSTRAP else sys.modules["nimbus.runtimes.python.bootstrap"]
