"""The base root filesystem, as built on this machine (debootstrap, shared cache)."""

from __future__ import annotations

import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from nimbus.errors import ServiceException
from nimbus.executor.sandbox import baseroot, enter, linux
from nimbus.executor.sandbox.baseroot import BaseRoot, Recipe, ensure_base_root, tree_digest
from nimbus.executor.sandbox.rootfs import build_rootfs
from tests.support import base_root

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (debootstrap, mounts)")

PYTHON = os.path.realpath(sys.executable)

#: PEP 599's manylinux2014 libraries (what every manylinux wheel may assume), and
#: those of CPython's own extension modules.
MANYLINUX = (
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libm.so.6",
    "libdl.so.2",
    "librt.so.1",
    "libc.so.6",
    "libnsl.so.1",
    "libutil.so.1",
    "libpthread.so.0",
    "libresolv.so.2",
    "libX11.so.6",
    "libXext.so.6",
    "libXrender.so.1",
    "libICE.so.6",
    "libSM.so.6",
    "libGL.so.1",
    "libgobject-2.0.so.0",
    "libgthread-2.0.so.0",
    "libglib-2.0.so.0",
)
CPYTHON = (
    "libssl.so.3",
    "libcrypto.so.3",
    "libsqlite3.so.0",
    "libffi.so.8",
    "libz.so.1",
    "liblzma.so.5",
    "libbz2.so.1.0",
    "libuuid.so.1",
    "libexpat.so.1",
    "libreadline.so.8",
)


@pytest.fixture(scope="module")
def base() -> BaseRoot:
    return base_root()


def libdirs(root: Path) -> list[Path]:
    return [root / "usr/lib/x86_64-linux-gnu", root / "usr/lib/aarch64-linux-gnu", root / "usr/lib"]


def test_has_every_library_a_manylinux_wheel_may_assume(base: BaseRoot) -> None:
    missing = [
        so
        for so in (*MANYLINUX, *CPYTHON)
        if not any((d / so).exists() for d in libdirs(base.path))
    ]
    assert not missing


def test_has_a_shell_tools_certificates_time_zones_and_locales(base: BaseRoot) -> None:
    root = base.path
    for tool in (
        "sh",
        "bash",
        "ls",
        "cat",
        "env",
        "find",
        "grep",
        "sed",
        "awk",
        "tar",
        "gzip",
        "xz",
        "unzip",
        "curl",
        "openssl",
        "ps",
        "file",
    ):
        assert (root / "usr/bin" / tool).exists() or (root / "bin" / tool).exists(), tool
    assert (root / "etc/ssl/certs/ca-certificates.crt").stat().st_size > 100_000
    assert (root / "usr/share/zoneinfo/Europe/Paris").is_file()
    assert os.readlink(root / "etc/localtime") == "/usr/share/zoneinfo/Etc/UTC"
    assert (root / "etc/services").is_file()
    assert (root / "usr/lib/locale/en_US.utf8/LC_CTYPE").is_file()


def test_no_setuid_no_passwords_no_package_caches(base: BaseRoot) -> None:
    root = base.path
    for dirpath, _, files in os.walk(root):
        for name in files:
            mode = os.lstat(os.path.join(dirpath, name)).st_mode
            assert not (stat.S_ISREG(mode) and mode & (stat.S_ISUID | stat.S_ISGID)), name
    for name in ("shadow", "gshadow"):
        assert not (root / "etc" / name).exists()
    assert not list((root / "var/cache/apt").iterdir())
    machine_id = root / "etc/machine-id"
    assert not machine_id.exists() or machine_id.read_text() == ""


def test_named_by_its_contents_and_found_again_without_building(
    base: BaseRoot, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not base.digest:
        pytest.skip("a prepared --base-root tree is not built here")
    assert base.path.name == f"base-{base.digest[:16]}"
    assert base.size_bytes > 50 * 2**20 and base.packages > 100

    def no_build(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"rebuilt: {args}")

    monkeypatch.setattr(baseroot, "_build", no_build)
    again = ensure_base_root(base.path.parent.parent, Recipe(suite=base.suite))
    assert again == base


def test_a_failed_build_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    (cache / "roots" / ".build-0123-1").mkdir(parents=True)  # what a killed build left
    unreachable = Recipe(mirror="http://127.0.0.1:9/debian")  # loopback, nothing listens
    with pytest.raises(ServiceException, match="building the base root filesystem failed"):
        ensure_base_root(cache, unreachable)
    left = sorted(p.name for p in (cache / "roots").iterdir())
    assert not [name for name in left if name.startswith((".build-", "base-", "recipe-"))], left


def test_tree_digest_covers_contents_modes_and_links(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d/f").write_text("one")
    (tmp_path / "l").symlink_to("d/f")
    first, size = tree_digest(tmp_path)
    assert size == 3
    (tmp_path / "d/f").write_text("two")
    second, _ = tree_digest(tmp_path)
    os.chmod(tmp_path / "d/f", 0o600)
    third, _ = tree_digest(tmp_path)
    (tmp_path / "l").unlink()
    (tmp_path / "l").symlink_to("d")
    fourth, _ = tree_digest(tmp_path)
    assert len({first, second, third, fourth}) == 4


_INSIDE = """
import ctypes, importlib, json, locale, os, pwd, socket, sqlite3, ssl, subprocess, sys
import sysconfig, time, zoneinfo
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
assert ctypes.CDLL("libstdc++.so.6") and ctypes.CDLL("libgcc_s.so.1")
assert zoneinfo.ZoneInfo("Europe/Paris").key == "Europe/Paris"
assert time.localtime().tm_zone == "UTC"
assert pwd.getpwuid(0).pw_name == "root"
assert socket.getaddrinfo("localhost", 80, socket.AF_INET)[0][4][0] == "127.0.0.1"
assert socket.getservbyname("https") == 443
locale.setlocale(locale.LC_ALL, "en_US.UTF-8")
out = subprocess.run(["sh", "-c", "echo $((6*7)) | cat"], capture_output=True, text=True)
assert out.stdout == "42\\n", out
assert subprocess.run(["/var/lang/bin/python3", "-c", "pass"]).returncode == 0
for hidden in sys.argv[1:]:
    assert os.listdir(hidden) == [], hidden
print("ok")
"""


def test_the_interpreter_runs_in_the_merged_root(base: BaseRoot, tmp_path: Path) -> None:
    fs = build_rootfs(tmp_path / "sandbox", PYTHON, base.path)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.close(r)
            os.dup2(w, 1)
            os.dup2(w, 2)
            linux.unshare(linux.CLONE_NEWNS)
            linux.mount(None, "/", None, linux.MS_REC | linux.MS_PRIVATE)
            enter.mount_root(str(fs.path), str(fs.base))
            prefix = str(fs.path / str(fs.python_prefix).lstrip("/"))
            linux.mount(str(fs.python_prefix), prefix, None, linux.MS_BIND | linux.MS_REC)
            linux.mount(None, prefix, None, linux.MS_BIND | linux.MS_REMOUNT | linux.MS_RDONLY)
            for hidden in fs.hidden:
                linux.mount("tmpfs", str(fs.path / str(hidden).lstrip("/")), "tmpfs", 0, "size=4k")
            os.chroot(fs.path)
            os.chdir("/")
            argv = [PYTHON, "-I", "-S", "-c", _INSIDE, *map(str, fs.hidden)]
            os.execve(PYTHON, argv, {"PATH": "/var/lang/bin:/usr/bin:/bin"})
        finally:
            os._exit(127)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, out
    assert out.strip() == "ok"
    shutil.rmtree(tmp_path / "sandbox", ignore_errors=True)
