"""The view of /proc and the neutral command lines, for real: in forked children, in
namespaces of their own (root only)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nimbus.executor.sandbox import enter, linux, procfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="namespaces and mounts need root")

MB = 1 << 20


def in_child(body: Callable[[], Any]) -> Any:
    """``body()`` in a forked child; its JSON result, or its exception as an error."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            out = {"ok": body()}
        except BaseException as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    result = json.loads(data)
    assert "ok" in result, result.get("error")
    return result["ok"]


def test_a_title_replaces_the_command_line_and_the_environment() -> None:
    os.environ["NIMBUS_TEST_TITLE_MARKER"] = "/some/host/path"

    def body() -> dict[str, Any]:
        linux.set_title("init", clear_environ=True)
        with open("/proc/self/cmdline", "rb") as f:
            cmdline = f.read()
        with open("/proc/self/environ", "rb") as f:
            environ = f.read()
        child = os.fork()
        if child == 0:
            os.execvp("sh", ["sh", "-c", 'test "$NIMBUS_TEST_TITLE_MARKER" = /some/host/path'])
        _, status = os.waitpid(child, 0)
        return {
            "cmdline": cmdline.decode(),
            "environ": environ.strip(b"\0").decode(),
            "getenv_still_works": os.waitstatus_to_exitcode(status) == 0,
        }

    try:
        seen = in_child(body)
    finally:
        del os.environ["NIMBUS_TEST_TITLE_MARKER"]
    assert seen == {"cmdline": "init\0", "environ": "", "getenv_still_works": True}


def new_proc_with_view(tmp: Path, memory_bytes: int) -> Callable[[], dict[str, Any]]:
    def body() -> dict[str, Any]:
        linux.unshare(linux.CLONE_NEWNS)
        linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
        (tmp / "proc").mkdir()
        (tmp / "staging").mkdir()
        linux.mount("proc", str(tmp / "proc"), "proc", linux.MS_NOSUID | linux.MS_NODEV)
        linux.mount("tmpfs", str(tmp / "staging"), "tmpfs", 0, "size=1m,mode=700")
        view = procfs.render(memory_bytes, procfs.host_facts(), booted=0, now=1)
        procfs.mount_view(str(tmp / "proc"), str(tmp / "staging"), view)
        procfs.write_meminfo(str(tmp / "staging"), 2 * memory_bytes)  # as on go
        linux.umount2(str(tmp / "staging"), linux.MNT_DETACH)
        proc = tmp / "proc"
        return {
            "meminfo": (proc / "meminfo").read_text().splitlines()[0],
            "cmdline": (proc / "cmdline").read_text(),
            "kallsyms": (proc / "kallsyms").read_bytes().decode(),
            "kallsyms_mode": oct((proc / "kallsyms").stat().st_mode & 0o777),
            "self_status": (proc / "self" / "status").read_text().startswith("Name:"),
            "sys_writable": os.access(proc / "sys" / "kernel" / "hostname", os.W_OK),
            "acpi": sorted(os.listdir(proc / "acpi")) if (proc / "acpi").exists() else [],
        }

    return body


def test_the_view_covers_the_hosts_files(tmp_path: Path) -> None:
    seen = in_child(new_proc_with_view(tmp_path, 64 * MB))
    assert seen["meminfo"].split() == ["MemTotal:", str(128 * 1024), "kB"]
    assert seen["cmdline"] == "\n"
    assert seen["kallsyms"] == "" and seen["kallsyms_mode"] == "0o0"  # root reads it: empty
    assert seen["self_status"] and seen["acpi"] == []
    assert not seen["sys_writable"]  # read-only, even for root


