"""nimbus.executor.sandbox.rootfs (the runtime layer), built for real with this machine's
ldd over a small stand-in base root; the real base is tested in tests/sandbox."""

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

from nimbus.errors import ServiceException
from nimbus.executor.sandbox import rootfs
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


def fake_base(root: Path) -> Path:
    """A base root that has the loader and libc (at their host paths, through the host's
    merged-/usr links), nothing else: the layer must add only what is missing."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("bin", "sbin", "lib", "lib64"):
        if os.path.islink("/" + name):
            (root / name).symlink_to(os.readlink("/" + name))
    host = ldd(PYTHON)
    for soname in ("libc.so.6", *(n for n in host if "ld-linux" in n)):
        real = os.path.realpath(host[soname])
        (root / real.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(real, root / real.lstrip("/"))
    (root / "etc").mkdir(exist_ok=True)
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rootfs, float]]:
    base = tmp_path_factory.mktemp("sandbox")
    lower = fake_base(tmp_path_factory.mktemp("base") / "root")
    started = time.monotonic()
    fs = build_rootfs(base, PYTHON, lower)
    yield fs, time.monotonic() - started
    shutil.rmtree(base, ignore_errors=True)


def resolve_merged(fs: Rootfs, path: str) -> tuple[Path, Path]:
    """Where ``path`` leads in the overlay of the layer over the base, as (layer, base)
    paths: a link of the layer wins, else one of the base, as the overlay shows them."""
    pending = list(reversed(path.split("/")))
    current = "/"
    for _ in range(200):
        if not pending:
            rel = current.lstrip("/")
            return fs.path / rel, fs.base / rel
        part = pending.pop()
        if part in ("", "."):
            continue
        here = os.path.join(current, part)
        layer, base = fs.path / here.lstrip("/"), fs.base / here.lstrip("/")
        link = layer if layer.is_symlink() else base if not layer.exists() else None
        if link is not None and link.is_symlink():
            target = os.readlink(link)
            current = "/" if target.startswith("/") else current
            pending.extend(reversed(target.split("/")))
        else:
            current = here
    raise AssertionError(f"symlink loop at {path}")


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


def test_adds_only_the_libraries_the_base_lacks(built: tuple[Rootfs, float]) -> None:
    fs, _ = built
    host = ldd(PYTHON, dynload("_ssl"), dynload("_ctypes"), dynload("_sqlite3"))
    for name, path in host.items():
        if Path(path).is_relative_to(BASE_PREFIX):
            continue  # libpython arrives with the prefix's bind mount, not a copy
        in_layer, in_base = resolve_merged(fs, path)
        if name == "libc.so.6" or "ld-linux" in name:
            assert in_base.is_file() and not os.path.lexists(in_layer), name
        else:
            assert in_layer.is_file() and in_layer.is_relative_to(fs.path), name
            assert in_layer.read_bytes()[:4] == b"\x7fELF"
    assert any(n.startswith("libssl") for n in host)


def test_never_shadows_a_link_of_the_base(built: tuple[Rootfs, float]) -> None:
    fs, _ = built
    for name in ("bin", "sbin", "lib", "lib64"):
        if (fs.base / name).is_symlink():
            assert not os.path.lexists(fs.path / name), name


def test_nothing_else_of_the_host(built: tuple[Rootfs, float]) -> None:
    fs, _ = built
    top = {p.name for p in fs.path.iterdir()}
    assert top <= {
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
    assert not (fs.path / "usr/bin").exists()
    assert os.readlink(fs.path / "var/lang") == BASE_PREFIX


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
    # The host's resolver, and its CA bundle (the authorities its operator trusts).
    for host in ("/etc/resolv.conf", "/etc/ssl/certs/ca-certificates.crt"):
        if os.path.exists(host):
            inside = fs.path / host.lstrip("/")
            assert inside.read_bytes() == Path(host).read_bytes()
            assert stat.S_IMODE(inside.stat().st_mode) == 0o644
    # Time zones and the loader's cache are the base's own; OpenSSL's configuration comes
    # from the host only because this stand-in base has none.
    assert {p.name for p in etc.iterdir()} <= {
        "passwd",
        "group",
        "hosts",
        "nsswitch.conf",
        "resolv.conf",
        "ssl",
    }
    assert not (etc / "localtime").exists() and not (etc / "ld.so.cache").exists()


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
    again = build_rootfs(fs.path.parent, sys.executable, fs.base)
    reuse_time = time.monotonic() - started
    assert again == fs
    after = fs.path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert reuse_time < build_time / 5, (reuse_time, build_time)


def test_a_changed_input_base_or_format_builds_anew_and_removes_the_old(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A copy of the interpreter: same prefix (it falls back to its build prefix), other file.
    python = tmp_path / "python3"
    shutil.copy2(PYTHON, python)
    base = tmp_path / "sandbox"
    lower = fake_base(tmp_path / "base")
    first = build_rootfs(base, str(python), lower)
    assert build_rootfs(base, str(python), lower).path == first.path

    future = time.time() + 60
    os.utime(python, (future, future))
    second = build_rootfs(base, str(python), lower)
    assert second.path != first.path and second.path.is_dir()
    assert not first.path.exists()

    monkeypatch.setattr(rootfs, "FORMAT", rootfs.FORMAT + 1)
    third = build_rootfs(base, str(python), lower)
    assert third.path != second.path and third.path.is_dir()
    assert not second.path.exists()

    other = fake_base(tmp_path / "other-base")
    fourth = build_rootfs(base, str(python), other)
    assert fourth.path != third.path and fourth.base == other.resolve()
    assert sorted(p.name for p in base.iterdir()) == sorted([fourth.path.name, "rootfs.json"])


def test_refuses_paths_an_overlay_cannot_name(tmp_path: Path) -> None:
    lower = fake_base(tmp_path / "a,b")
    with pytest.raises(ServiceException, match="overlay"):
        build_rootfs(tmp_path / "sandbox", PYTHON, lower)


def test_copies_when_hard_links_are_impossible(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def cross_device(src: Any, dst: Any) -> None:
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr("os.link", cross_device)
    fs = build_rootfs(tmp_path / "sandbox", PYTHON, fake_base(tmp_path / "base"))
    libssl = next(p for n, p in ldd(dynload("_ssl")).items() if n.startswith("libssl"))
    inside, _ = resolve_merged(fs, libssl)
    assert not os.path.samefile(inside, libssl)
    assert inside.read_bytes() == Path(libssl).read_bytes()
    assert stat.S_IMODE(inside.stat().st_mode) == stat.S_IMODE(os.stat(libssl).st_mode)
