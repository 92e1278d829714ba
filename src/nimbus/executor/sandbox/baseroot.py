"""The base root filesystem: a minimal Debian, built once per machine from Debian's packages.

Every instance's ``/`` (and every dependency build's) is this tree, read-only,
under a small per-node layer of Nimbus's own (:mod:`.rootfs`). It gives function
code what Lambda's base environment gives it:

* every library a manylinux wheel may assume (PEP 599/600: ``libgcc_s``,
  ``libstdc++``, ``libm``, ``libdl``, ``librt``, ``libpthread``, ``libresolv``,
  ``libnsl``, ``libutil``, ``libX11``, ``libXext``, ``libXrender``, ``libICE``,
  ``libSM``, ``libGL``, ``libglib``/``gobject``/``gthread``) and those CPython's
  own extension modules link to (OpenSSL, SQLite, libffi, zlib, bz2, lzma,
  ncurses, readline, gdbm, uuid, expat);
* ``/bin/sh`` (dash) and bash, coreutils, findutils, grep, sed, awk, tar,
  gzip/bzip2/xz/zstd/unzip, curl, openssl, ps, file;
* CA certificates, time-zone data, ``/etc/services``, and the ``en_US.UTF-8``
  locale (Lambda's ``LANG``) beside ``C.UTF-8``.

It is made with ``debootstrap --variant=minbase`` (Debian's own installer, every
maintainer script run as on a real system) in a private mount namespace, then
trimmed (package caches, manuals, documentation, translations) and stripped of
every setuid and setgid bit. The result is content-addressed: it is renamed to
``base-<sha256 of its contents>`` only once complete, and ``recipe-<key>.json``
(the key hashes the suite, the architecture and the package list) names the tree
a recipe produced, so a restart finds it with one ``stat``. A file lock makes
concurrent servers (or test workers) build it once; whatever a killed build left
is removed by the next one.

Standard library only: this runs in the server, before it serves.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from nimbus.errors import ServiceException

__all__ = ["FORMAT", "PACKAGES", "BaseRoot", "Recipe", "default_suite", "ensure_base_root"]

log = logging.getLogger(__name__)

FORMAT = 2
"""Bump when what is done to the tree after debootstrap changes."""

#: What goes in besides debootstrap's minbase (which has coreutils, dash, bash, grep,
#: sed, mawk, findutils, tar, gzip, util-linux, perl-base, ...).
PACKAGES = (
    # tools code and scripts call
    "curl",
    "ca-certificates",
    "openssl",
    "tzdata",
    "locales",
    "netbase",
    "procps",
    "file",
    "unzip",
    "xz-utils",
    "bzip2",
    "zstd",
    # what manylinux wheels may assume (libc6 brings libm, libdl, librt, libpthread,
    # libresolv, libnsl.so.1 and libutil)
    "libgcc-s1",
    "libstdc++6",
    "libgomp1",
    "libatomic1",
    "libx11-6",
    "libxext6",
    "libxrender1",
    "libice6",
    "libsm6",
    "libgl1",
    "libglib2.0-0",
    # what CPython's extension modules link to
    "libssl3",
    "libsqlite3-0",
    "libffi8",
    "zlib1g",
    "libbz2-1.0",
    "liblzma5",
    "libncursesw6",
    "libreadline8",
    "libgdbm6",
    "libgdbm-compat4",
    "libuuid1",
    "libexpat1",
    "libnsl2",
    "libtirpc3",
    "libcrypt1",
    "libdb5.3",
)

#: Locales generated in the tree (``C.UTF-8`` is glibc's own).
LOCALES = ("en_US.UTF-8",)

DEFAULT_MIRROR = "http://deb.debian.org/debian"
DEFAULT_SUITE = "bookworm"
#: Seconds debootstrap may take before the build is abandoned.
BUILD_TIMEOUT = 1800.0

#: Trimmed after the install: nothing here is read at run time.
_TRIM = (
    "var/cache/apt",
    "var/lib/apt/lists",
    "var/log",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "usr/share/i18n",
    "usr/share/lintian",
    "usr/share/bash-completion",
)
_LOG_TAIL = 30


@dataclass(frozen=True, slots=True)
class Recipe:
    """What a base root is made of. Its :attr:`key` names what it produced."""

    suite: str = DEFAULT_SUITE
    mirror: str = DEFAULT_MIRROR
    packages: tuple[str, ...] = PACKAGES
    arch: str = ""

    @property
    def key(self) -> str:
        # The mirror is where the packages come from, not what they are: not in the key.
        blob = json.dumps(
            {
                "format": FORMAT,
                "suite": self.suite,
                "arch": self.arch or _arch(),
                "packages": sorted(self.packages),
                "locales": list(LOCALES),
            },
            sort_keys=True,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class BaseRoot:
    """A built base root and what is known of it."""

    path: Path
    #: sha256 of the tree's contents (every path, type, mode, link target and file).
    digest: str
    suite: str
    size_bytes: int
    packages: int
    #: How long the build took, seconds (0 for a tree given as it is).
    build_seconds: float


def default_suite(os_release: str = "/etc/os-release") -> str:
    """The host's Debian codename (so the tree's glibc is the host interpreter's), else
    bookworm."""
    try:
        text = Path(os_release).read_text()
    except OSError:
        return DEFAULT_SUITE
    fields = dict(
        line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#")
    )
    if fields.get("ID", "").strip('"') != "debian":
        return DEFAULT_SUITE
    return fields.get("VERSION_CODENAME", "").strip('"') or DEFAULT_SUITE


def ensure_base_root(
    cache: Path,
    recipe: Recipe,
    *,
    progress: Callable[[str], None] | None = None,
) -> BaseRoot:
    """The base root ``recipe`` describes, built under ``cache/roots`` unless it exists.

    Raises :class:`ServiceException` with a message a person can act on (debootstrap
    missing, the mirror unreachable, the build's own words) when it cannot be built.
    """
    roots = cache / "roots"
    roots.mkdir(parents=True, exist_ok=True)
    os.chmod(roots, 0o755)
    found = _lookup(roots, recipe)
    if found is None:
        with _locked(roots / ".lock"):
            found = _lookup(roots, recipe)  # another process built it while we waited
            if found is None:
                _remove_partial(roots)
                found = _build(roots, recipe, progress or (lambda line: log.info("%s", line)))
    _hold(found.path)
    return found


#: Shared locks on the trees this process runs on, held until it exits.
_HELD: dict[Path, int] = {}


def _hold(tree: Path) -> None:
    """Say this process uses ``tree``: a shared lock on ``<tree>.lock`` until it exits, so
    that no newer build removes it under a running server."""
    if tree in _HELD:
        return
    fd = os.open(f"{tree}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _HELD[tree] = fd


def describe_tree(path: Path) -> BaseRoot:
    """A tree given as it is (``--base-root DIR``): checked, not built."""
    if not (path / "bin/sh").exists() or not (path / "etc").is_dir():
        raise ServiceException(
            f"the base root {path} is not a root filesystem (it has no /bin/sh or /etc)"
        )
    return BaseRoot(path, "", "", 0, 0, 0.0)


# --- finding --------------------------------------------------------------------------


def _lookup(roots: Path, recipe: Recipe) -> BaseRoot | None:
    try:
        facts = json.loads((roots / f"recipe-{recipe.key}.json").read_text())
        path = roots / facts["tree"]
        if not path.is_dir():
            return None
        return BaseRoot(
            path,
            str(facts["digest"]),
            str(facts["suite"]),
            int(facts["size_bytes"]),
            int(facts["packages"]),
            float(facts["build_seconds"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove_outdated(roots: Path, *, keep: str) -> None:
    """Trees of an older :data:`FORMAT` (and their recipes), unless a process still runs
    on one (it holds a shared lock on it: see :func:`_hold`)."""
    for index in roots.glob("recipe-*.json"):
        try:
            facts = json.loads(index.read_text())
        except (OSError, ValueError):
            continue
        name = str(facts.get("tree", ""))
        if facts.get("format") == FORMAT or name == keep or not name.startswith("base-"):
            continue
        tree = roots / name
        fd = os.open(f"{tree}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # in use
        finally:
            os.close(fd)
        log.info("removing an outdated base root filesystem: %s", tree)
        index.unlink(missing_ok=True)
        _rmtree(tree)
        Path(f"{tree}.lock").unlink(missing_ok=True)


def _remove_partial(roots: Path) -> None:
    """We hold the lock: any temporary tree is a killed build's."""
    for entry in roots.iterdir():
        if entry.name.startswith(".build-"):
            log.info("removing an unfinished base root build: %s", entry)
            _rmtree(entry)


# --- building -------------------------------------------------------------------------


def _build(roots: Path, recipe: Recipe, progress: Callable[[str], None]) -> BaseRoot:
    debootstrap = shutil.which("debootstrap", path="/usr/sbin:/usr/bin:/sbin:/bin")
    if debootstrap is None:
        raise ServiceException(
            "cannot build the sandbox's base root filesystem: debootstrap is not installed "
            "(apt-get install debootstrap), or give a prepared tree with --base-root DIR"
        )
    started = time.monotonic()
    tmp = roots / f".build-{recipe.key}-{os.getpid()}"
    tmp.mkdir(mode=0o755)
    progress(
        f"building the sandbox's base root filesystem (Debian {recipe.suite}, "
        f"{len(recipe.packages)} packages beyond minbase; once per machine, about a minute)"
    )
    try:
        _debootstrap(debootstrap, tmp, recipe, roots / f"build-{recipe.key}.log")
        _finish(tmp)
        digest, size = tree_digest(tmp)
        packages = _count_packages(tmp)
        name = f"base-{digest[:16]}"
        target = roots / name
        if target.exists():
            _rmtree(tmp)  # the same contents, built before under another recipe
        else:
            os.rename(tmp, target)
        seconds = time.monotonic() - started
        facts = {
            "format": FORMAT,
            "tree": name,
            "digest": digest,
            "suite": recipe.suite,
            "size_bytes": size,
            "packages": packages,
            "build_seconds": round(seconds, 1),
            "built_at": time.time(),
        }
        index = roots / f"recipe-{recipe.key}.json"
        partial = index.with_suffix(".tmp")
        partial.write_text(json.dumps(facts, indent=1, sort_keys=True))
        os.replace(partial, index)
    except BaseException:
        _rmtree(tmp)
        raise
    _remove_outdated(roots, keep=name)
    progress(
        f"built the base root filesystem {target} in {seconds:.0f} s "
        f"({size / 2**20:.0f} MiB, {packages} packages)"
    )
    return BaseRoot(target, digest, recipe.suite, size, packages, seconds)


def _debootstrap(debootstrap: str, target: Path, recipe: Recipe, log_path: Path) -> None:
    """Run debootstrap in a mount namespace of its own: the /proc and /sys it mounts in
    the target go with it, even if it is killed."""
    command = [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--fork",
        "--kill-child",
        debootstrap,
        "--variant=minbase",
        "--merged-usr",
        "--components=main",
        "--include=" + ",".join(recipe.packages),
        recipe.suite,
        str(target),
        recipe.mirror,
    ]
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    env["DEBIAN_FRONTEND"] = "noninteractive"
    with open(log_path, "wb") as out:
        try:
            proc = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise ServiceException(
                f"building the base root filesystem timed out after {BUILD_TIMEOUT:.0f} s "
                f"(log: {log_path})"
            ) from None
        except OSError as e:
            raise ServiceException(f"cannot run debootstrap: {e}") from None
    if proc.returncode != 0:
        tail = log_path.read_text(errors="replace").strip().splitlines()[-_LOG_TAIL:]
        raise ServiceException(
            f"building the base root filesystem failed (debootstrap {recipe.suite} from "
            f"{recipe.mirror}, exit status {proc.returncode}; log: {log_path}):\n" + "\n".join(tail)
        )


def _finish(root: Path) -> None:
    """After debootstrap: locales, time zone, trimming, no setuid bits, no identity."""
    for name in LOCALES:
        language, _, charset = name.partition(".")
        subprocess.run(
            [
                "chroot",
                str(root),
                "localedef",
                # A directory per locale, not the archive: a process forked from one that
                # looked for an archive on the host and found none never looks again.
                "--no-archive",
                "-i",
                language,
                "-c",
                "-f",
                charset,
                "-A",
                "/usr/share/locale/locale.alias",
                name,
            ],
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=300,
            check=True,
        )
    localtime = root / "etc/localtime"
    localtime.unlink(missing_ok=True)
    localtime.symlink_to("/usr/share/zoneinfo/Etc/UTC")
    (root / "etc/timezone").write_text("Etc/UTC\n")
    # No password database (Nimbus's layer brings its own /etc/passwd and /etc/group).
    for name in ("shadow", "gshadow", "shadow-", "gshadow-", "passwd-", "group-"):
        (root / "etc" / name).unlink(missing_ok=True)
    # No identity of the build machine's: an empty machine-id and hostname.
    for name in ("etc/machine-id", "etc/hostname"):
        if (root / name).exists():
            (root / name).write_text("")
    for rel in _TRIM:
        path = root / rel
        if path.is_dir():
            for entry in path.iterdir():
                _rmtree(entry)
    docs = root / "usr/share/doc"
    if docs.is_dir():  # keep each package's copyright file, drop the rest
        for package in docs.iterdir():
            if package.is_dir() and not package.is_symlink():
                for entry in package.iterdir():
                    if entry.name != "copyright":
                        _rmtree(entry)
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            file = os.path.join(dirpath, name)
            st = os.lstat(file)
            if stat.S_ISREG(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(file, stat.S_IMODE(st.st_mode) & ~(stat.S_ISUID | stat.S_ISGID))
    if not (root / "bin/sh").exists():
        raise ServiceException("the base root filesystem has no /bin/sh after debootstrap")


def tree_digest(root: Path) -> tuple[str, int]:
    """sha256 over every entry of ``root`` (path, type, mode, link target, contents),
    and the total size of its files."""
    h = hashlib.sha256()
    size = 0
    seen: set[tuple[int, int]] = set()  # hard links count once
    for dirpath, dirs, files in os.walk(root):
        links = [d for d in dirs if os.path.islink(os.path.join(dirpath, d))]
        dirs[:] = sorted(d for d in dirs if d not in links)
        for name in sorted(files + links):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            h.update(f"{rel}\0{st.st_mode:o}\0".encode("utf-8", "surrogateescape"))
            if stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(path).encode("utf-8", "surrogateescape"))
            elif stat.S_ISREG(st.st_mode):
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    size += st.st_size
                with open(path, "rb") as f:
                    h.update(hashlib.file_digest(f, "sha256").digest())
            h.update(b"\n")
        for name in dirs:
            rel = os.path.relpath(os.path.join(dirpath, name), root)
            h.update(f"{rel}/\0\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest(), size


def _count_packages(root: Path) -> int:
    try:
        text = (root / "var/lib/dpkg/status").read_text(errors="replace")
    except OSError:
        return 0
    return text.count("Status: install ok installed")


def _arch() -> str:
    try:
        out = subprocess.run(
            ["dpkg", "--print-architecture"], capture_output=True, text=True, timeout=30
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(os.uname().machine, os.uname().machine)


def _rmtree(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=True)
