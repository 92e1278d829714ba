"""The code store: uploaded zips, content-addressed, unpacked read-only.

Layout under the data directory::

    blobs/sha256/<hex>     the zip as uploaded (0444)
    code/<hex>/            its contents, compiled to .pyc, read-only (files 0444/0555, dirs 0555)
    tmp/                   work in progress; renamed into place atomically

What no version references any more is collected (:meth:`CodeStore.collect`): a
tree is renamed into ``tmp/`` first, so it is never seen half removed. With a
storage limit, a put that would take code and layers past it is refused.

A ``code/<hex>`` directory is either absent or complete: it is built in ``tmp/``
and appears with one ``rename``. Two puts of the same zip race harmlessly: the
loser sees the winner's directory and throws its own copy away.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import zipfile
from pathlib import Path

from nimbus.errors import (
    CodeStorageExceeded,
    InvalidParameterValue,
    RequestTooLarge,
    ResourceNotFound,
)
from nimbus.packaging.zips import (
    check_entries,
    check_entry_count,
    declared_entries,
    extract,
    human_size,
    too_large,
)

__all__ = ["CodeStore", "make_read_only", "publish_tree", "remove_tree"]

log = logging.getLogger(__name__)

_HEX = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20
#: compileall is only information; past this it is abandoned, never a failed deploy.
_COMPILE_TIMEOUT = 300.0
#: Below this many .py files, one compileall process beats a pool of them.
_PARALLEL_COMPILE_FILES = 200


def check_hex(digest: str) -> str:
    """``digest`` if it is 64 lowercase hex digits (safe in a path); else ``ValueError``."""
    if not _HEX.fullmatch(digest):
        raise ValueError(f"not a sha256 hex digest: {digest!r}")
    return digest


def make_read_only(tree: Path, *, keep_top_writable: bool = False) -> None:
    """Files 0444 (0555 if any execute bit is set), directories 0555. Symlinks are left alone.

    ``keep_top_writable`` leaves ``tree`` itself as it is: Linux needs write
    permission on a directory to rename it into another parent (its ``..``
    changes), so :func:`publish_tree` seals the top only after the rename.
    """
    for dirpath, _dirnames, filenames in os.walk(tree, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                continue
            os.chmod(path, 0o555 if mode & 0o111 else 0o444)
        if not (keep_top_writable and dirpath == str(tree)):
            os.chmod(dirpath, 0o555)


def remove_tree(path: Path) -> None:
    """Remove ``path`` (read-only or not) if it exists; log, never raise."""
    try:
        if not os.path.lexists(path):
            return
        if path.is_symlink() or not path.is_dir():
            path.unlink()
            return
        for dirpath, _dirnames, _filenames in os.walk(path):
            os.chmod(dirpath, 0o700)
        shutil.rmtree(path)
    except OSError as e:
        log.warning("could not remove %s: %s", path, e)


def tree_bytes(path: Path) -> int:
    """The bytes of the regular files under ``path`` (their apparent sizes)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(path):
        for name in filenames:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


def discard_tree(path: Path, tmp: Path) -> int:
    """Remove a published tree without its ever being seen half gone: renamed into
    ``tmp`` (atomic), then removed. Its bytes, or 0 if it was not there."""
    tmp.mkdir(parents=True, exist_ok=True)
    doomed = tmp / f"gc-{path.name[:16]}-{os.urandom(4).hex()}"
    try:
        os.rename(path, doomed)
    except FileNotFoundError:
        return 0
    size = tree_bytes(doomed)
    remove_tree(doomed)
    return size


def publish_tree(tree: Path, target: Path) -> None:
    """Make ``tree`` read-only and rename it to ``target`` atomically.

    If ``target`` already exists (a concurrent publish of the same content won),
    ``tree`` is left for the caller to remove and this returns normally.
    """
    make_read_only(tree, keep_top_writable=True)
    try:
        os.rename(tree, target)
    except OSError:
        if target.is_dir():
            return
        raise
    os.chmod(target, 0o555)


