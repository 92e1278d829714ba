"""The zygote process.

``python -I -S main.py <nimbus root> <control fd> <seccomp file> <node id> <pool size> <root>``

(``<root>``: the sandbox's prepared root as JSON — rootfs, prefix, hidden, nofile — or ``-``.)

One per node. It has the interpreter, the runtime shim and the sandbox code
loaded; the server asks it, over a ``SOCK_SEQPACKET`` socket, to start
instances, passing each instance's socket and output pipe as file
descriptors. It is single-threaded, so forking it is safe, and it is a child
subreaper, so every instance stays its child and it can tell the server how
each one ended.

It keeps ``pool size`` *shells* ready (see :mod:`.spawn`), sandboxed or plain
(``seccomp file`` empty): a spawn hands the function to a ready shell, and a
new shell is made right after, at idle CPU priority.

Messages are JSON, one per packet. Server → zygote: ``{"op": "spawn", "id",
"token", "env", "task_root", "sandbox": {...} | null}`` with two fds.
Zygote → server: ``{"ready": true, "pid", "sandbox_error"}``, ``{"spawned":
id, "pid", "cgroup"}``, ``{"failed": id, "error"}``, ``{"exit": id,
"status"}``. When the server's end closes, or the server dies (its parent-death
signal), the zygote kills everything (thawing what is frozen) and exits.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before any nimbus import: make the package importable
    _BASE_PATH = list(sys.path)
    sys.path.insert(0, sys.argv[1])

import contextlib
import errno
import itertools
import json
import os
import secrets
import selectors
import signal
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any

from nimbus.executor.sandbox import linux
from nimbus.executor.zygote import spawn

#: The zygote's parent-death signal (``PR_SET_PDEATHSIG``): one no terminal sends to a
#: process group (not SIGHUP: a hangup would kill the zygote of a server run under nohup).
SERVER_GONE = signal.SIGUSR2
#: Instance shells each function zygote keeps ready (forked, in their own cgroup).
FUNCTION_POOL = 1
#: Shells a function zygote may be making at once (a burst waits for them in turn).
MAX_MAKING = 4

#: Imported here once so that every instance starts with them loaded (shared pages).
PRELOAD = (
    "nimbus.runtimes.python.bootstrap",
    "nimbus.executor.sandbox.enter",
    "nimbus.executor.sandbox.cgroups",
    "nimbus.executor.zygote.function",
    "array",
    "fcntl",
    "importlib",
    "json",
    "logging",
    "random",
    "resource",
    "traceback",
    "uuid",
)

#: The standard library's commonly used modules, imported once in the zygote so that a
#: function importing them pays nothing (they are already in sys.modules after the fork).
#: Nothing here starts a thread or keeps a file open at import.
COMMON_STDLIB = (
    "asyncio",
    "base64",
    "collections",
    "concurrent.futures",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "email",
    "email.message",
    "email.parser",
    "email.policy",
    "email.utils",
    "enum",
    "fractions",
    "functools",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http",
    "http.client",
    "http.cookies",
    "io",
    "ipaddress",
    "itertools",
    "math",
    "mimetypes",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "re",
    "secrets",
    "shutil",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "typing",
    "unicodedata",
    "urllib",
    "urllib.error",
    "urllib.parse",
    "urllib.request",
    "xml",
    "xml.dom.minidom",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
    "zoneinfo",
)


@dataclass
class _Proc:
    """One instance (or a shell waiting to become one) and what is known of it."""

    sandboxed: bool
    id: str = ""  # the server's instance id; "" while a shell waits in the pool
    cgroup: str = ""  # the shell's cgroup name
    pid: int = 0  # the pid to signal: the instance (plain) or its init (sandboxed)
    child: int = 0  # the zygote's direct child
    go: socket.socket | None = None  # the shell's waiter, until it is given a function
    report_fd: int = -1
    report_buf: bytes = b""
    status: int | None = None
    announced: bool = False
    failed: str = ""
    child_reaped: bool = False
    init_reaped: bool = False
    #: A function zygote: the control socket to it (see nimbus.executor.zygote.function).
    ctl: socket.socket | None = None
    #: An instance forked by a function zygote: its report socket, and its cgroup's
    #: ``cgroup.procs`` files (it is moved there once it reports its pid).
    rep: socket.socket | None = None
    procs_files: list[str] = field(default_factory=list)
    forked: bool = False
    #: The function's uid (a function zygote's user namespace maps it to itself).
    uid: int = 0
    #: A function zygote: its id maps are written (its one message, ``U``, was had).
    mapped: bool = False
    #: A function zygote: its sandbox (limits, egress), its instance shells ready (in
    #: their cgroups) and being made, and fork requests waiting for one.
    box: dict[str, Any] = field(default_factory=dict)
    shells: list[_Proc] = field(default_factory=list)
    making: int = 0
    waiting: list[tuple[dict[str, Any], list[int]]] = field(default_factory=list)
    #: An instance shell: its function zygote; whether it is in its cgroup.
    zygote: _Proc | None = None
    ready: bool = False
    in_making: bool = False
    #: An instance shell's instance-to-be (pid 2 of its namespace), on the host.
    worker: int = 0

    @property
    def finished(self) -> bool:
        if self.rep is not None or self.forked:
            return self.rep is None  # a forked instance: its report socket closed
        # The report pipe is drained, the zygote's child reaped, and (sandboxed) init too.
        if self.report_fd != -1 or not self.child_reaped:
            return False
        return not self.sandboxed or self.pid == 0 or self.init_reaped


class Zygote:
    def __init__(
        self,
        ctrl: socket.socket,
        base_path: list[str],
        seccomp_bpf: bytes | None,
        cgroups: Any,
        pool_size: int,
        root: dict[str, Any] | None = None,
    ) -> None:
        self.ctrl = ctrl
        self.root = root
        self.base_path = base_path
        self.seccomp_bpf = seccomp_bpf
        self.cgroups = cgroups
        self.pool_size = pool_size
        self.sel = selectors.DefaultSelector()
        self.procs: list[_Proc] = []
        self.by_pid: dict[int, _Proc] = {}
        self.by_report: dict[int, _Proc] = {}
        self.pool: list[_Proc] = []
        self.names = (f"shell-{secrets.token_hex(4)}-{n}" for n in itertools.count())
        #: Short-lived children moving an instance shell into its cgroup: pid → shell.
        self.moving: dict[int, _Proc] = {}
        #: Cgroups of shells that died unused, removed once empty: (name, give up at).
        self.unused_cgroups: list[tuple[str, float]] = []

    def send(self, msg: dict[str, Any]) -> None:
        # If the server is gone, the loop notices on its next read.
        with contextlib.suppress(OSError):
            self.ctrl.send(json.dumps(msg).encode())

    # -- spawning ------------------------------------------------------------------------------
    def spawn(self, msg: dict[str, Any], fds: list[int]) -> None:
        """Hand a function to a shell. ``fds``: its socket, its output pipe, and for an
        egress function the network namespace to join."""
        rec = self.pool.pop(0) if self.pool else self.new_shell(idle=False)
        rec.id = msg["id"]
        assert rec.go is not None
        theirs = None
        if msg.get("zygote"):
            rec.uid = int(msg["sandbox"]["uid"])
            rec.box = msg["sandbox"]
            rec.ctl, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            rec.ctl.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            # Never blocks us: a function zygote that stops reading (its init left a
            # thread holding a lock, say) must not stall every other function's spawns.
            rec.ctl.setblocking(False)
            self.sel.register(rec.ctl, selectors.EVENT_READ, ("zygote", rec))
            fds = [*fds, theirs.fileno()]
        try:
            socket.send_fds(rec.go, [json.dumps(msg).encode()], fds)
        except OSError as e:
            rec.failed = f"the shell is gone: {e}"
        rec.go.close()
        rec.go = None
        for fd in fds:
            if theirs is None or fd != theirs.fileno():
                os.close(fd)
        if theirs is not None:
            theirs.close()
        if rec.failed:
            self._fail(rec)
        elif rec.pid:
            rec.announced = True
            self.send({"spawned": rec.id, "pid": rec.pid, "cgroup": rec.cgroup})

    def new_shell(self, *, idle: bool = True) -> _Proc:
        """Fork a shell; it reports its pid (init's, when sandboxed) when it is ready."""
        sandboxed = self.cgroups is not None
        rec = _Proc(sandboxed=sandboxed, cgroup=next(self.names) if sandboxed else "")
        report_r, report_w = os.pipe()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        pid = os.fork()
        if pid == 0:
            ours.close()
            os.close(report_r)
            spawn.shell(
                rec.cgroup or "plain",
                report_w,
                theirs,
                self.cgroups,
                self.base_path,
                self.seccomp_bpf,
                self.root,
                idle,
            )
        os.close(report_w)
        theirs.close()
        rec.go = ours
        rec.child = pid
        rec.report_fd = report_r
        self.by_report[report_r] = rec
        self.sel.register(report_r, selectors.EVENT_READ, "report")
        self._track(rec, pid)
        return rec

    def refill(self) -> None:
        """Top the pool up by one shell (called when there is nothing else to do)."""
        if len(self.pool) < self.pool_size:
            self.pool.append(self.new_shell())

    def _track(self, rec: _Proc, pid: int) -> None:
        self.procs.append(rec)
        self.by_pid[pid] = rec

    def _fail(self, rec: _Proc) -> None:
        if rec.id and not rec.announced:
            rec.announced = True
            self.send({"failed": rec.id, "error": rec.failed or "sandbox setup failed"})
        if rec in self.pool:
            self.pool.remove(rec)
            print(f"nimbus zygote: {rec.failed}", file=sys.stderr, flush=True)

    def on_report(self, fd: int) -> None:
        rec = self.by_report[fd]
        try:
            data = os.read(fd, 8192)
        except OSError:
            data = b""
        if not data:
            self.sel.unregister(fd)
            os.close(fd)
            del self.by_report[fd]
            rec.report_fd = -1
            self._maybe_finished(rec)
            return
        rec.report_buf += data
        size = spawn.REPORT.size
        while len(rec.report_buf) >= size:
            kind, value = spawn.REPORT.unpack_from(rec.report_buf)
            if kind == b"E":
                if len(rec.report_buf) < size + value:
                    break
                rec.failed = rec.report_buf[size : size + value].decode("utf-8", "replace")
                rec.report_buf = rec.report_buf[size + value :]
                self._fail(rec)
                continue
            rec.report_buf = rec.report_buf[size:]
            if kind == b"P":
                rec.pid = value
                if value != rec.child:
                    self.by_pid[value] = rec
                if rec.id and not rec.announced:
                    rec.announced = True
                    self.send({"spawned": rec.id, "pid": value, "cgroup": rec.cgroup})
            elif kind == b"S":
                rec.status = value

    # -- function zygotes ---------------------------------------------------------------------
    def fork(self, msg: dict[str, Any], fds: list[int]) -> None:
        """An instance of function zygote ``msg["zygote"]``: a ready shell of it gets *go*
        with ``fds`` (its socket and output pipe); without one, the request waits for the
        next shell."""
        zygote = next((p for p in self.procs if p.id == msg["zygote"] and p.ctl), None)
        if zygote is None:
            for fd in fds:
                os.close(fd)
            self.send({"failed": msg["id"], "error": "the function zygote is gone"})
            return
        if zygote.shells:
            self._go(zygote.shells.pop(0), msg, fds)
        else:
            zygote.waiting.append((msg, fds))
        self.refill_zygote(zygote)

    def refill_zygote(self, zygote: _Proc) -> None:
        """Keep FUNCTION_POOL shells of ``zygote`` ready, plus one per waiting request."""
        wanted = FUNCTION_POOL + len(zygote.waiting)
        while (
            zygote.ctl is not None
            and len(zygote.shells) + zygote.making < wanted
            and zygote.making < MAX_MAKING
        ):
            if not self._make_shell(zygote):
                return

    def _make_shell(self, zygote: _Proc) -> bool:
        """Ask ``zygote`` to fork an instance shell, in a new cgroup of the function's size."""
        from nimbus.executor.sandbox.cgroups import Limits

        assert zygote.ctl is not None
        box = zygote.box
        rec = _Proc(sandboxed=True, cgroup=next(self.names), forked=True, zygote=zygote)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            limits = Limits(box["memory_bytes"], box["cpu_weight"], box["pids_max"])
            rec.procs_files = self.cgroups.create(rec.cgroup, limits)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            request = json.dumps(
                {
                    "op": "shell",
                    "netns": bool(box.get("netns")),
                    "tmp_mb": box["tmp_mb"],
                    "hostname": box["hostname"],
                    # Ahead of demand, at idle priority; for a waiting request, at once.
                    "idle": not zygote.waiting,
                }
            ).encode()
            socket.send_fds(zygote.ctl, [request], [theirs.fileno()])
        except OSError as e:
            ours.close()
            self._zygote_failed(zygote, f"could not make an instance of the function zygote: {e}")
            self.remove_cgroup(rec.cgroup)
            return False
        finally:
            theirs.close()
        rec.rep = ours
        self.procs.append(rec)
        self.sel.register(ours, selectors.EVENT_READ, ("rep", rec))
        zygote.making += 1
        rec.in_making = True
        return True

    def _zygote_failed(self, zygote: _Proc, error: str) -> None:
        """The zygote could not make a shell: the oldest waiting request fails (not all:
        the next shell may work)."""
        if zygote.waiting:
            msg, fds = zygote.waiting.pop(0)
            for fd in fds:
                os.close(fd)
            self.send({"failed": msg["id"], "error": error})

    def _go(self, rec: _Proc, msg: dict[str, Any], fds: list[int]) -> None:
        """Hand a request to a ready shell: it becomes the instance."""
        assert rec.rep is not None
        rec.id = msg["id"]
        try:
            for pid in (rec.pid, rec.worker):
                with contextlib.suppress(OSError):
                    os.sched_setscheduler(pid, os.SCHED_OTHER, os.sched_param(0))
            socket.send_fds(rec.rep, [json.dumps({"id": rec.id}).encode()], fds)
        except OSError as e:
            rec.failed = f"the instance shell is gone: {e}"
        finally:
            for fd in fds:
                os.close(fd)
        if rec.failed:
            self._fail(rec)
            return
        rec.announced = True
        self.send({"spawned": rec.id, "pid": rec.pid, "cgroup": rec.cgroup})

    def _made(self, rec: _Proc) -> None:
        """``rec`` no longer counts as a shell being made (ready, or failed)."""
        if rec.zygote is not None and rec.in_making:
            rec.in_making = False
            rec.zygote.making -= 1

    def _moved(self, rec: _Proc, moved: bool) -> None:
        """A shell's move into its cgroup finished (the mover process exited)."""
        assert rec.zygote is not None and rec.rep is not None
        if moved:
            with contextlib.suppress(OSError):
                rec.rep.send(b"M")
                return
        self._made(rec)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(rec.pid, signal.SIGKILL)
        self._zygote_failed(rec.zygote, "could not set up an instance (its cgroup, /proc, /tmp)")

    def _shell_ready(self, rec: _Proc) -> None:
        """A shell is set up and its instance-to-be waits for *go*."""
        zygote = rec.zygote
        assert zygote is not None
        self._made(rec)
        rec.ready = True
        if zygote.waiting:
            msg, fds = zygote.waiting.pop(0)
            self._go(rec, msg, fds)
        else:
            zygote.shells.append(rec)
        self.refill_zygote(zygote)

    def _receive(self, sock: socket.socket) -> tuple[bytes, int]:
        """One message and its sender's pid; at the end (b"", 0), the socket closed."""
        try:
            data, ancillary, _, _ = sock.recvmsg(64, socket.CMSG_SPACE(12))
        except OSError:
            data, ancillary = b"", []
        if not data:
            self.sel.unregister(sock)
            sock.close()
            return b"", 0
        return data, _sender_pid(ancillary)

    def on_zygote(self, rec: _Proc) -> None:
        """A function zygote asks for its user namespace's id maps: once, and that is
        all it ever sends. Anything more comes from the function's own code (its init
        can reach the socket, or leave a process that does): that zygote is stopped,
        with one line, so that nothing of a function can flood the runtime zygote."""
        assert rec.ctl is not None
        data, pid = self._receive(rec.ctl)
        if not data:
            rec.ctl = None
            while rec.waiting:
                self._zygote_failed(rec, "the function zygote exited")
            return
        if rec.mapped or data != b"U" or not pid:
            print(
                f"nimbus zygote: function zygote {rec.id} sent an unexpected control "
                "message (its function's code?); it is stopped",
                file=sys.stderr,
                flush=True,
            )
            self.sel.unregister(rec.ctl)
            rec.ctl.close()
            rec.ctl = None
            while rec.waiting:
                self._zygote_failed(rec, "the function zygote misbehaved and was stopped")
            for target in (rec.pid, rec.child):
                if target:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(target, signal.SIGKILL)
            return
        rec.mapped = True
        uid = rec.uid
        try:
            with open(f"/proc/{pid}/setgroups", "w") as f:
                f.write("deny")
            with open(f"/proc/{pid}/uid_map", "w") as f:
                f.write(f"{uid} {uid} 1")
            with open(f"/proc/{pid}/gid_map", "w") as f:
                f.write(f"{uid} {uid} 1")
            rec.ctl.send(b"M")
            self.refill_zygote(rec)  # queued until its init is done
        except OSError as e:
            print(f"nimbus zygote: cannot map {pid}: {e}", file=sys.stderr, flush=True)
            with contextlib.suppress(OSError):
                rec.ctl.send(b"X")

    def on_rep(self, rec: _Proc) -> None:
        """An instance shell of a function zygote: its pid (it is then moved into its
        cgroup by a short-lived child, so that the slow write blocks nobody), its end."""
        assert rec.rep is not None
        data, sender = self._receive(rec.rep)
        if not data:
            rec.rep = None
            zygote = rec.zygote
            if zygote is not None and rec in zygote.shells:
                zygote.shells.remove(rec)
            elif zygote is not None and not rec.ready:
                self._made(rec)
                self._zygote_failed(zygote, "the function zygote could not make an instance")
            if rec.id and not rec.announced:
                rec.failed = rec.failed or "the function zygote could not start the instance"
            if not rec.announced:
                # Never handed to the server (unused, or its go failed): nobody else
                # removes its cgroup. (An announced one is the server's: it reads it
                # for an OOM kill before removing it.)
                self.remove_cgroup(rec.cgroup)
            self._maybe_finished(rec)
            return
        if data[:1] == b"P" and sender and not rec.pid:
            rec.pid = sender
            self.by_pid[sender] = rec
            mover = os.fork()
            if mover == 0:
                self._set_up(rec, sender)
            self.moving[mover] = rec
        elif data[:1] == b"R" and sender and rec.zygote is not None and not rec.worker:
            rec.worker = sender
            self._shell_ready(rec)
        elif data[:1] == b"S" and len(data) >= spawn.REPORT.size:
            rec.status = spawn.REPORT.unpack_from(data)[1]

    def _set_up(self, rec: _Proc, pid: int) -> None:
        """In a child: move instance shell ``rec`` (its init is ``pid``) into its cgroup,
        then mount its /proc and /tmp (the instance may not). Never returns."""
        from nimbus.executor.sandbox import enter

        code = 1
        try:
            for path in rec.procs_files:
                with open(path, "w") as f:
                    f.write(str(pid))
            assert rec.zygote is not None
            box = rec.zygote.box
            enter.mount_instance(
                pid,
                tmp_mb=box["tmp_mb"],
                memory_bytes=box["memory_bytes"],
                facts=spawn.HOST_FACTS[0],
            )
            code = 0
        except BaseException as e:
            print(f"nimbus zygote: cannot set up instance {pid}: {e}", file=sys.stderr, flush=True)
        finally:
            os._exit(code)

    def remove_cgroup(self, name: str) -> None:
        """Remove a cgroup nobody will use, once its processes are gone (retried)."""
        self.unused_cgroups.append((name, time.monotonic() + 10))

    def sweep_cgroups(self) -> None:
        keep = []
        for name, until in self.unused_cgroups:
            try:
                done = self.cgroups.remove(name)
            except OSError:
                done = False
            if not done and time.monotonic() < until:
                keep.append((name, until))
        self.unused_cgroups = keep

    # -- reaping -------------------------------------------------------------------------------
    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            moved = self.moving.pop(pid, None)
            if moved is not None:
                ok = os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
                if moved.rep is not None:
                    self._moved(moved, ok)
                continue
            rec = self.by_pid.pop(pid, None)
            if rec is None:
                continue
            if pid == rec.child:
                rec.child_reaped = True
                if not rec.sandboxed:
                    rec.status = status
            if rec.sandboxed and pid == rec.pid:
                rec.init_reaped = True
                if rec.status is None:
                    rec.status = status  # init died without reporting: killed from outside
            self._maybe_finished(rec)

    def _maybe_finished(self, rec: _Proc) -> None:
        """Report an end once every process of it is reaped and its pipe drained."""
        if not rec.finished or rec not in self.procs:
            return
        self.procs.remove(rec)
        if rec.forked:
            self.by_pid.pop(rec.pid, None)
        if rec.ctl is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(rec.ctl)
            rec.ctl.close()
            rec.ctl = None
        while rec.waiting:
            self._zygote_failed(rec, "the function zygote exited")
        if rec in self.pool:
            self.pool.remove(rec)
        if rec.go is not None:
            rec.go.close()
            rec.go = None
        if not rec.id:
            return  # a pooled shell died before it was used
        if not rec.announced:
            rec.announced = True
            self.send({"failed": rec.id, "error": rec.failed or "the instance exited during setup"})
        self.send({"exit": rec.id, "status": rec.status if rec.status is not None else 9})

    def kill_all(self) -> None:
        for rec in self.procs:
            for pid in (rec.pid, rec.child):
                if pid <= 0:
                    continue
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if rec.sandboxed:
                        os.kill(pid, signal.SIGKILL)
                    else:
                        os.killpg(pid, signal.SIGKILL)
            if rec.sandboxed and rec.cgroup:
                # An idle instance is frozen, and on cgroup v1 a frozen init acts on its
                # SIGKILL only once thawed; then its pid namespace goes with it.
                with contextlib.suppress(OSError):
                    self.cgroups.thaw(rec.cgroup)

    def server_gone(self) -> None:
        """The server closed our socket or died (PR_SET_PDEATHSIG): nobody will ever talk
        to these instances again, and a frozen one cannot notice by itself. Never returns."""
        try:
            self.kill_all()
        finally:
            os._exit(0)

    # -- the loop --------------------------------------------------------------------------------
    def run(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the server decides when we stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(SERVER_GONE, lambda *_: self.server_gone())
        self.sel.register(self.ctrl, selectors.EVENT_READ, "ctrl")
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        while True:
            # Block only when the pool is full; otherwise refill whenever no message waits
            # (the shell does its work at idle priority, so this costs the zygote one fork).
            if len(self.pool) < self.pool_size:
                timeout: float | None = 0
            else:
                timeout = 0.05 if self.unused_cgroups else None
            events = self.sel.select(timeout)
            if self.unused_cgroups:
                self.sweep_cgroups()
            if not events:
                self.refill()
                continue
            for key, _ in events:
                if key.data == "ctrl":
                    self.on_ctrl()
                elif key.data == "wake":
                    with contextlib.suppress(BlockingIOError):
                        while os.read(wake_r, 512):
                            pass
                    self.reap()
                elif isinstance(key.data, tuple) and key.data[0] == "zygote":
                    self.on_zygote(key.data[1])
                elif isinstance(key.data, tuple):
                    self.on_rep(key.data[1])
                else:
                    self.on_report(key.fd)

    def on_ctrl(self) -> None:
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.ctrl, 1 << 20, 4)
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.EINTR):
                return
            data, fds = b"", []
        if not data:
            self.server_gone()
        msg = json.loads(data)
        if msg.get("op") == "spawn" and len(fds) in (2, 3):
            sys.stdout.flush()
            sys.stderr.flush()
            self.spawn(msg, fds)
        elif msg.get("op") == "fork" and len(fds) == 2 and self.cgroups is not None:
            self.fork(msg, fds)
        else:
            for fd in fds:
                os.close(fd)


