"""nimbus.executor.sandbox.rootfs, built for real with this machine's ldd."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nimbus.executor.sandbox import linux, rootfs
from nimbus.executor.sandbox.rootfs import MOUNTPOINTS, Rootfs, build_rootfs

PYTHON = os.path.realpath(sys.executable)
BASE_PREFIX = os.path.realpath(sys.base_prefix)
ROOT = os.geteuid() == 0


def ldd(*files: str) -> dict[str, str]:
    """soname (or the loader's path) -> absolute path, as ldd prints them."""
    out = subprocess.run(["ldd", *files], capture_output=True, text=True).stdout
    found = {}
    for line in out.splitlines():
        words = line.split()
        if "=>" in words and words[2].startswith("/"):
            found[words[0]] = words[2]
        elif words and words[0].startswith("/") and words[-1].startswith("(0x"):
            found[words[0]] = words[0]
    return found


def resolve_inside(root: Path, path: str) -> Path:
    """Where ``path`` leads inside ``root``, following symlinks as a chroot would."""
    pending = list(reversed(path.split("/")))
    current = "/"
    for _ in range(200):
        if not pending:
            return root / current.lstrip("/")
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        here = os.path.join(current, part)
        there = root / here.lstrip("/")
        if there.is_symlink():
            target = os.readlink(there)
            current = "/" if target.startswith("/") else current
            pending.extend(reversed(target.split("/")))
        else:
            current = here
    raise AssertionError(f"symlink loop at {path}")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rootfs, float]]:
    base = tmp_path_factory.mktemp("sandbox")
    started = time.monotonic()
    fs = build_rootfs(base, PYTHON)
    yield fs, time.monotonic() - started
    shutil.rmtree(base, ignore_errors=True)


def dynload(module: str) -> str:
    directory = str(sysconfig.get_config_var("DESTSHARED"))
    return os.path.join(directory, module + str(sysconfig.get_config_var("EXT_SUFFIX")))


def test_describes_the_interpreter(built: tuple[Rootfs, float]) -> None:
    fs, _ = built
    assert fs.path.name.startswith("rootfs-")
    assert str(fs.python_prefix) == BASE_PREFIX
    site = Path(
        os.path.realpath(
            sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_prefix})[
                "purelib"
            ]
        )
    )
    assert site in fs.hidden
    assert all(p.is_relative_to(fs.python_prefix) for p in fs.hidden)
    assert fs.mountpoints == {
        "proc": "/proc",
        "dev": "/dev",
        "tmp": "/tmp",
        "task": "/var/task",
        "layer": "/opt/python",
        "runtime": "/var/runtime",
        "mnt": "/mnt",
    }


def test_libraries_sit_at_their_host_paths(built: tuple[Rootfs, float]) -> None:
    fs, _ = built
    host = ldd(PYTHON, dynload("_ssl"), dynload("_ctypes"), dynload("_sqlite3"))
    wanted = {
        name: path
        for name, path in host.items()
        if name.startswith(("libc.", "libssl", "libcrypto", "libffi", "libsqlite3", "/"))
    }
    assert any("ld-linux" in n for n in wanted), host
    assert {n.split(".so")[0] for n in wanted} >= {
        "libc",
        "libssl",
        "libcrypto",
        "libffi",
        "libsqlite3",
    }
    for path in wanted.values():
        inside = resolve_inside(fs.path, path)
        assert inside.is_file() and inside.is_relative_to(fs.path), path
        assert inside.read_bytes()[:4] == b"\x7fELF"
        assert os.path.samefile(inside, path) or inside.read_bytes() == Path(path).read_bytes()
    # libpython lives in the prefix: it arrives with the prefix's bind mount, not a copy.
    libpython = [p for n, p in host.items() if n.startswith("libpython")]
    assert all(Path(p).is_relative_to(BASE_PREFIX) for p in libpython)


def test_merged_usr_symlinks_are_repeated(built: tuple[Rootfs, float]) -> None:
    fs, _ = built
    for name in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink("/" + name):
            assert os.readlink(fs.path / name) == os.readlink("/" + name)
            assert resolve_inside(fs.path, "/" + name).is_dir()


def test_nothing_else_of_the_host_usr(built: tuple[Rootfs, float]) -> None:
    fs, _ = built
    usr = fs.path / "usr"
    assert not any((usr / "bin").iterdir())
    top = {p.name for p in fs.path.iterdir()}
    assert top <= {
        "bin",
        "sbin",
        "lib",
        "lib32",
        "lib64",
        "libx32",
        "usr",
        "etc",
        "tmp",
        "proc",
        "dev",
        "mnt",
        "var",
        "opt",
        Path(BASE_PREFIX).parts[1],
    }
    libs = [p for p in usr.rglob("*") if p.suffix == ".so" or ".so." in p.name]
    assert 5 < len(libs) < 200


