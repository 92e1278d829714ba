"""The instance's root filesystem: a small directory tree, built once per host.

An instance pivots into this tree, bind-mounted read-only as its ``/``. It holds
only what the runtime's interpreter needs that lives *outside* its prefix: the
shared libraries of the interpreter and of every standard-library extension
module (found with ``ldd``, each at the same path as on the host), the dynamic
loader, a handful of ``/etc`` files, the time-zone database, and empty
mountpoints. The interpreter's prefix itself is not copied: an empty directory
at the same path waits for the sandbox to bind the real prefix there read-only,
and :attr:`Rootfs.hidden` names the prefix's ``site-packages`` for it to mask.

The tree is ``<base>/rootfs-<hash>``, where the hash covers every input (the
interpreter's path and version, the list and mtimes of the libraries, the
copied files, :data:`FORMAT`), so any change yields a new directory. It is built
in a temporary directory beside it and renamed into place, so a reader never
sees half a tree. ``<base>/rootfs.json`` remembers the inputs of the last build,
which lets a restart re-check them with a few ``stat`` calls instead of running
the interpreter and ``ldd`` again.

Files are hard links to the host's when ``base`` is on the same filesystem,
copies otherwise. Standard library only: this runs in the server.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nimbus.errors import ServiceException

__all__ = ["FORMAT", "MOUNTPOINTS", "Rootfs", "build_rootfs"]

log = logging.getLogger(__name__)

FORMAT = 2
"""Bump when the layout changes: every host then rebuilds its tree."""

MOUNTPOINTS: dict[str, str] = {
    "proc": "/proc",
    "dev": "/dev",
    "tmp": "/tmp",
    "task": "/var/task",
    "layer": "/opt/python",
    "runtime": "/var/runtime",
    "mnt": "/mnt",
}

# Merged-/usr hosts make these symlinks (lib -> usr/lib); the tree repeats them
# so every path resolves inside as it does outside.
_TOP_LEVEL_LINKS = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")

_MANIFEST = "rootfs.json"
_STALE_TEMP_SECONDS = 3600
# ldd and the probe run with this environment, not the server's: LD_LIBRARY_PATH
# or LD_PRELOAD there must not change the closure, as the instance will not have them.
_CLEAN_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}
_LDD_PATH = re.compile(r"(/\S+) \(0x[0-9a-f]+\)$")

_PROBE = """\
import json, os, ssl, sys, sysconfig
paths = sysconfig.get_paths()
cfg = sysconfig.get_config_var
verify = ssl.get_default_verify_paths()
print(json.dumps({
    "version": sys.version,
    "prefix": sys.base_prefix,
    "site": [paths["purelib"], paths["platlib"]],
    "libpython": os.path.join(cfg("LIBDIR") or "", cfg("INSTSONAME") or ""),
    "dynload": cfg("DESTSHARED") or "",
    "ssl": [verify.openssl_cafile, verify.openssl_capath,
            os.path.join(os.path.dirname(verify.openssl_cafile), "openssl.cnf")],
    "tzpath": (cfg("TZPATH") or "").split(os.pathsep),
}))
"""

_PASSWD = (
    "root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"
)
_GROUP = "root:x:0:\nnogroup:x:65534:\n"
_HOSTS = "127.0.0.1\tlocalhost\n::1\tlocalhost\n"
_NSSWITCH = "passwd: files\ngroup: files\nhosts: files dns\n"
_ZONEINFO = "/usr/share/zoneinfo"
# Copied (not linked) from the host when present: small, and the host may
# rewrite them in place.
_HOST_ETC = ("/etc/resolv.conf", "/etc/ssl/certs/ca-certificates.crt", "/etc/ld.so.cache")


@dataclass(frozen=True, slots=True)
class Rootfs:
    """A built root tree and what the sandbox must mount on it."""

    path: Path
    """The tree, to be bind-mounted read-only as the instance's ``/``."""
    python_prefix: Path
    """The runtime interpreter's ``sys.base_prefix``; an empty directory at this
    path exists inside :attr:`path` for the real prefix to be bound on."""
    hidden: tuple[Path, ...]
    """Paths under :attr:`python_prefix` (as seen inside) to mask with an empty
    tmpfs: the base interpreter's ``site-packages``."""
    mountpoints: dict[str, str]
    """Name -> absolute path inside of an empty directory: see :data:`MOUNTPOINTS`."""


