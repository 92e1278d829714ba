"""Zip files in and out: check an uploaded code zip, unpack it safely, build one from a directory.

An uploaded zip is hostile until proven otherwise. :func:`check_entries` reads
only the central directory and rejects anything that could write outside the
unpack directory (absolute paths, ``..``, backslashes), anything that is not a
plain file or directory (symlinks, devices, FIFOs, sockets), duplicates, paths
deeper than :data:`MAX_DEPTH`, and a declared total size over the limit; before
that, :func:`declared_entries` reads the entry count from the zip's end record, so a
zip of millions of entries is refused before Python builds a record for each.
:func:`extract` then counts the bytes it actually writes, so a header that
understates a size cannot zip-bomb the disk.

:func:`package_directory` is the other direction, for the CLI: a deterministic
zip of a function directory, so the same code always hashes the same.
"""

from __future__ import annotations

import errno
import io
import lzma
import os
import re
import shutil
import stat
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from nimbus.errors import InvalidParameterValue

__all__ = [
    "EXCLUDED_DIRS",
    "EXCLUDED_FILES",
    "MAX_DEPTH",
    "Entry",
    "check_entries",
    "check_entry_count",
    "declared_entries",
    "extract",
    "human_size",
    "package_directory",
    "too_large",
]

#: Directory names never packaged, at any depth.
EXCLUDED_DIRS = frozenset(
    {"__pycache__", ".git", ".venv", "venv", "node_modules", ".mypy_cache", ".pytest_cache"}
)
#: File names never packaged, at any depth (plus every ``*.pyc``).
EXCLUDED_FILES = frozenset({".DS_Store"})

#: The earliest time a zip can store: every packaged entry gets it, so the bytes are stable.
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")
_SUPPORTED_COMPRESSION = frozenset(
    {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
)
_SPECIAL_KINDS = {
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}
# What a damaged member raises while being read (bz2 raises a plain OSError).
_CORRUPT = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, ValueError)


@dataclass(frozen=True, slots=True)
class Entry:
    """One checked member of a code zip."""

    info: zipfile.ZipInfo
    #: Normalised relative POSIX path (no ``.`` or empty components), ``""`` for the root.
    path: str
    is_dir: bool
    executable: bool


def human_size(n: int) -> str:
    """``61.2 MB``, ``50 MB``, ``3.5 KB``, ``12 bytes`` (binary units)."""
    if n < 1024:
        return f"{n} bytes"
    unit, scale = next(u for u in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)) if n >= u[1])
    return f"{n / scale:.1f}".removesuffix(".0") + f" {unit}"


def too_large(what: str, size: int, limit: int) -> str:
    """``"code zip is 61.2 MB; the limit is 50 MB"`` (exact bytes when rounding would hide it)."""
    shown, shown_limit = human_size(size), human_size(limit)
    if shown == shown_limit:
        shown, shown_limit = f"{size} bytes", f"{limit} bytes"
    return f"{what} {shown}; the limit is {shown_limit}"


#: Directory levels an entry's path may have (Lambda's own runtimes nest far less;
#: deeper trees only serve to exhaust the recursion of whatever walks them).
MAX_DEPTH = 64
_EOCD = b"PK\x05\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_ZIP64_EOCD = b"PK\x06\x06"


def declared_entries(fp: BinaryIO) -> int | None:
    """The entry count a zip's end of central directory record declares (zip64 too),
    or None when there is no such record (then it is not a zip at all)."""
    fp.seek(0, os.SEEK_END)
    size = fp.tell()
    start = max(0, size - (22 + 0xFFFF))
    fp.seek(start)
    tail = fp.read()
    at = tail.rfind(_EOCD)
    if at < 0 or len(tail) - at < 22:
        return None
    (count,) = struct.unpack_from("<H", tail, at + 10)
    if count != 0xFFFF or at < 20 or tail[at - 20 : at - 16] != _ZIP64_LOCATOR:
        return int(count)
    (offset,) = struct.unpack_from("<Q", tail, at - 20 + 8)
    fp.seek(offset)
    record = fp.read(56)
    if len(record) < 40 or record[:4] != _ZIP64_EOCD:
        return None
    (count64,) = struct.unpack_from("<Q", record, 32)
    return int(count64)


