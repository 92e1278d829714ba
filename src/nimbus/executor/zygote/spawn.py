"""The fork chains that make instances: *shells* made ahead of demand, then *go*.

A shell is everything about an instance that does not depend on the function.
The zygote keeps a few ready; a spawn sends one the function and its two file
descriptors (*go*), and only the function's own steps remain on the request's
path: no fork, no cgroup join, no namespace creation.

Plain shell (``--insecure-no-sandbox``)::

    zygote ─fork─► waiter (own session) ── go ──► bootstrap.serve()

Sandboxed shell::

    zygote ─fork─► child: new cgroup (joined), unshare mount/pid/ipc/uts/net
                   ─fork─► init (pid 1): lo up ─fork─► waiter (root, no function yet)
            └ the child reports init's pid and exits; init is adopted by the zygote
              (a subreaper), reaps zombies, and reports the waiter's exit status.

    go ──► waiter: cgroup limits, setns (egress), mounts + pivot_root, hostname,
           drop to the function's uid + seccomp ──► bootstrap.serve()

Shells made to refill the pool run at idle CPU priority (``SCHED_IDLE``) so
that making one never slows a cold start in progress (a waiter returns to
normal priority on *go*); a shell made because the pool was empty, for a
request that waits on it, runs at normal priority.

Reports go up a pipe: ``b"P" + pid``, ``b"S" + wait status``,
``b"E" + length + message``.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import resource
import signal
import socket
import struct
import sys
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    from nimbus.executor.sandbox.cgroups import CgroupDriver
    from nimbus.executor.sandbox.procfs import HostFacts

REPORT = struct.Struct("=ci")
MAX_FD = 65536
#: A shell's memory limit until a function claims it.
SHELL_MEMORY_MB = 128


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


def exit_code(e: SystemExit) -> int:
    """What the interpreter would exit with for ``sys.exit(e.code)``."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    print(e.code, file=sys.stderr)
    return 1


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    # SIGUSR2: the zygote's parent-death signal, whose handler is the zygote's own.
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_DFL)


def _idle_priority(idle: bool) -> None:
    # Leaving SCHED_IDLE needs privilege: without root, shells run at normal priority.
    if os.geteuid() == 0:
        policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
        os.sched_setscheduler(0, policy, os.sched_param(0))