def build_rootfs(base: Path, python: str) -> Rootfs:
    """Return the root tree for ``python``, building it under ``base`` if needed.

    Idempotent: when nothing changed it costs a read of ``rootfs.json`` and a
    ``stat`` per input. Older ``rootfs-*`` trees are removed (best effort; a tree
    with something still mounted under it is kept).
    """
    started = time.monotonic()
    base.mkdir(parents=True, exist_ok=True)
    exe = os.path.realpath(python)
    facts = _load_manifest(base, exe)
    if facts is None or not (base / facts["name"]).is_dir():
        facts = _probe(exe)
        facts["name"] = "rootfs-" + _digest(facts)
        target = base / facts["name"]
        if not target.is_dir():
            _build(base, target, facts)
            log.info(
                "built sandbox rootfs %s (%d libraries) in %.0f ms",
                target,
                len(facts["libs"]),
                (time.monotonic() - started) * 1000,
            )
        _write_manifest(base, facts)
    _remove_others(base, facts["name"])
    return Rootfs(
        path=base / facts["name"],
        python_prefix=Path(facts["prefix"]),
        hidden=tuple(Path(p) for p in facts["hidden"]),
        mountpoints=dict(MOUNTPOINTS),
    )


# --- what goes in -----------------------------------------------------------------


def _probe(exe: str) -> dict[str, Any]:
    """Ask the interpreter about itself, and ``ldd`` about its libraries."""
    try:
        out = subprocess.run(
            [exe, "-I", "-S", "-c", _PROBE],
            env=_CLEAN_ENV,
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise ServiceException(f"cannot inspect the runtime interpreter {exe}: {exc}") from exc
    info = json.loads(out)
    prefix = os.path.realpath(info["prefix"])
    if prefix == "/":
        raise ServiceException(f"the runtime interpreter {exe} has / as its prefix")
    dynload = info["dynload"]
    # INSTSONAME is libpython3.X.a for a static build: then there is no libpython.
    libpython = [p for p in [info["libpython"]] if ".so" in p and os.path.isfile(p)]
    modules = sorted(e.path for e in _scandir(dynload) if e.name.endswith(".so"))
    elves = [exe, *libpython, *modules]
    hidden = sorted(
        {
            real
            for p in info["site"]
            if os.path.isdir(real := os.path.realpath(p)) and _under(real, prefix)
        }
    )
    extras = [*_HOST_ETC, *info["ssl"], *_zoneinfo_stamps()]
    return {
        "format": FORMAT,
        "python": exe,
        "version": info["version"],
        "prefix": prefix,
        "hidden": hidden,
        "ssl": info["ssl"],
        "libs": _ldd(elves),
        # Everything whose change must yield a new tree. The lib-dynload directory
        # and ld.so.cache stand for "a module was added" and "a library moved".
        "inputs": sorted({*elves, dynload, *extras}),
    }


def _ldd(files: list[str]) -> list[str]:
    """Every absolute path ``ldd`` prints for ``files`` (the loader included)."""
    ldd = shutil.which("ldd", path=_CLEAN_ENV["PATH"])
    if ldd is None:
        raise ServiceException("cannot build the sandbox root: ldd is not installed")
    # ldd exits non-zero when one file is not dynamic ("statically linked"): fine.
    out = subprocess.run(
        [ldd, *files], env=_CLEAN_ENV, capture_output=True, text=True, timeout=120
    ).stdout
    found: set[str] = set()
    for line in out.splitlines():
        match = _LDD_PATH.search(line.strip())
        if match:
            found.add(match.group(1))
    return sorted(found)


def _zoneinfo_stamps() -> list[str]:
    # tzdata updates rename files into these directories, changing their mtimes.
    return [_ZONEINFO, *(e.path for e in _scandir(_ZONEINFO))]


def _digest(facts: dict[str, Any]) -> str:
    stamps = []
    for path in [*facts["inputs"], *facts["libs"]]:
        try:
            st = os.stat(path)
            stamps.append([path, st.st_mtime_ns, st.st_size])
        except OSError:
            stamps.append([path, None, None])
    keyed = {k: facts[k] for k in ("format", "python", "version", "prefix", "libs")}
    blob = json.dumps({**keyed, "stamps": stamps}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _load_manifest(base: Path, exe: str) -> dict[str, Any] | None:
    """The last build's facts, if they still describe this host exactly."""
    try:
        facts: dict[str, Any] = json.loads((base / _MANIFEST).read_text())
        if facts["format"] != FORMAT or facts["python"] != exe:
            return None
        if facts["name"] != "rootfs-" + _digest(facts):
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return facts


def _write_manifest(base: Path, facts: dict[str, Any]) -> None:
    tmp = base / f".{_MANIFEST}.{os.getpid()}"
    tmp.write_text(json.dumps(facts, indent=1, sort_keys=True))
    os.replace(tmp, base / _MANIFEST)


# --- building ---------------------------------------------------------------------


def _build(base: Path, target: Path, facts: dict[str, Any]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=".rootfs-", suffix=".tmp", dir=base))
    try:
        os.chmod(tmp, 0o755)
        _populate(tmp, facts)
        try:
            os.rename(tmp, target)
        except OSError as exc:
            # Another server built the same tree first: its tree is as good as ours.
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY) or not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _populate(root: Path, facts: dict[str, Any]) -> None:
    prefix = facts["prefix"]
    _mkdir(root, prefix)
    for inside in MOUNTPOINTS.values():
        _mkdir(root, inside)
    os.chmod(root / "tmp", 0o1777)

    for name in _TOP_LEVEL_LINKS:
        host = "/" + name
        if os.path.islink(host):
            _mirror(root, host, prefix)
            # An empty target keeps e.g. /bin resolvable even with nothing in it.
            _mkdir(root, os.path.realpath(host))

    _mkdir(root, "/etc")
    _write(root, "/etc/passwd", _PASSWD)
    _write(root, "/etc/group", _GROUP)
    _write(root, "/etc/hosts", _HOSTS)
    _write(root, "/etc/nsswitch.conf", _NSSWITCH)
    for host in _HOST_ETC:
        try:
            data = Path(host).read_bytes()
        except OSError:
            continue
        _mkdir(root, os.path.dirname(host))
        _write(root, host, data)
    os.symlink(_ZONEINFO + "/UTC", root / "etc/localtime")
    if os.path.isdir(_ZONEINFO) and not _under(_ZONEINFO, prefix):
        _mkdir(root, os.path.dirname(_ZONEINFO))
        shutil.copytree(_ZONEINFO, _inside(root, _ZONEINFO), symlinks=True, copy_function=_link)

    # OpenSSL looks for its CA bundle through <OPENSSLDIR>/cert.pem and certs/, which on
    # Debian are symlinks into /etc/ssl/certs: without them create_default_context()
    # trusts nothing.
    for path in [*facts["libs"], *facts["ssl"]]:
        if os.path.lexists(path):
            _mirror(root, path, prefix)