def check_entry_count(count: int, max_entries: int) -> None:
    if count > max_entries:
        raise InvalidParameterValue(
            f"code zip has {count} entries; the limit is {max_entries} "
            "(package fewer files, or raise --max-zip-entries)"
        )


def _normalise(name: str) -> str:
    if "\\" in name:
        raise InvalidParameterValue(
            f"zip entry {name!r} uses backslashes in its path; zip paths must use '/'"
        )
    if name.startswith("/") or _DRIVE.match(name):
        raise InvalidParameterValue(
            f"zip entry {name!r} has an absolute path; entries must be relative"
        )
    parts = name.split("/")
    if ".." in parts:
        raise InvalidParameterValue(
            f"zip entry {name!r} contains a '..' component; entries must stay inside the zip"
        )
    kept = [p for p in parts if p not in ("", ".")]
    if len(kept) > MAX_DEPTH:
        raise InvalidParameterValue(
            f"zip entry {name[:80]!r}… is {len(kept)} levels deep; the limit is {MAX_DEPTH}"
        )
    return "/".join(kept)


def check_entries(
    zf: zipfile.ZipFile, *, max_unpacked_bytes: int, max_entries: int = 50_000
) -> list[Entry]:
    """Check every member of ``zf`` from its central directory; return them in order.

    Raises :class:`InvalidParameterValue` naming the first bad entry.
    """
    infos = zf.infolist()
    if not infos:
        raise InvalidParameterValue("code zip is empty")
    check_entry_count(len(infos), max_entries)
    entries: list[Entry] = []
    seen: set[str] = set()
    files: set[str] = set()
    dirs: set[str] = set()
    declared = 0
    for info in infos:
        name = info.filename
        path = _normalise(name)
        mode = info.external_attr >> 16
        kind = stat.S_IFMT(mode)
        if kind == stat.S_IFLNK:
            raise InvalidParameterValue(
                f"zip entry {name!r} is a symbolic link; links are not allowed in code zips "
                "(package the file it points to instead)"
            )
        if kind in _SPECIAL_KINDS:
            raise InvalidParameterValue(
                f"zip entry {name!r} is {_SPECIAL_KINDS[kind]}; "
                "only regular files and directories are allowed"
            )
        is_dir = name.endswith("/") or kind == stat.S_IFDIR
        if not path:
            if is_dir:  # "./": the root itself
                continue
            raise InvalidParameterValue(f"zip entry {name!r} has an empty path")
        if path in seen:
            raise InvalidParameterValue(f"zip entry {name!r} appears more than once")
        seen.add(path)
        if info.flag_bits & 0x1:
            raise InvalidParameterValue(
                f"zip entry {name!r} is encrypted; encrypted zips are not supported"
            )
        if info.compress_type not in _SUPPORTED_COMPRESSION:
            raise InvalidParameterValue(
                f"zip entry {name!r} uses an unsupported compression method "
                f"({info.compress_type}); use deflate"
            )
        parents = path.split("/")[:-1]
        for i in range(1, len(parents) + 1):
            parent = "/".join(parents[:i])
            if parent in files:
                raise InvalidParameterValue(
                    f"zip entry {name!r} needs {parent!r} to be a directory, "
                    "but the zip also has it as a file"
                )
            dirs.add(parent)
        if is_dir:
            if path in files:
                raise InvalidParameterValue(f"zip entry {name!r} is both a file and a directory")
            dirs.add(path)
        else:
            if path in dirs:
                raise InvalidParameterValue(f"zip entry {name!r} is both a file and a directory")
            files.add(path)
            declared += info.file_size
        entries.append(Entry(info, path, is_dir, executable=bool(mode & 0o111) and not is_dir))
    if not files:
        raise InvalidParameterValue("code zip contains no files")
    if declared > max_unpacked_bytes:
        raise InvalidParameterValue(too_large("code zip unpacks to", declared, max_unpacked_bytes))
    return entries


def _create(target: Path, shown: str) -> io.BufferedWriter:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return target.open("xb")
    except OSError as e:
        if e.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
            raise InvalidParameterValue(
                f"zip entry {shown!r} cannot be unpacked: {e.strerror}"
            ) from e
        raise


