"""The runtime layer: Nimbus's own small tree over the base root, built once per node.

An instance's ``/`` is an overlay of two read-only trees: this layer on top of
the base root filesystem (:mod:`.baseroot`, a minimal Debian shared by every node
of the machine). The layer holds what is Nimbus's or the host's rather than the
distribution's: empty mountpoints (``/var/task``, ``/opt/python``, ``/tmp``, …),
an empty directory at the runtime interpreter's prefix for the sandbox to bind the
real prefix on read-only (:attr:`Rootfs.hidden` names its ``site-packages``, to
mask), ``/var/lang`` pointing at that prefix (Lambda's interpreter directory), a
minimal ``/etc`` (users, hosts, name service, the host's resolver), and any shared
library the interpreter or its extension modules need (found with ``ldd``) that the
base lacks — none when the host runs the base's own distribution.

The tree is ``<base>/rootfs-<hash>``, where the hash covers every input (the
interpreter's path and version, the list and mtimes of the libraries, the
copied files, the base root, :data:`FORMAT`), so any change yields a new
directory. It is built in a temporary directory beside it and renamed into
place, so a reader never sees half a tree. ``<base>/rootfs.json`` remembers the
inputs of the last build, which lets a restart re-check them with a few ``stat``
calls instead of running the interpreter and ``ldd`` again.

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

FORMAT = 3
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

#: Lambda's interpreter directory (``/var/lang/bin`` is on PATH).
LANG_DIR = "/var/lang"

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
# Copied (not linked) from the host when present: small, and the host may rewrite them
# in place. The host's CA bundle replaces the base's, so that the authorities an
# operator trusts (a company's, a proxy's) are trusted inside too. (Time zones and the
# loader's cache are the base root's.)
_HOST_ETC = ("/etc/resolv.conf", "/etc/ssl/certs/ca-certificates.crt")


@dataclass(frozen=True, slots=True)
class Rootfs:
    """A built root tree and what the sandbox must mount on it."""

    path: Path
    """The layer; the instance's ``/`` is an overlay of it over :attr:`base`, read-only."""
    base: Path
    """The base root filesystem (:mod:`.baseroot`)."""
    python_prefix: Path
    """The runtime interpreter's ``sys.base_prefix``; an empty directory at this
    path exists inside :attr:`path` for the real prefix to be bound on."""
    hidden: tuple[Path, ...]
    """Paths under :attr:`python_prefix` (as seen inside) to mask with an empty
    tmpfs: the base interpreter's ``site-packages``."""
    mountpoints: dict[str, str]
    """Name -> absolute path inside of an empty directory: see :data:`MOUNTPOINTS`."""


def build_rootfs(base: Path, python: str, base_root: Path) -> Rootfs:
    """Return the layer for ``python`` over ``base_root``, building it under ``base`` if
    needed.

    Idempotent: when nothing changed it costs a read of ``rootfs.json`` and a
    ``stat`` per input. Older ``rootfs-*`` trees are removed (best effort; a tree
    with something still mounted under it is kept).
    """
    started = time.monotonic()
    base.mkdir(parents=True, exist_ok=True)
    exe = os.path.realpath(python)
    for tree in (base, base_root):
        if set(str(tree.resolve())) & set(",:\\"):
            raise ServiceException(
                f"the sandbox cannot use {tree}: an overlay mount cannot name a path "
                "with ',', ':' or a backslash in it"
            )
    base_root = base_root.resolve()
    facts = _load_manifest(base, exe)
    if (
        facts is None
        or facts.get("base_root") != str(base_root)
        or not (base / facts["name"]).is_dir()
    ):
        facts = _probe(exe)
        facts["base_root"] = str(base_root)
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
        base=base_root,
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
    extras = [*_HOST_ETC, *info["ssl"]]
    return {
        "format": FORMAT,
        "python": exe,
        "version": info["version"],
        "prefix": prefix,
        "hidden": hidden,
        "ssl": info["ssl"],
        "libs": _ldd(elves),
        # Everything whose change must yield a new tree. The lib-dynload directory
        # stands for "a module was added".
        # ld.so.cache stands for "a library moved".
        "inputs": sorted({*elves, dynload, *extras, "/etc/ld.so.cache"}),
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


def _digest(facts: dict[str, Any]) -> str:
    stamps = []
    for path in [*facts["inputs"], *facts["libs"]]:
        try:
            st = os.stat(path)
            stamps.append([path, st.st_mtime_ns, st.st_size])
        except OSError:
            stamps.append([path, None, None])
    keyed = {k: facts[k] for k in ("format", "python", "version", "prefix", "libs", "base_root")}
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
    base = Path(facts["base_root"])
    _mkdir(root, prefix)
    for inside in MOUNTPOINTS.values():
        _mkdir(root, inside)
    os.chmod(root / "tmp", 0o1777)

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
    # Lambda's interpreter lives in /var/lang (PATH has /var/lang/bin): here it is the
    # runtime's own prefix, bound read-only at its real path.
    if prefix != LANG_DIR and not _under(LANG_DIR, prefix):
        _mkdir(root, os.path.dirname(LANG_DIR))
        os.symlink(prefix, _inside(root, LANG_DIR))

    # What the interpreter needs that the base root lacks (nothing, when the host runs
    # the base's own distribution): the host's files, at their host paths.
    for path in [*facts["libs"], *facts["ssl"]]:
        if os.path.lexists(path):
            _mirror(root, base, path, prefix)


def _mirror(root: Path, base: Path, path: str, prefix: str) -> None:
    """Make ``path`` resolve in the merged root (``root`` over ``base``) as on the host.

    Walks ``path`` one component at a time like ``realpath``, in the merged view: a
    symlink of the base (``/lib`` -> ``usr/lib``) is followed, never shadowed; one only
    the host has is recreated with the same target text; directories are created; the
    final file is linked or copied unless the base already has a file there. Anything
    under ``prefix`` is left alone: the sandbox binds the real prefix there.
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
        below = _inside(base, host)
        link = None
        if os.path.islink(inside):
            link = os.readlink(inside)
        elif not os.path.lexists(inside) and os.path.islink(below):
            link = os.readlink(below)
        elif not os.path.lexists(inside) and not os.path.lexists(below) and os.path.islink(host):
            link = os.readlink(host)
            os.symlink(link, inside)
        if link is not None:
            hops += 1
            if hops > 40:
                raise ServiceException(f"too many symlinks resolving {path}")
            if link.startswith("/"):
                current = "/"
            pending.extend(reversed(link.split("/")))
            continue
        if os.path.isdir(host):
            if not os.path.isdir(inside):
                os.mkdir(inside)
                os.chmod(inside, 0o755)
        elif pending:
            return  # a file in the middle of a path: nothing more to resolve
        elif not os.path.lexists(inside) and not os.path.lexists(below):
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
