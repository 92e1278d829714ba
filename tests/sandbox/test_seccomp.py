"""The seccomp filter, loaded for real in forked children.

Each blocked call is made twice with arguments that are harmless either way:
under the filter it must fail with EPERM, and without it (as root, who holds
every capability) it must not, so the EPERM can only come from the filter.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import traceback
from collections.abc import Callable

import pyseccomp  # type: ignore[import-untyped]
import pytest

from nimbus.executor.sandbox import linux
from nimbus.executor.sandbox.seccomp import (
    BLOCKED,
    BLOCKED_IOCTLS,
    CLONE_NAMESPACE_FLAGS,
    compile_filter,
    describe,
)

ROOT = os.geteuid() == 0
PROGRAM = compile_filter()
TIOCSTI = BLOCKED_IOCTLS["TIOCSTI"]
TIOCLINUX = BLOCKED_IOCTLS["TIOCLINUX"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

Arg = int | bytes | None


def raw(name: str, *args: Arg) -> int:
    """syscall(2) by name; returns the errno it failed with, or 0."""
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, name)
    assert nr >= 0, name
    c_args = [ctypes.c_char_p(a) if isinstance(a, bytes) else ctypes.c_long(a or 0) for a in args]
    ctypes.set_errno(0)
    rc = _libc.syscall(ctypes.c_long(nr), *c_args)
    return ctypes.get_errno() if rc == -1 else 0


def raw_nr(nr: int) -> int:
    ctypes.set_errno(0)
    rc = _libc.syscall(ctypes.c_long(nr))
    return ctypes.get_errno() if rc == -1 else 0


def in_child(check: Callable[[], object], *, filtered: bool = True) -> tuple[int, str]:
    """Run ``check`` in a forked child, under the filter unless told otherwise.

    Returns the child's wait status and what ``check`` returned (or its traceback).
    """
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            if filtered:
                linux.prctl(linux.PR_SET_NO_NEW_PRIVS, 1)
                linux.load_seccomp_bpf(PROGRAM)
            os.write(w, str(check()).encode())
        except BaseException:
            os.write(w, traceback.format_exc().encode())
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read().decode()
    _, status = os.waitpid(pid, 0)
    return status, out


def errno_in_child(check: Callable[[], int], *, filtered: bool = True) -> int:
    status, out = in_child(check, filtered=filtered)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, out
    return int(out)


def test_program_is_raw_bpf() -> None:
    assert PROGRAM and len(PROGRAM) % 8 == 0
    assert "ptrace" in describe() and "TIOCSTI" in describe()
    assert {"keyctl", "bpf", "mount", "unshare", "setns", "open_by_handle_at"} <= set(BLOCKED)
    assert "personality" not in BLOCKED


_NOWHERE = b"/nonexistent/nimbus"
_KEY_SPEC_SESSION_KEYRING, _KEY_SPEC_PROCESS_KEYRING = -3, -2

BLOCKED_CALLS: dict[str, tuple[Arg, ...]] = {
    "unshare": (linux.CLONE_NEWNS,),
    "setns": (-1, 0),
    "mount": (b"none", _NOWHERE, b"tmpfs", 0, None),
    "umount2": (_NOWHERE, 0),
    "pivot_root": (_NOWHERE, _NOWHERE),
    "fsopen": (b"tmpfs", 0),
    "open_tree": (-1, _NOWHERE, 0),
    "ptrace": (0, 0, 0, 0),  # PTRACE_TRACEME
    "process_vm_readv": (os.getpid(), None, 0, None, 0, 0),
    "process_vm_writev": (os.getpid(), None, 0, None, 0, 0),
    "keyctl": (0, _KEY_SPEC_SESSION_KEYRING, 0),  # KEYCTL_GET_KEYRING_ID
    "add_key": (b"user", b"nimbus-test", b"x", 1, _KEY_SPEC_PROCESS_KEYRING),
    "request_key": (b"user", b"nimbus-test", None, 0),
    "bpf": (0, None, 0),
    "perf_event_open": (None, 0, -1, -1, 0),
    "userfaultfd": (0,),
    "io_uring_setup": (1, None),
    "open_by_handle_at": (-1, None, 0),
    "init_module": (None, 0, b""),
    "delete_module": (b"nimbus_nonexistent", 0),
    "swapon": (_NOWHERE, 0),
    "settimeofday": (None, None),
}


@pytest.mark.parametrize("name", sorted(BLOCKED_CALLS))
def test_blocked_syscall_fails_with_eperm(name: str) -> None:
    args = BLOCKED_CALLS[name]
    assert name in BLOCKED
    assert errno_in_child(lambda: raw(name, *args)) == errno.EPERM
    if ROOT:
        assert errno_in_child(lambda: raw(name, *args), filtered=False) != errno.EPERM


def _clone(flags: int) -> int:
    """A raw clone(2); the child, if any, leaves at once."""
    nr = pyseccomp.resolve_syscall(pyseccomp.Arch.NATIVE, "clone")
    ctypes.set_errno(0)
    pid = _libc.syscall(ctypes.c_long(nr), ctypes.c_long(flags | signal.SIGCHLD), *[0] * 4)
    if pid == 0:  # pragma: no cover - the clone's child
        os._exit(0)
    if pid > 0:
        os.waitpid(pid, 0)
        return 0
    return ctypes.get_errno()


@pytest.mark.parametrize("flag", sorted(CLONE_NAMESPACE_FLAGS))
def test_clone_into_a_new_namespace_fails(flag: str) -> None:
    value = CLONE_NAMESPACE_FLAGS[flag]
    assert errno_in_child(lambda: _clone(value)) == errno.EPERM
    if ROOT:
        assert errno_in_child(lambda: _clone(value), filtered=False) == 0


def test_clone3_is_enosys_so_libc_falls_back_to_clone() -> None:
    assert errno_in_child(lambda: raw("clone3", None, 0)) == errno.ENOSYS


def _tty_ioctl(request: int, arg: bytes) -> int:
    _, tty = os.openpty()
    try:
        fcntl.ioctl(tty, request, arg)
    except OSError as exc:
        return exc.errno or 0
    return 0


def test_tiocsti_is_blocked() -> None:
    assert errno_in_child(lambda: _tty_ioctl(TIOCSTI, b"x")) == errno.EPERM
    assert errno_in_child(lambda: _tty_ioctl(TIOCLINUX, bytes(8))) == errno.EPERM
    if ROOT:
        assert errno_in_child(lambda: _tty_ioctl(TIOCSTI, b"x"), filtered=False) == 0


def test_tiocsti_with_junk_in_the_high_bits_is_blocked_too() -> None:
    # The kernel truncates the request to 32 bits; an exact 64-bit match would miss this.
    def junk_tiocsti() -> int:
        _, tty = os.openpty()
        return raw("ioctl", tty, (1 << 32) | TIOCSTI, b"x")

    assert errno_in_child(junk_tiocsti) == errno.EPERM
    if ROOT:
        assert errno_in_child(junk_tiocsti, filtered=False) == 0


def test_other_terminal_ioctls_still_work() -> None:
    assert errno_in_child(lambda: _tty_ioctl(0x5413, bytes(8))) == 0  # TIOCGWINSZ


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86_64 ABIs")
def test_other_syscall_abis_kill_the_process() -> None:
    def x32_getpid() -> int:
        return raw_nr(0x40000000 | 39)

    def i386_getpid() -> int:
        # mov eax, 20 (getpid); int 0x80; ret
        code = b"\xb8\x14\x00\x00\x00\xcd\x80\xc3"
        page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(code)
        fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))
        return int(fn())

    for check in (x32_getpid, i386_getpid):
        status, _ = in_child(check)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS, check


# --- what must keep working -------------------------------------------------------------


def _fork() -> str:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os._exit(7)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 7
    return "ok"


def _subprocess() -> str:
    out = subprocess.run([sys.executable, "-c", "print(1)"], capture_output=True, check=True)
    assert out.stdout == b"1\n"
    return "ok"


def _posix_spawn() -> str:
    # glibc's posix_spawn tries clone3 first: this is the ENOSYS fallback at work.
    pid = os.posix_spawn("/bin/true", ["true"], {})
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    return "ok"


def _threads() -> str:
    seen: list[int] = []
    workers = [
        threading.Thread(target=lambda: seen.append(threading.get_ident())) for _ in range(4)
    ]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert len(set(seen)) >= 1 and len(seen) == 4
    return "ok"


def _files() -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "f")
        with open(path, "w") as f:
            f.write("hello")
        with open(path) as f:
            assert f.read() == "hello"
    return "ok"


def _sockets() -> str:
    a, b = socket.socketpair()
    a.sendall(b"ping")
    assert b.recv(4) == b"ping"
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        client.sendall(b"hi")
        assert conn.recv(2) == b"hi"
        client.close()
        conn.close()
    return "ok"


@pytest.mark.parametrize(
    "check",
    [_fork, _subprocess, _posix_spawn, _threads, _files, _sockets],
    ids=lambda f: f.__name__,
)
def test_ordinary_programs_still_work(check: Callable[[], str]) -> None:
    status, out = in_child(check)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and out == "ok", out
