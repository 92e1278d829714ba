"""The zygote process: ``python -I -S main.py <nimbus root> <control fd> <seccomp file>``.

One per node. It has the interpreter, the runtime shim and the sandbox code
loaded; the server asks it, over a ``SOCK_SEQPACKET`` socket, to fork
instances (see :mod:`.spawn`), passing each instance's socket and output pipe
as file descriptors. It is single-threaded, so forking it is safe, and it is a
child subreaper, so the instances it starts stay its children and it can tell
the server how each one ended.

Messages are JSON, one per packet. Server → zygote: ``{"op": "spawn", "id",
"token", "env", "task_root", "sandbox": {...} | null}`` with two fds.
Zygote → server: ``{"ready": true, "pid", "sandbox_error"}``, ``{"spawned":
id, "pid"}``, ``{"failed": id, "error"}``, ``{"exit": id, "status"}``. When the
server's end closes, the zygote kills every instance and exits.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before any nimbus import: make the package importable
    _BASE_PATH = list(sys.path)
    sys.path.insert(0, sys.argv[1])

import contextlib
import errno
import json
import os
import selectors
import signal
import socket
from dataclasses import dataclass
from typing import Any

from nimbus.executor.sandbox import linux
from nimbus.executor.zygote import spawn

#: Imported here once so that every instance starts with them loaded (shared pages).
PRELOAD = (
    "nimbus.runtimes.python.bootstrap",
    "importlib",
    "json",
    "logging",
    "traceback",
    "uuid",
    "random",
    "resource",
    "nimbus.executor.sandbox.enter",
)


@dataclass
class _Spawned:
    id: str
    sandboxed: bool
    pid: int = 0  # the pid to signal: the instance (plain) or its init (sandboxed)
    child: int = 0  # the zygote's direct child
    report_fd: int = -1
    report_buf: bytes = b""
    status: int | None = None
    announced: bool = False
    child_reaped: bool = False
    init_reaped: bool = False

    @property
    def finished(self) -> bool:
        if not self.sandboxed:
            return self.child_reaped
        # Sandboxed: the report pipe is drained, the intermediate child reaped, and
        # init (if it was ever started) reaped too.
        return self.report_fd == -1 and self.child_reaped and (self.pid == 0 or self.init_reaped)


class Zygote:
    def __init__(
        self, ctrl: socket.socket, base_path: list[str], seccomp_bpf: bytes | None
    ) -> None:
        self.ctrl = ctrl
        self.base_path = base_path
        self.seccomp_bpf = seccomp_bpf
        self.sel = selectors.DefaultSelector()
        self.by_id: dict[str, _Spawned] = {}
        self.by_pid: dict[int, _Spawned] = {}
        self.by_report: dict[int, _Spawned] = {}

    def send(self, msg: dict[str, Any]) -> None:
        # If the server is gone, the loop notices on its next read.
        with contextlib.suppress(OSError):
            self.ctrl.send(json.dumps(msg).encode())

    # -- spawning ---------------------------------------------------------------------------
    def spawn(self, msg: dict[str, Any], fds: list[int]) -> None:
        sock_fd, out_fd = fds
        ident = msg["id"]
        sandboxed = msg.get("sandbox") is not None
        rec = _Spawned(ident, sandboxed)
        if sandboxed:
            report_r, report_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                spawn.sandboxed(msg, sock_fd, out_fd, report_w, self.base_path, self.seccomp_bpf)
            os.close(report_w)
            rec.child = pid
            rec.report_fd = report_r
            self.by_report[report_r] = rec
            self.sel.register(report_r, selectors.EVENT_READ, "report")
        else:
            pid = os.fork()
            if pid == 0:
                spawn.plain(msg, sock_fd, out_fd, self.base_path)
            rec.child = rec.pid = pid
            rec.announced = True
            self.send({"spawned": ident, "pid": pid})
        os.close(sock_fd)
        os.close(out_fd)
        self.by_id[ident] = rec
        self.by_pid[pid] = rec

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
                text = rec.report_buf[size : size + value].decode("utf-8", "replace")
                rec.report_buf = rec.report_buf[size + value :]
                if not rec.announced:
                    rec.announced = True
                    self.send({"failed": rec.id, "error": text})
                continue
            rec.report_buf = rec.report_buf[size:]
            if kind == b"P":
                rec.pid = value
                self.by_pid[value] = rec
                rec.announced = True
                self.send({"spawned": rec.id, "pid": value})
            elif kind == b"S":
                rec.status = value

    # -- reaping ------------------------------------------------------------------------------
    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
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

    def _maybe_finished(self, rec: _Spawned) -> None:
        """Report an instance's end once every process of it is reaped and its pipe drained."""
        if not rec.finished or self.by_id.pop(rec.id, None) is None:
            return
        if not rec.announced:
            self.send({"failed": rec.id, "error": "the instance exited during sandbox setup"})
        self.send({"exit": rec.id, "status": rec.status if rec.status is not None else 9})

    def kill_all(self) -> None:
        for rec in list(self.by_id.values()):
            if rec.pid > 0:
                try:
                    if rec.sandboxed:
                        os.kill(rec.pid, signal.SIGKILL)
                    else:
                        os.killpg(rec.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    # -- the loop -------------------------------------------------------------------------------
    def run(self) -> None:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the server decides when we stop
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        self.sel.register(self.ctrl, selectors.EVENT_READ, "ctrl")
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        while True:
            for key, _ in self.sel.select():
                if key.data == "ctrl":
                    try:
                        data, fds, _flags, _addr = socket.recv_fds(self.ctrl, 1 << 20, 4)
                    except OSError as e:
                        if e.errno in (errno.EAGAIN, errno.EINTR):
                            continue
                        data, fds = b"", []
                    if not data:
                        self.kill_all()
                        os._exit(0)
                    msg = json.loads(data)
                    if msg.get("op") == "spawn" and len(fds) == 2:
                        sys.stdout.flush()
                        sys.stderr.flush()
                        self.spawn(msg, fds)
                    else:
                        for fd in fds:
                            os.close(fd)
                elif key.data == "wake":
                    try:
                        while os.read(wake_r, 512):
                            pass
                    except BlockingIOError:
                        pass
                    self.reap()
                else:
                    self.on_report(key.fd)


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
    root, ctrl_fd, seccomp_path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    base_path = _BASE_PATH
    ctrl = socket.socket(fileno=ctrl_fd)
    linux.prctl(linux.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() == 1:
        os._exit(1)
    linux.prctl(linux.PR_SET_CHILD_SUBREAPER, 1)
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    seccomp_bpf = None
    if seccomp_path:
        with open(seccomp_path, "rb") as f:
            seccomp_bpf = f.read()
    sandbox_error = probe() if seccomp_path else None
    zygote = Zygote(ctrl, base_path, seccomp_bpf)
    zygote.send({"ready": True, "pid": os.getpid(), "sandbox_error": sandbox_error})
    del root
    zygote.run()


if __name__ == "__main__":
    main()