def extract(
    zf: zipfile.ZipFile, entries: list[Entry], dest: Path, *, max_unpacked_bytes: int
) -> None:
    """Unpack checked ``entries`` of ``zf`` under ``dest`` (an empty directory).

    Counts the bytes really written: past ``max_unpacked_bytes`` it stops with
    :class:`InvalidParameterValue`, whatever the headers said. A damaged member
    is an :class:`InvalidParameterValue` too. The caller removes ``dest`` on error.
    """
    written = 0
    for entry in entries:
        target = dest.joinpath(*entry.path.split("/"))
        if entry.is_dir:
            try:
                target.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                if e.errno in (errno.ENAMETOOLONG, errno.EILSEQ, errno.EINVAL):
                    raise InvalidParameterValue(
                        f"zip entry {entry.info.filename!r} cannot be unpacked: {e.strerror}"
                    ) from e
                raise
            continue
        try:
            src = zf.open(entry.info)
        except (*_CORRUPT, NotImplementedError, RuntimeError) as e:
            raise InvalidParameterValue(f"zip entry {entry.info.filename!r} is corrupt: {e}") from e
        with src, _create(target, entry.info.filename) as out:
            while True:
                try:
                    chunk = src.read(_CHUNK)
                except _CORRUPT as e:
                    raise InvalidParameterValue(
                        f"zip entry {entry.info.filename!r} is corrupt: {e}"
                    ) from e
                if not chunk:
                    break
                written += len(chunk)
                if written > max_unpacked_bytes:
                    raise InvalidParameterValue(
                        f"code zip unpacks to more than {human_size(max_unpacked_bytes)}, "
                        f"the limit (its headers understate entry {entry.info.filename!r})"
                    )
                out.write(chunk)
        if entry.executable:
            os.chmod(target, 0o755)


def _collect(
    root: Path,
    directory: Path,
    rel: tuple[str, ...],
    ancestors: frozenset[Path],
    out: list[tuple[str, Path, os.stat_result]],
) -> None:
    with os.scandir(directory) as it:
        children = sorted(it, key=lambda e: e.name)
    for child in children:
        parts = (*rel, child.name)
        shown = "/".join(parts)
        if child.name in EXCLUDED_DIRS or child.name in EXCLUDED_FILES:
            continue
        if child.name.endswith(".pyc") and not child.is_dir():
            continue
        path = Path(child.path)
        if child.is_symlink():
            real = path.resolve()
            if not real.is_relative_to(root):
                raise InvalidParameterValue(
                    f"symlink {shown!r} points outside the function directory (to {real}); "
                    "copy the file in instead"
                )
            if not real.exists():
                raise InvalidParameterValue(f"symlink {shown!r} is broken (points to {real})")
            path = real
        st = path.stat()
        if stat.S_ISDIR(st.st_mode):
            if path in ancestors:
                raise InvalidParameterValue(f"symlink {shown!r} makes a loop (points to {path})")
            _collect(root, path, parts, ancestors | {path}, out)
        elif stat.S_ISREG(st.st_mode):
            out.append((shown, path, st))
        else:
            raise InvalidParameterValue(f"{shown!r} is not a regular file or directory")


def package_directory(directory: Path) -> bytes:
    """A deterministic zip of a function directory, for upload.

    Entries are sorted, dated 1980-01-01, deflated, with mode 0644 or 0755
    (executable bits kept). Caches, VCS and virtualenv directories and ``*.pyc``
    are skipped (:data:`EXCLUDED_DIRS`, :data:`EXCLUDED_FILES`). A symlink is
    followed if it resolves inside the directory; otherwise
    :class:`InvalidParameterValue` names it.
    """
    if not directory.is_dir():
        raise InvalidParameterValue(f"{directory} is not a directory")
    root = directory.resolve()
    found: list[tuple[str, Path, os.stat_result]] = []
    _collect(root, root, (), frozenset({root}), found)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, path, st in sorted(found, key=lambda f: f[0]):
            info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.create_system = 3  # Unix, so external_attr carries the mode on every platform
            mode = 0o755 if st.st_mode & 0o111 else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.file_size = st.st_size
            with path.open("rb") as src, zf.open(info, "w") as dst:
                shutil.copyfileobj(src, dst, _CHUNK)
    return buf.getvalue()