def fake_instance(tmp: Path) -> tuple[int, int, int, int]:
    """A process waiting as pid 1 of new mount and pid namespaces, in a root of its own
    (a tmpfs with empty /proc and /tmp), as an instance of a function zygote waits:
    (its pid, the intermediate child to reap, the pipe to say go on, the pipe its
    report comes on)."""
    pid_r, pid_w = os.pipe()
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (pid_r, ready_r, go_w, out_r):
                os.close(fd)
            linux.unshare(linux.CLONE_NEWNS | linux.CLONE_NEWPID)
            init = os.fork()
            if init == 0:
                os.close(pid_w)
                linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
                root = str(tmp)
                linux.mount("tmpfs", root, "tmpfs", 0, "size=1m")
                for d in ("proc", "tmp", "old"):
                    os.mkdir(f"{root}/{d}")
                os.chdir(root)
                linux.pivot_root(".", "old")
                linux.umount2("/old", linux.MNT_DETACH)
                os.chdir("/")
                os.write(ready_w, b"r")
                if os.read(go_r, 1) == b"g":
                    tmp_fs = os.statvfs("/tmp")
                    with open("/proc/self/mountinfo") as f:
                        mounts = [line.split()[4] for line in f]
                    with open("/proc/meminfo") as f:
                        meminfo = f.read().splitlines()[0]
                    seen = {
                        "meminfo": meminfo,
                        "self": os.readlink("/proc/self"),
                        "pids": sorted(p for p in os.listdir("/proc") if p.isdigit()),
                        "tmp_mb": tmp_fs.f_blocks * tmp_fs.f_frsize // MB,
                        "mounts": mounts,
                    }
                    os.write(out_w, json.dumps(seen).encode())
                os._exit(0)
            os.write(pid_w, str(init).encode())
            os.close(pid_w)
            os.waitpid(init, 0)
        finally:
            os._exit(0)
    for fd in (pid_w, ready_w, go_r, out_w):
        os.close(fd)
    with os.fdopen(pid_r, "rb") as f:
        init = int(f.read())
    assert os.read(ready_r, 1) == b"r"
    os.close(ready_r)
    return init, pid, go_w, out_r


@pytest.mark.parametrize("pidns_option", [True, False], ids=["pidns-option", "from-inside"])
def test_mount_instance_gives_a_waiting_instance_its_proc_and_tmp(
    tmp_path: Path, pidns_option: bool
) -> None:
    init, pid, go, out = fake_instance(tmp_path)
    try:
        in_child(
            lambda: enter.mount_instance(
                init,
                tmp_mb=16,
                memory_bytes=96 * MB,
                facts=procfs.host_facts(),
                pidns_option=pidns_option,
            )
        )
        os.write(go, b"g")
        with os.fdopen(out, "rb") as f:
            seen = json.loads(f.read())
    finally:
        os.close(go)
        os.waitpid(pid, 0)
    assert seen["meminfo"].split() == ["MemTotal:", str(96 * 1024), "kB"]
    assert seen["self"] == "1" and seen["pids"] == ["1"]  # its own pid namespace's procfs
    assert seen["tmp_mb"] == 16
    assert "/proc/meminfo" in seen["mounts"] and seen["mounts"].count("/tmp") == 1


def test_new_clocks_start_a_sandboxs_monotonic_and_boot_clocks_at_zero() -> None:
    import time

    def body() -> dict[str, float]:
        enter.new_clocks()
        r, w = os.pipe()
        go_r, go_w = os.pipe()
        child = os.fork()
        if child == 0:  # only children enter the new time namespace
            seen = {
                "boottime": time.clock_gettime(time.CLOCK_BOOTTIME),
                "monotonic": time.monotonic(),
                "booted": procfs.boot_time(),
            }
            os.write(w, json.dumps(seen).encode())
            os.read(go_r, 1)
            os._exit(0)
        os.close(w)
        seen = json.loads(os.read(r, 4096))
        # What the runtime zygote computes for a forked instance's view, from outside.
        seen["booted_from_outside"] = procfs.boot_time(child)
        os.write(go_w, b"g")
        os.waitpid(child, 0)
        return seen

    seen = in_child(body)
    assert seen["boottime"] < 5 and seen["monotonic"] < 5, seen
    assert abs(seen["booted"] - time.time()) < 5, seen
    assert abs(seen["booted_from_outside"] - seen["booted"]) < 0.5, seen