def _sender_pid(ancillary: list[tuple[int, int, bytes]]) -> int:
    """The sender's pid, in our pid namespace, from SCM_CREDENTIALS (0 if absent)."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(data) >= 12:
            return int(struct.unpack("=iII", data[:12])[0])
    return 0


def probe() -> str | None:
    """Can this machine sandbox? Try the namespaces in a throwaway child."""
    if os.geteuid() != 0:
        return f"sandboxing needs root (running as uid {os.geteuid()})"
    pid = os.fork()
    if pid == 0:
        try:
            from nimbus.executor.sandbox import enter

            linux.unshare(enter.NAMESPACES | linux.CLONE_NEWNET)
            os._exit(0)
        except BaseException:
            os._exit(1)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return "this kernel does not let Nimbus create mount, pid, ipc, uts and network namespaces"
    return None


def main() -> None:
    _root, ctrl_fd, seccomp_path, node_id, pool_size, root_json = sys.argv[1:7]
    ctrl = socket.socket(fileno=int(ctrl_fd))
    # Not SIGKILL: the zygote must kill its instances as it goes, frozen ones included
    # (see Zygote.server_gone); until run() handles it, its default action kills us.
    signal.signal(SERVER_GONE, signal.SIG_DFL)
    linux.prctl(linux.PR_SET_PDEATHSIG, SERVER_GONE)
    if os.getppid() == 1:
        os._exit(1)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    for name in COMMON_STDLIB:
        with contextlib.suppress(ImportError):  # a Python built without one of them
            importlib.import_module(name)
    import gc

    # What the zygote allocated stays put: forks share its pages, and the collector
    # never walks (and so never touches, and copies) them in an instance.
    gc.collect()
    gc.freeze()
    seccomp_bpf = None
    cgroups = None
    sandbox_error = None
    if seccomp_path:
        with open(seccomp_path, "rb") as f:
            seccomp_bpf = f.read()
        zygote_filter = os.path.join(os.path.dirname(seccomp_path), "seccomp-zygote.bpf")
        if os.path.exists(zygote_filter):
            with open(zygote_filter, "rb") as f:
                spawn.ZYGOTE_BPF.append(f.read())
        sandbox_error = probe()
        if sandbox_error is None:
            from nimbus.executor.sandbox import procfs

            spawn.HOST_FACTS.append(procfs.host_facts())
            from nimbus.executor.sandbox.cgroups import CgroupUnavailable, detect

            try:
                cgroups = detect(node_id)
            except CgroupUnavailable as e:
                sandbox_error = str(e)
    root = json.loads(root_json) if root_json != "-" else None
    zygote = Zygote(ctrl, _BASE_PATH, seccomp_bpf, cgroups, int(pool_size), root)
    zygote.send({"ready": True, "pid": os.getpid(), "sandbox_error": sandbox_error})
    zygote.run()


if __name__ == "__main__":
    main()