def shell(
    name: str,
    report_fd: int,
    go_sock: socket.socket,
    cgroups: CgroupDriver | None,
    base_path: list[str],
    seccomp_bpf: bytes | None,
    root: dict[str, Any] | None,
    idle: bool = True,
) -> None:
    """The zygote's forked child that makes a shell (sandboxed when ``cgroups``). Never returns."""
    try:
        _reset_signals()
        if idle:  # a refill of the pool; a shell made for a waiting request runs at once
            _idle_priority(True)
        close_fds_except({report_fd, go_sock.fileno()})
        devnull = os.open("/dev/null", os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if cgroups is None:
            os.setsid()
            report(report_fd, b"P", os.getpid())
            os.close(report_fd)
            _wait_for_go(name, go_sock, None, base_path, None)
            raise AssertionError("unreachable")
        from nimbus.executor.sandbox import enter, linux
        from nimbus.executor.sandbox.cgroups import Limits

        _forget_the_zygote()
        enter.join_cgroups(cgroups.create(name, Limits.for_memory_mb(SHELL_MEMORY_MB)))
        enter.unshare_namespaces(None)
        init_pid = os.fork()
    except BaseException as e:
        report_error(report_fd, f"sandbox setup failed: {type(e).__name__}: {e}")
        os._exit(1)
    if init_pid:
        report(report_fd, b"P", init_pid)
        os._exit(0)

    # -- pid 1 of the new pid namespace ------------------------------------------------------
    try:
        enter.loopback_up()
        waiter = os.fork()
        if waiter:
            _idle_priority(False)  # init must be able to report promptly, even under load
    except BaseException as e:
        report_error(report_fd, f"sandbox setup failed: {type(e).__name__}: {e}")
        os._exit(1)
    if waiter == 0:
        os.close(report_fd)
        try:
            assert root is not None
            linux.set_title(enter.RUNTIME_TITLE)
            enter.prepare_root(
                rootfs=root["rootfs"],
                base=root["base"],
                prefix=root["prefix"],
                hidden=root["hidden"],
                memory_bytes=SHELL_MEMORY_MB << 20,
                facts=HOST_FACTS[0] if HOST_FACTS else None,
            )
            enter.harden(nofile=root["nofile"])
        except BaseException:
            os._exit(1)  # init reports it; the zygote then drops this shell
        _wait_for_go(name, go_sock, cgroups, base_path, seccomp_bpf)  # never returns
    go_sock.close()
    # init keeps nothing of the instance's, so its socket closes when the instance dies.
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == waiter:
            report(report_fd, b"S", status)
            os._exit(0)  # pid 1 leaving takes every other process of the namespace with it


def _forget_the_zygote() -> None:
    """What a sandbox's processes show of themselves, from here on: no command line of
    the zygote's (it names Nimbus's source, the data and cache directories), no
    environment (it names the node), ``sys.argv`` as an instance's."""
    from nimbus.executor.sandbox import enter, linux

    os.environ.pop("NIMBUS_NODE", None)
    sys.argv[:] = list(enter.RUNTIME_ARGV)
    sys.orig_argv[:] = [enter.RUNTIME_TITLE, *enter.RUNTIME_ARGV]
    linux.set_title(enter.INIT_TITLE, clear_environ=True)


def _wait_for_go(
    name: str,
    go_sock: socket.socket,
    cgroups: CgroupDriver | None,
    base_path: list[str],
    seccomp_bpf: bytes | None,
) -> None:
    """A shell's waiting process: receive a function, become its instance. Never returns."""
    try:
        data, fds, _, _ = socket.recv_fds(go_sock, 1 << 20, 4)
        if not data or len(fds) < 2:
            os._exit(0)  # the zygote retired this shell
        go_sock.close()
        sock_fd, out_fd = fds[:2]
        os.dup2(out_fd, 1)  # first: from here on, a failure is in the instance's logs
        os.dup2(out_fd, 2)
        _idle_priority(False)
        spec = json.loads(data)
        ctl = socket.socket(fileno=fds.pop()) if spec.get("zygote") else None
        netns_fd = fds[2] if len(fds) > 2 else None
        if cgroups is not None:
            _enter_sandbox(name, spec["sandbox"], cgroups, seccomp_bpf, netns_fd, zygote_ctl=ctl)
    except BaseException:
        traceback.print_exc()
        os._exit(1)
    if ctl is not None:
        _run_function_zygote(spec, sock_fd, out_fd, ctl, base_path, seccomp_bpf)
    _run_instance(spec, sock_fd, out_fd, base_path)


def _enter_sandbox(
    name: str,
    box: dict[str, Any],
    cgroups: CgroupDriver,
    seccomp_bpf: bytes | None,
    netns_fd: int | None,
    *,
    zygote_ctl: socket.socket | None = None,
) -> None:
    """The function's half of the sandbox; a function zygote (``zygote_ctl``) ends in a
    user namespace of its own, with the zygote's seccomp filter, instead."""
    from nimbus.executor.sandbox import enter, linux
    from nimbus.executor.sandbox.cgroups import Limits

    cgroups.create(name, Limits(box["memory_bytes"], box["cpu_weight"], box["pids_max"]))
    if box.get("netns"):
        if netns_fd is None:
            raise RuntimeError("an egress function came without its network namespace")
        linux.setns(netns_fd, linux.CLONE_NEWNET)  # the function's shared egress namespace
        os.close(netns_fd)
    enter.enter_root(
        rootfs=box["rootfs"],
        code=box["code"],
        layer=box.get("layer"),
        tmp_mb=box["tmp_mb"],
        memory_bytes=box["memory_bytes"],
        mounts=[(m[0], m[1]) for m in box.get("mounts", ())],
    )
    linux.sethostname(box["hostname"])
    if zygote_ctl is not None:
        from nimbus.executor.zygote import function

        resource.setrlimit(resource.RLIMIT_FSIZE, (box["fsize"], box["fsize"]))
        function.enter_user_namespace(zygote_ctl, box["uid"])
        linux.prctl(linux.PR_SET_DUMPABLE, 0)
        if ZYGOTE_BPF:
            linux.load_seccomp_bpf(ZYGOTE_BPF[0])
        return
    enter.drop_privileges(
        uid=box["uid"], gid=box["uid"], fsize=box["fsize"], seccomp_bpf=seccomp_bpf
    )


#: The function zygotes' seccomp filter (set by the zygote's main at start).
ZYGOTE_BPF: list[bytes] = []
#: What sandboxes' views of /proc keep of the host (read by the zygote's main at start).
HOST_FACTS: list[HostFacts] = []


def _run_function_zygote(
    spec: dict[str, Any],
    sock_fd: int,
    out_fd: int,
    ctl: socket.socket,
    base_path: list[str],
    strict_bpf: bytes | None,
) -> None:
    """A function zygote: init (the handler's import) as an instance would, answer
    READY, then fork instances on request (see :mod:`.function`). Never returns."""
    from nimbus.executor.zygote import function

    def body() -> None:
        # Out of the way of 0-3 first (any of the received descriptors may be there),
        # then at 4.
        raw = ctl.detach()
        high = fcntl.fcntl(raw, fcntl.F_DUPFD, 64)
        os.close(raw)
        standard_fds(sock_fd, out_fd, keep={high})
        os.dup2(high, 4)
        os.close(high)
        bootstrap, token = _become_function(spec, base_path)
        function._BOOTSTRAP.append(bootstrap)
        if bootstrap.serve(3, token, init_only=True, forkable=function.unforkable):
            function.serve_forks(socket.socket(fileno=4), 3, strict_bpf)

    leave_as_a_program(body)


def _run_instance(spec: dict[str, Any], sock_fd: int, out_fd: int, base_path: list[str]) -> None:
    """Serve, then leave the way a Python program would. Never returns."""

    def body() -> None:
        standard_fds(sock_fd, out_fd)
        bootstrap, token = _become_function(spec, base_path)
        bootstrap.serve(3, token)

    leave_as_a_program(body)


def leave_as_a_program(body: Callable[[], object]) -> NoReturn:
    """Run ``body``, then exit as a Python program would: the code of a ``SystemExit``,
    1 after any other exception (its traceback printed), output flushed."""
    code = 1
    try:
        body()
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


def standard_fds(sock_fd: int, out_fd: int, keep: set[int] | None = None) -> None:
    """An instance's descriptors: 0 the null device, 1 and 2 its output pipe, 3 its
    socket (and ``keep``); every other one closed."""
    devnull = os.open("/dev/null", os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    if sock_fd != 3:
        os.dup2(sock_fd, 3)
    close_fds_except({0, 1, 2, 3} | (keep or set()))


def private_spec(bootstrap: Any) -> bytes:
    """Read the SPEC frame on fd 3 and take its environment; the token.

    Environment and token arrive on the instance's own socket, never through the
    runtime zygote, whose memory every later fork inherits."""
    private = bootstrap.read_spec(3)
    if dict(os.environ) != private["env"]:  # a fork of a function zygote has it already
        os.environ.clear()
        os.environ.update(private["env"])
    return str(private["token"]).encode()


def _become_function(spec: dict[str, Any], base_path: list[str]) -> tuple[Any, bytes]:
    """The function's directory, environment and sys.path; nothing of Nimbus importable
    from here on (only the stdlib remains). The runtime shim and the token."""
    os.chdir(spec["task_root"])
    bootstrap = sys.modules["nimbus.runtimes.python.bootstrap"]
    token = private_spec(bootstrap)
    sys.path[:] = base_path
    for name in [m for m in sys.modules if m == "nimbus" or m.startswith("nimbus.")]:
        del sys.modules[name]
    random.seed()  # a fork shares the zygote's random state: never reuse it
    return bootstrap, token
