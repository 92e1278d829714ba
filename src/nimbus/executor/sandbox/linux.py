"""Thin ctypes wrappers for the Linux calls Python 3.11's ``os`` lacks.

Each raises ``OSError`` with the errno, like ``os`` functions do. Constants
are the kernel's (x86_64 and aarch64 share them).
"""

from __future__ import annotations

import contextlib
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)

CLONE_NEWTIME = 0x00000080
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 0x2

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_SECCOMP = 22
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_SET_CHILD_SUBREAPER = 36
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
PR_SET_MM = 35
PR_SET_MM_ENV_END = 11
SECCOMP_MODE_FILTER = 2

CAP_LAST_CAP_FILE = "/proc/sys/kernel/cap_last_cap"

_SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}.get(os.uname().machine, 155)
_SYS_OPENAT2 = 437  # the same on every architecture (Linux 5.6+)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


# The new mount API has the same numbers on every architecture (the unified table).
_SYS_MOVE_MOUNT, _SYS_FSOPEN, _SYS_FSCONFIG, _SYS_FSMOUNT = 429, 430, 431, 432

FSOPEN_CLOEXEC = 0x1
FSMOUNT_CLOEXEC = 0x1
FSCONFIG_SET_STRING = 1
FSCONFIG_SET_FD = 5
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOVE_MOUNT_F_EMPTY_PATH = 0x4
AT_FDCWD = -100


def _check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def open_no_symlinks(path: str, flags: int) -> int:
    """``openat2(path, flags)`` refusing a symbolic link in any component (``ELOOP``):
    what is opened is what the path names, whatever was swapped in meanwhile."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    return _check(
        _libc.syscall(
            ctypes.c_long(_SYS_OPENAT2),
            ctypes.c_int(AT_FDCWD),
            path.encode(),
            ctypes.byref(how),
            ctypes.c_size_t(ctypes.sizeof(how)),
        ),
        f"open {path}",
    )


def unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def setns(fd: int, nstype: int) -> None:
    _check(_libc.setns(ctypes.c_int(fd), ctypes.c_int(nstype)), "setns")


def mount(
    source: str | None, target: str, fstype: str | None, flags: int = 0, data: str | None = None
) -> None:
    _check(
        _libc.mount(
            source.encode() if source is not None else None,
            target.encode(),
            fstype.encode() if fstype is not None else None,
            ctypes.c_ulong(flags),
            data.encode() if data is not None else None,
        ),
        f"mount {target}",
    )


def umount2(target: str, flags: int = 0) -> None:
    _check(_libc.umount2(target.encode(), ctypes.c_int(flags)), f"umount {target}")


def fsopen(fstype: str) -> int:
    """A filesystem context (a descriptor) for a new ``fstype`` superblock."""
    return _check(
        _libc.syscall(ctypes.c_long(_SYS_FSOPEN), fstype.encode(), ctypes.c_uint(FSOPEN_CLOEXEC)),
        f"fsopen {fstype}",
    )


def fsconfig_string(fs_fd: int, key: str, value: str) -> None:
    """Set option ``key`` of a filesystem context to ``value``."""
    _check(
        _libc.syscall(
            ctypes.c_long(_SYS_FSCONFIG),
            ctypes.c_int(fs_fd),
            ctypes.c_uint(FSCONFIG_SET_STRING),
            key.encode(),
            value.encode(),
            ctypes.c_int(0),
        ),
        f"fsconfig {key}",
    )


def fsconfig_fd(fs_fd: int, key: str, fd: int) -> None:
    """Set option ``key`` of a filesystem context to the file descriptor ``fd``."""
    _check(
        _libc.syscall(
            ctypes.c_long(_SYS_FSCONFIG),
            ctypes.c_int(fs_fd),
            ctypes.c_uint(FSCONFIG_SET_FD),
            key.encode(),
            None,
            ctypes.c_int(fd),
        ),
        f"fsconfig {key}",
    )


def fsconfig_create(fs_fd: int) -> None:
    _check(
        _libc.syscall(
            ctypes.c_long(_SYS_FSCONFIG),
            ctypes.c_int(fs_fd),
            ctypes.c_uint(FSCONFIG_CMD_CREATE),
            None,
            None,
            ctypes.c_int(0),
        ),
        "fsconfig create",
    )


def fsmount(fs_fd: int, attr_flags: int) -> int:
    """A detached mount (a descriptor) of the context's superblock."""
    return _check(
        _libc.syscall(
            ctypes.c_long(_SYS_FSMOUNT),
            ctypes.c_int(fs_fd),
            ctypes.c_uint(FSMOUNT_CLOEXEC),
            ctypes.c_uint(attr_flags),
        ),
        "fsmount",
    )


