"""The instance's seccomp filter, compiled once by libseccomp into raw BPF.

A deny list on top of an allow-by-default policy: a function may run any
ordinary program (``subprocess``, threads, sockets), but not the calls that
reach kernel attack surface a function has no use for, or that would let it
leave its namespaces. The server compiles the filter with libseccomp (through
``pyseccomp``) at start; each instance loads the bytes with one ``prctl``
(:func:`nimbus.executor.sandbox.linux.load_seccomp_bpf`), so the zygote needs
neither libseccomp nor any compilation per instance.

Calls made through another ABI than the native one (``int 0x80`` on x86_64, or
x32 numbers) kill the process: libseccomp rejects them before any rule, which
closes the classic bypass of a deny list through a second syscall table.
"""

from __future__ import annotations

import contextlib
import errno
import tempfile

from nimbus.errors import ServiceException

from . import linux

__all__ = ["BLOCKED", "BLOCKED_IOCTLS", "CLONE_NAMESPACE_FLAGS", "compile_filter", "describe"]

BLOCKED: tuple[str, ...] = (
    # Kernel keyring: shared across the host, not namespaced.
    "keyctl",
    "add_key",
    "request_key",
    # Large, often-exploited kernel surfaces a function does not need.
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    # Reading or driving other processes.
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "pidfd_getfd",
    "kcmp",
    # Leaving or rearranging the sandbox's namespaces and mounts.
    "mount",
    "umount2",
    "pivot_root",
    "unshare",
    "setns",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "open_tree",
    "move_mount",
    "mount_setattr",
    # File handles bypass path lookup, and with it the mount namespace (shocker).
    "open_by_handle_at",
    "name_to_handle_at",
    # The machine itself.
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "syslog",
    "quotactl",
    "lookup_dcookie",
    "iopl",
    "ioperm",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "vhangup",
    "uselib",
    "nfsservctl",
)
"""Syscalls that fail with EPERM. Names this kernel architecture lacks are skipped."""

# ioctl(fd, TIOCSTI) pushes characters into a terminal's input queue, so a process
# sharing a tty could type commands into its parent shell; TIOCLINUX can too.
BLOCKED_IOCTLS: dict[str, int] = {"TIOCSTI": 0x5412, "TIOCLINUX": 0x541C}

CLONE_NAMESPACE_FLAGS: dict[str, int] = {
    "CLONE_NEWNS": linux.CLONE_NEWNS,
    "CLONE_NEWCGROUP": linux.CLONE_NEWCGROUP,
    "CLONE_NEWUTS": linux.CLONE_NEWUTS,
    "CLONE_NEWIPC": linux.CLONE_NEWIPC,
    "CLONE_NEWUSER": linux.CLONE_NEWUSER,
    "CLONE_NEWPID": linux.CLONE_NEWPID,
    "CLONE_NEWNET": linux.CLONE_NEWNET,
}

# The kernel reads ioctl's request as a 32-bit int: comparing only the low half
# stops a caller that sets junk in the high half to slip past an exact match.
_LOW_32 = 0xFFFFFFFF


#: What a function zygote may still do that its instances may not: make the namespaces
#: each forked instance gets (inside the zygote's own user namespace). Not mount: the
#: runtime zygote mounts an instance's /proc and /tmp for it, and the init's code, which
#: runs in the function zygote, must not mount a procfs of its own (without the view
#: over the host's files: see nimbus.executor.sandbox.procfs).
ZYGOTE_ALLOWED = frozenset({"unshare"})


def compile_filter(allow: frozenset[str] = frozenset()) -> bytes:
    """Build the filter and return it as raw classic BPF (8 bytes an instruction).

    ``allow``: blocked calls to leave out (:data:`ZYGOTE_ALLOWED` for a function
    zygote; its instances stack the full filter on top)."""
    try:
        import pyseccomp as sc  # type: ignore[import-untyped]
    except (ImportError, RuntimeError) as exc:  # RuntimeError: libseccomp.so.2 missing
        raise ServiceException(f"cannot build the seccomp filter: {exc}") from exc

    eperm = sc.ERRNO(errno.EPERM)
    f = sc.SyscallFilter(sc.ALLOW)
    f.set_attr(sc.Attr.ACT_BADARCH, sc.KILL_PROCESS)
    # A binary search over syscall numbers instead of a linear chain: every allowed
    # syscall the function makes walks this program. libseccomp < 2.5 lacks it; the
    # linear program is as correct, only longer.
    with contextlib.suppress(OSError):
        f.set_attr(sc.Attr.CTL_OPTIMIZE, 2)

    for name in BLOCKED:
        if name in allow:
            continue
        # Negative: unknown to libseccomp, or not a syscall on this architecture.
        if sc.resolve_syscall(sc.Arch.NATIVE, name) >= 0:
            f.add_rule(eperm, name)
    for request in BLOCKED_IOCTLS.values():
        f.add_rule(eperm, "ioctl", sc.Arg(1, sc.MASKED_EQ, _LOW_32, request))
    for flag in CLONE_NAMESPACE_FLAGS.values():
        f.add_rule(eperm, "clone", sc.Arg(0, sc.MASKED_EQ, flag, flag))
    # clone3 passes its flags in a struct seccomp cannot read. ENOSYS makes glibc
    # fall back to clone, whose flags the rules above do see (Docker does the same).
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")

    with tempfile.TemporaryFile() as out:
        f.export_bpf(out)
        out.seek(0)
        program = out.read()
    if not program or len(program) % 8:
        raise ServiceException(f"libseccomp exported a malformed filter ({len(program)} bytes)")
    return program


def describe() -> str:
    """One line saying what the filter blocks, for logs and docs."""
    return (
        f"seccomp: allow by default; EPERM for {', '.join(BLOCKED)}; "
        f"ioctl {'/'.join(BLOCKED_IOCTLS)}; clone with "
        f"{'/'.join(CLONE_NAMESPACE_FLAGS)}; ENOSYS for clone3; "
        "any non-native syscall ABI kills the process"
    )