class CodeStore:
    """Validated, content-addressed, read-only function code (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        *,
        max_zip_bytes: int,
        max_unpacked_bytes: int,
        python: str,
        max_entries: int = 50_000,
        max_storage_bytes: int = 0,
    ) -> None:
        """``max_storage_bytes``: what code (zips and trees) and dependency layers may
        take together on this node (0: no limit)."""
        self._blobs = root / "blobs" / "sha256"
        self._code = root / "code"
        self._layers = root / "layers"
        self._tmp = root / "tmp"
        self._max_storage_bytes = max_storage_bytes
        #: Bytes of each stored tree (code/<sha> with its zip, layers/<key>), measured once.
        self._sizes: dict[Path, int] = {}
        self._max_zip_bytes = max_zip_bytes
        self._max_unpacked_bytes = max_unpacked_bytes
        self._max_entries = max_entries
        self._python = python

    def path(self, sha256: str) -> Path:
        """Where the code with this hash is (or would be) unpacked."""
        return self._code / check_hex(sha256)

    def put(self, zip_path: Path) -> str:
        """Validate the zip at ``zip_path``, store and unpack it; return its sha256 hex.

        Blocking (run it in a thread). Idempotent: a zip already unpacked is not
        unpacked again. Raises :class:`RequestTooLarge` over ``max_zip_bytes`` and
        :class:`InvalidParameterValue` for anything wrong inside the zip; on error
        nothing is left behind.
        """
        size = os.stat(zip_path).st_size
        if size > self._max_zip_bytes:
            raise RequestTooLarge(too_large("code zip is", size, self._max_zip_bytes))
        for directory in (self._blobs, self._code, self._tmp):
            directory.mkdir(parents=True, exist_ok=True)
        # Work on a private copy, hashed as it is copied: what is validated is
        # exactly what is hashed, even if the caller's file changes meanwhile.
        fd, name = tempfile.mkstemp(prefix="upload-", suffix=".zip", dir=self._tmp)
        copy = Path(name)
        try:
            digest = hashlib.sha256()
            copied = 0
            with os.fdopen(fd, "wb") as out, open(zip_path, "rb") as src:
                while chunk := src.read(_CHUNK):
                    copied += len(chunk)
                    if copied > self._max_zip_bytes:
                        raise RequestTooLarge(too_large("code zip is", copied, self._max_zip_bytes))
                    digest.update(chunk)
                    out.write(chunk)
            sha = digest.hexdigest()
            if not self.path(sha).is_dir():
                self._unpack(copy, sha, copied)
            blob = self._blobs / sha
            if not blob.exists():
                os.chmod(copy, 0o444)
                os.replace(copy, blob)
            return sha
        finally:
            copy.unlink(missing_ok=True)

    def usage(self) -> int:
        """Bytes taken by code and layers (each tree measured the first time it is seen)."""
        total = 0
        present: set[Path] = set()
        for directory in (self._code, self._layers):
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in entries:
                path = Path(entry.path)
                present.add(path)
                if path not in self._sizes:
                    blob = self._blobs / entry.name if directory == self._code else None
                    extra = blob.stat().st_size if blob is not None and blob.exists() else 0
                    self._sizes[path] = tree_bytes(path) + extra
                total += self._sizes[path]
        for gone in set(self._sizes) - present:
            self._sizes.pop(gone, None)
        return total

    def collect(self, keep: set[str]) -> tuple[int, int]:
        """Remove every zip and tree whose sha256 is not in ``keep``: ``(count, bytes)``.
        Blocking. The caller makes sure no deploy is between its put and its publish."""
        count = freed = 0
        for tree in list(self._code.iterdir()) if self._code.is_dir() else []:
            if tree.name in keep or not _HEX.fullmatch(tree.name):
                continue
            freed += discard_tree(tree, self._tmp)
            count += 1
            self._sizes.pop(tree, None)
        for blob in list(self._blobs.iterdir()) if self._blobs.is_dir() else []:
            if blob.name in keep or not _HEX.fullmatch(blob.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                freed += blob.stat().st_size
                blob.unlink()
        return count, freed

    def clear_tmp(self) -> None:
        """Remove what an earlier run left in ``tmp/`` (only when nothing is in progress:
        at start)."""
        for entry in list(self._tmp.iterdir()) if self._tmp.is_dir() else []:
            remove_tree(entry)

    def _check_room(self, adding: int) -> None:
        if not self._max_storage_bytes:
            return
        used = self.usage()
        if used + adding > self._max_storage_bytes:
            raise CodeStorageExceeded(
                f"code storage is full: this code needs {human_size(adding)}, and code and "
                f"dependency layers already take {human_size(used)} of "
                f"{human_size(self._max_storage_bytes)}; delete functions that are no longer "
                "used (the operator can raise --max-code-storage-bytes)"
            )

    def _unpack(self, zip_path: Path, sha: str, zip_bytes: int) -> None:
        work = Path(tempfile.mkdtemp(prefix=f"code-{sha[:12]}-", dir=self._tmp))
        try:
            tree = work / "tree"
            tree.mkdir()
            with open(zip_path, "rb") as fp:
                declared = declared_entries(fp)
            if declared is not None:
                check_entry_count(declared, self._max_entries)
            try:
                zf = zipfile.ZipFile(zip_path)
            except (zipfile.BadZipFile, EOFError, ValueError, OSError) as e:
                raise InvalidParameterValue(f"code is not a valid zip file ({e})") from e
            with zf:
                entries = check_entries(
                    zf, max_unpacked_bytes=self._max_unpacked_bytes, max_entries=self._max_entries
                )
                extract(zf, entries, tree, max_unpacked_bytes=self._max_unpacked_bytes)
            self._check_room(zip_bytes + tree_bytes(tree))
            py_files = sum(1 for e in entries if e.path.endswith(".py"))
            if py_files:
                self._compile(tree, parallel=py_files >= _PARALLEL_COMPILE_FILES)
            publish_tree(tree, self.path(sha))
        finally:
            remove_tree(work)

    def _compile(self, tree: Path, *, parallel: bool) -> None:
        # Compiled with the runtime's own interpreter, so the .pyc tag matches.
        # unchecked-hash: the tree never changes, so imports need not stat sources.
        # -I keeps PYTHONPYCACHEPREFIX & co. from sending the .pyc files elsewhere.
        # A syntax error is not a failed deploy: it surfaces at invoke time as
        # Runtime.ImportModuleError, like Lambda.
        command = [self._python, "-I", "-m", "compileall", "-q", "-f"]
        command += ["--invalidation-mode", "unchecked-hash"]
        if parallel:
            command += ["-j", "0"]
        command.append(str(tree))
        try:
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=_COMPILE_TIMEOUT,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            log.warning("compileall over %s did not run to the end: %s", tree, e)
            return
        if result.returncode != 0:
            output = result.stdout.decode("utf-8", "replace").strip()
            log.info("compileall reported errors (left for invoke time):\n%s", output[-4000:])

    def requirements(self, sha256: str) -> bytes | None:
        """The top-level ``requirements.txt`` of the code, or ``None`` if it has none."""
        code = self._existing(sha256)
        try:
            return (code / "requirements.txt").read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def check_handler(self, sha256: str, handler: str) -> None:
        """Raise :class:`InvalidParameterValue` unless the handler's module is in the code.

        ``handler`` is ``module.function`` (``pkg.sub.function``; ``pkg/sub.function``
        as awslambdaric also accepts). The module may be ``pkg/sub.py``,
        ``pkg/sub/__init__.py``, a sourceless ``pkg/sub.pyc`` or an extension module.
        """
        code = self._existing(sha256)
        module, dot, function = handler.rpartition(".")
        if not dot or not module or not function:
            raise InvalidParameterValue(
                f"handler {handler!r} must be module.function, e.g. app.handler"
            )
        parts = module.replace("/", ".").split(".")
        if not function.isidentifier() or not all(p.isidentifier() for p in parts):
            raise InvalidParameterValue(
                f"handler {handler!r} is not a module.function made of Python identifiers"
            )
        base = code.joinpath(*parts)
        leaf = parts[-1]
        candidates = [
            base.with_name(leaf + ".py"),
            base / "__init__.py",
            base.with_name(leaf + ".pyc"),
            base.with_name(leaf + ".so"),
        ]
        if any(c.is_file() for c in candidates):
            return
        if base.parent.is_dir() and any(base.parent.glob(f"{leaf}.*.so")):
            return
        rel = "/".join(parts)
        raise InvalidParameterValue(
            f"handler {handler!r}: module {'.'.join(parts)!r} not found in the code "
            f"(expected {rel}.py or {rel}/__init__.py)"
        )

    def _existing(self, sha256: str) -> Path:
        code = self.path(sha256)
        if not code.is_dir():
            raise ResourceNotFound(f"no code with sha256 {sha256}")
        return code