def move_mount(mount_fd: int, target: str) -> None:
    """Attach the detached mount ``mount_fd`` at ``target``."""
    _check(
        _libc.syscall(
            ctypes.c_long(_SYS_MOVE_MOUNT),
            ctypes.c_int(mount_fd),
            b"",
            ctypes.c_int(AT_FDCWD),
            target.encode(),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        ),
        f"move_mount {target}",
    )


def pivot_root(new_root: str, put_old: str) -> None:
    _check(
        _libc.syscall(ctypes.c_long(_SYS_PIVOT_ROOT), new_root.encode(), put_old.encode()),
        "pivot_root",
    )


def prctl(option: int, arg2: int = 0, arg3: int = 0, arg4: int = 0, arg5: int = 0) -> int:
    return _check(
        _libc.prctl(
            ctypes.c_int(option),
            ctypes.c_ulong(arg2),
            ctypes.c_ulong(arg3),
            ctypes.c_ulong(arg4),
            ctypes.c_ulong(arg5),
        ),
        "prctl",
    )


def set_title(title: str, *, clear_environ: bool = False) -> None:
    """What ``/proc/<pid>/cmdline`` shows of this process and its forks: ``title``.

    The kernel reads a process's command line and environment from its own memory,
    where ``execve`` left the strings, so a fork shows its parent's. They are
    overwritten in place (setproctitle's way): the title, a NUL, zeros, and a non-NUL
    last byte, which tells the kernel to show only up to the first NUL.

    ``clear_environ`` (once, as root): the environment strings are zeroed too (the C
    library's ``environ`` copied away first, so ``getenv`` keeps working) and, where
    the kernel allows it (``CAP_SYS_RESOURCE``), the area is made empty, so
    ``/proc/<pid>/environ`` reads nothing."""
    with open("/proc/self/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    # Fields 48-51 (stat(5)), counted from the state, field 3.
    arg_start, arg_end, env_start, env_end = (int(x) for x in fields[45:49])
    room = arg_end - arg_start
    if room < 2:
        return
    data = title.encode()[: room - 2] + b"\0"
    ctypes.memset(arg_start, 0, room)
    ctypes.memmove(arg_start, data, len(data))
    ctypes.memset(arg_start + room - 1, ord("."), 1)
    if not clear_environ or env_end <= env_start:
        return
    environ = dict(os.environ)
    _libc.clearenv()
    for key, value in environ.items():
        _libc.setenv(os.fsencode(key), os.fsencode(value), 1)
    ctypes.memset(env_start, 0, env_end - env_start)
    # Without CAP_SYS_RESOURCE the environment reads as NULs, which is as empty.
    with contextlib.suppress(OSError):
        prctl(PR_SET_MM, PR_SET_MM_ENV_END, env_start)


def sethostname(name: str) -> None:
    raw = name.encode()
    _check(_libc.sethostname(raw, ctypes.c_size_t(len(raw))), "sethostname")


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def load_seccomp_bpf(program: bytes) -> None:
    """Install a compiled classic-BPF seccomp program (8 bytes per instruction).

    The program is produced by libseccomp (see :mod:`.seccomp`); loading the
    bytes directly costs one syscall instead of recompiling per instance.
    ``no_new_privs`` must be set first.
    """
    buf = ctypes.create_string_buffer(program, len(program))
    prog = _SockFprog(len(program) // 8, ctypes.cast(buf, ctypes.c_void_p))
    _check(
        _libc.prctl(
            ctypes.c_int(PR_SET_SECCOMP),
            ctypes.c_ulong(SECCOMP_MODE_FILTER),
            ctypes.byref(prog),
            ctypes.c_ulong(0),
            ctypes.c_ulong(0),
        ),
        "seccomp",
    )


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def clear_capabilities() -> None:
    """Drop every capability (effective, permitted, inheritable) of this thread: for a
    process that keeps its uid (inside a user namespace), where a setuid cannot."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capset(ctypes.byref(header), data), "capset")


def last_cap() -> int:
    try:
        with open(CAP_LAST_CAP_FILE) as f:
            return int(f.read())
    except OSError:
        return 40