def _mirror(root: Path, path: str, prefix: str) -> None:
    """Make ``path`` resolve inside ``root`` as it does on the host.

    Walks ``path`` one component at a time like ``realpath``: every symlink met on
    the way is recreated with the same target text and followed, directories are
    created, and the final file is linked or copied. Anything under ``prefix`` is
    left alone: the sandbox binds the real prefix there.
    """
    pending = list(reversed(path.split("/")))
    current = "/"
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        host = os.path.join(current, part)
        if _under(host, prefix):
            return
        inside = _inside(root, host)
        if os.path.islink(host):
            hops += 1
            if hops > 40:
                raise ServiceException(f"too many symlinks resolving {path}")
            target = os.readlink(host)
            if not os.path.lexists(inside):
                os.symlink(target, inside)
            if target.startswith("/"):
                current = "/"
            pending.extend(reversed(target.split("/")))
            continue
        if os.path.isdir(host):
            if not os.path.isdir(inside):
                os.mkdir(inside)
                os.chmod(inside, 0o755)
        elif pending:
            return  # a file in the middle of a path: nothing more to resolve
        elif not os.path.lexists(inside):
            _link(host, str(inside))
        current = host


def _link(src: str, dst: str) -> str:
    """Hard-link ``src`` to ``dst``, or copy it when a link is impossible."""
    try:
        os.link(src, dst)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
            raise
        shutil.copy2(src, dst)
    return dst


def _mkdir(root: Path, inside: str) -> None:
    """Create ``inside`` (absolute, as seen in the sandbox) and its parents, 0755."""
    path = root
    for part in Path(inside).relative_to("/").parts:
        path = path / part
        if not path.is_dir():
            path.mkdir()
            os.chmod(path, 0o755)


def _write(root: Path, inside: str, data: str | bytes) -> None:
    path = _inside(root, inside)
    if isinstance(data, str):
        data = data.encode()
    path.write_bytes(data)
    os.chmod(path, 0o644)


def _inside(root: Path, path: str) -> Path:
    return root / path.lstrip("/")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix.rstrip("/") + "/")


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except OSError:
        return []


# --- cleaning up ------------------------------------------------------------------


def _remove_others(base: Path, current: str) -> None:
    """Remove older trees and abandoned temporary ones; never one with a mount in it."""
    mounts = _mount_points()
    now = time.time()
    for entry in _scandir(str(base)):
        if entry.name == current or not entry.is_dir(follow_symlinks=False):
            continue
        if entry.name.startswith("rootfs-"):
            pass
        elif entry.name.startswith(".rootfs-") and entry.name.endswith(".tmp"):
            try:
                if now - entry.stat(follow_symlinks=False).st_mtime < _STALE_TEMP_SECONDS:
                    continue  # maybe another server building right now
            except OSError:
                continue
        else:
            continue
        if any(_under(m, os.path.realpath(entry.path)) for m in mounts):
            log.warning("keeping old sandbox rootfs %s: something is mounted in it", entry.path)
            continue
        shutil.rmtree(entry.path, ignore_errors=True)


def _mount_points() -> list[str]:
    try:
        with open("/proc/self/mountinfo") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    # Field 5 is the mount point, with space, tab, newline and backslash octal-escaped.
    unescape = re.compile(r"\\([0-7]{3})")
    return [
        unescape.sub(lambda m: chr(int(m.group(1), 8)), line.split()[4])
        for line in lines
        if len(line.split()) > 4
    ]
