"""The seccomp filter and the missing capabilities: a function cannot leave its
namespaces, rearrange mounts, or reach the kernel's larger attack surfaces."""

from __future__ import annotations

from typing import Any

import pytest

from tests.security.attacks import (
    assert_denied,
    assert_unharmed,
    attack,
    deploy,
    function_error,
    invoke,
)
from tests.support import NimbusServer

#: Every one of these must fail with EPERM. Several would succeed for any
#: unprivileged process without the filter (keyctl, unshare/clone with
#: CLONE_NEWUSER, userfaultfd, io_uring_setup, ioctl TIOCSTI's ENOTTY on
#: /dev/null): EPERM there is the filter's doing.
SYSCALLS = [
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "unshare(CLONE_NEWUSER)",
    "unshare(CLONE_NEWNS)",
    "unshare(CLONE_NEWNET)",
    "unshare(CLONE_NEWUSER|CLONE_NEWNS)",
    "clone(CLONE_NEWUSER)",
    "setns(net)",
    "setns(mnt)",
    "setns(pid)",
    "setns(user)",
    "keyctl",
    "add_key",
    "request_key",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "open_by_handle_at",
    "name_to_handle_at",
    "open_tree",
    "fsopen",
    "kexec_load",
    "init_module",
    "reboot",
    "swapon",
    "acct",
    "syslog",
    "process_vm_writev",
    "kcmp",
    "pidfd_getfd",
    "finit_module",
    "delete_module",
    "kexec_file_load",
    "swapoff",
    "settimeofday",
    "clock_settime",
    "iopl",
    "ioperm",
    "io_uring_enter",
    "io_uring_register",
    "move_mount",
    "fsmount",
    "sethostname",
    "mknod",
    "ioctl(0, TIOCSTI)",
    "ioctl(1, TIOCSTI)",
    "ioctl(2, TIOCSTI)",
    "ioctl(0, TIOCLINUX)",
    "ioctl(0, TIOCSTI | 1 << 32)",
]


@pytest.fixture(scope="module")
def syscalls(server: NimbusServer) -> dict[str, dict[str, Any]]:
    """One instance tries them all (each test asserts one of them)."""
    deploy(server, "sec-syscalls")
    result = attack(server, "sec-syscalls", {"attack": "syscalls"})
    assert result["seccomp"] == "2", "the instance runs without a seccomp filter"
    return result["results"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("call", SYSCALLS)
def test_syscall_is_refused(
    server: NimbusServer, syscalls: dict[str, dict[str, Any]], call: str
) -> None:
    assert_denied(syscalls[call], {"EPERM"}, call)


def test_clone3_is_unavailable(syscalls: dict[str, dict[str, Any]]) -> None:
    # clone3 hides its flags from seccomp: ENOSYS sends glibc back to clone, which is filtered.
    assert_denied(syscalls["clone3(CLONE_NEWUSER)"], {"ENOSYS", "EPERM"}, "clone3(CLONE_NEWUSER)")


@pytest.mark.parametrize("abi", ["int80", "x32"])
def test_another_syscall_abi_kills_the_instance(server: NimbusServer, abi: str) -> None:
    """unshare(CLONE_NEWUSER) through the i386 (int 0x80) or x32 syscall ABI, in machine
    code: a filter written for the native ABI alone would let it through."""
    name = "sec-abi"
    if server.client.get(f"/v1/functions/{name}").status_code == 404:
        deploy(server, name)
    r = invoke(server, name, {"attack": "abi_bypass", "abi": abi})
    error, body = function_error(r)
    assert error is not None, f"unshare(CLONE_NEWUSER) through {abi} returned: {body}"
    assert error == "Crash" and "SIGSYS" in body["errorMessage"], f"{error}: {body}"
    assert attack(server, name, {"attack": "hello"})["hello"] == "from the attacker"
    assert_unharmed(server)


def test_tiocsti_on_a_pty_is_refused(syscalls: dict[str, dict[str, Any]]) -> None:
    if "ioctl(pty, TIOCSTI)" not in syscalls:
        # No /dev/ptmx in the sandbox: no pty to push characters into in the first place.
        assert_denied(syscalls["openpty"], {"ENOENT"}, "openpty()")
        return
    assert_denied(syscalls["ioctl(pty, TIOCSTI)"], {"EPERM"}, "ioctl(pty, TIOCSTI)")


def test_host_and_neighbour_survive_the_syscalls(
    server: NimbusServer, syscalls: dict[str, dict[str, Any]]
) -> None:
    # The attacker's instance itself is still fine too (nothing above half-worked).
    assert attack(server, "sec-syscalls", {"attack": "hello"})["hello"] == "from the attacker"
    assert_unharmed(server)