def test_etc(built: tuple[Rootfs, float]) -> None:
    fs, _ = built
    etc = fs.path / "etc"
    passwd = (etc / "passwd").read_text().splitlines()
    assert [line.split(":")[:3] for line in passwd] == [
        ["root", "x", "0"],
        ["nobody", "x", "65534"],
    ]
    assert [line.split(":")[0] for line in (etc / "group").read_text().splitlines()] == [
        "root",
        "nogroup",
    ]
    assert "127.0.0.1\tlocalhost" in (etc / "hosts").read_text()
    assert "::1\tlocalhost" in (etc / "hosts").read_text()
    assert (etc / "nsswitch.conf").read_text() == "passwd: files\ngroup: files\nhosts: files dns\n"
    assert os.readlink(etc / "localtime") == "/usr/share/zoneinfo/UTC"
    for host in ("/etc/resolv.conf", "/etc/ssl/certs/ca-certificates.crt", "/etc/ld.so.cache"):
        if os.path.exists(host):
            assert (fs.path / host.lstrip("/")).read_bytes() == Path(host).read_bytes()
            assert stat.S_IMODE((fs.path / host.lstrip("/")).stat().st_mode) == 0o644
    if os.path.exists("/usr/share/zoneinfo/Europe/Paris"):
        assert resolve_inside(fs.path, "/usr/share/zoneinfo/Europe/Paris").is_file()
        assert resolve_inside(fs.path, "/etc/localtime").is_file()


def test_mountpoints_and_modes(built: tuple[Rootfs, float]) -> None:
    fs, _ = built
    for inside in [*MOUNTPOINTS.values(), str(fs.python_prefix)]:
        path = fs.path / inside.lstrip("/")
        assert path.is_dir() and not path.is_symlink() and not any(path.iterdir()), inside
    assert stat.S_IMODE((fs.path / "tmp").stat().st_mode) == 0o1777
    for path in [fs.path, *fs.path.rglob("*")]:
        st = path.lstat()
        if ROOT:
            assert st.st_uid == 0 and st.st_gid == 0, path
        if stat.S_ISDIR(st.st_mode) and path.name != "tmp":
            assert stat.S_IMODE(st.st_mode) == 0o755, path


def test_second_call_reuses_without_running_anything(
    built: tuple[Rootfs, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    fs, build_time = built
    before = fs.path.stat()

    def no_subprocess(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("rebuilt: ran " + repr(args))

    monkeypatch.setattr("subprocess.run", no_subprocess)
    started = time.monotonic()
    again = build_rootfs(fs.path.parent, sys.executable)
    reuse_time = time.monotonic() - started
    assert again == fs
    after = fs.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert reuse_time < build_time / 5, (reuse_time, build_time)


def test_a_changed_input_or_format_builds_anew_and_removes_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy of the interpreter: same prefix (it falls back to its build prefix), other file.
    python = tmp_path / "python3"
    shutil.copy2(PYTHON, python)
    base = tmp_path / "sandbox"
    first = build_rootfs(base, str(python))
    assert build_rootfs(base, str(python)).path == first.path

    future = time.time() + 60
    os.utime(python, (future, future))
    second = build_rootfs(base, str(python))
    assert second.path != first.path and second.path.is_dir()
    assert not first.path.exists()

    monkeypatch.setattr(rootfs, "FORMAT", rootfs.FORMAT + 1)
    third = build_rootfs(base, str(python))
    assert third.path != second.path and third.path.is_dir()
    assert not second.path.exists()
    assert sorted(p.name for p in base.iterdir()) == sorted([third.path.name, "rootfs.json"])


def test_copies_when_hard_links_are_impossible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(src: Any, dst: Any) -> None:
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr("os.link", cross_device)
    fs = build_rootfs(tmp_path, PYTHON)
    libc = ldd(PYTHON)["libc.so.6"]
    inside = resolve_inside(fs.path, libc)
    assert not os.path.samefile(inside, libc)
    assert inside.read_bytes() == Path(libc).read_bytes()
    assert stat.S_IMODE(inside.stat().st_mode) == stat.S_IMODE(os.stat(libc).st_mode)


_INSIDE = """
import ctypes, importlib, json, os, pwd, socket, sqlite3, ssl, sys, sysconfig, time, zoneinfo
failed = {}
for name in sorted(os.listdir(sysconfig.get_config_var("DESTSHARED"))):
    module = name.split(".")[0]
    try:
        importlib.import_module(module)
    except Exception as exc:
        failed[module] = repr(exc)
assert not failed, failed
assert ssl.create_default_context().cert_store_stats()["x509_ca"] > 0
assert sqlite3.connect(":memory:").execute("select 1").fetchone() == (1,)
assert ctypes.CDLL("libc.so.6").getpid() == os.getpid()
assert zoneinfo.ZoneInfo("Europe/Paris").key == "Europe/Paris"
assert time.localtime().tm_zone == "UTC"
assert pwd.getpwuid(0).pw_name == "root"
assert socket.getaddrinfo("localhost", 80, socket.AF_INET)[0][4][0] == "127.0.0.1"
assert json.loads("[1]") == [1]
for hidden in sys.argv[1:]:
    assert os.listdir(hidden) == [], hidden
print("ok")
"""


@pytest.mark.skipif(not ROOT, reason="needs root: mount namespace, bind mount, chroot")
def test_the_interpreter_runs_chrooted_in_it(built: tuple[Rootfs, float]) -> None:
    fs, _ = built
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            prefix = str(fs.path / str(fs.python_prefix).lstrip("/"))
            linux.mount(str(fs.python_prefix), prefix, None, linux.MS_BIND | linux.MS_REC)
            linux.mount(None, prefix, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
            for hidden in fs.hidden:
                linux.mount("tmpfs", str(fs.path / str(hidden).lstrip("/")), "tmpfs", 0, "size=4k")
            os.chroot(fs.path)
            os.chdir("/")
            argv = [PYTHON, "-I", "-S", "-c", _INSIDE, *map(str, fs.hidden)]
            os.execve(PYTHON, argv, {"PATH": "/usr/bin:/bin"})
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, out
    assert out.strip() == "ok"
