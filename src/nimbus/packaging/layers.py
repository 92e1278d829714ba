"""Dependency layers: ``pip install --target`` of a function's requirements.txt, cached.

A layer lives at ``layers/<key>/`` under the data directory, read-only, where
``key`` is the sha256 of the runtime and the normalised requirements (comments,
blank lines and continuations do not change it). Layers are built in ``tmp/``
and renamed into place, so a layer directory is always complete. One pip run
per key at a time: concurrent deploys with the same requirements share it.

pip runs on the server, with the server's environment (so ``PIP_INDEX_URL``,
``PIP_FIND_LINKS``, ``PIP_NO_INDEX`` set by the operator apply). That is why
requirement lines that would choose another index, read other files on the
server or expand the server's environment variables are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import tempfile
from pathlib import Path

from nimbus.errors import DependencyInstallError, InvalidParameterValue
from nimbus.packaging.code import check_hex, publish_tree, remove_tree

__all__ = ["LayerStore", "check_requirements", "has_requirements"]

#: pip's own rule: a comment starts at a ``#`` at the start of a line or after whitespace.
_COMMENT = re.compile(r"(^|\s+)#.*$")
_ENV_VAR = re.compile(r"\$\{[^}]*\}")
#: (short option, long option, why it is refused)
_FORBIDDEN = (
    ("-e", "--editable", "editable installs read a project from a path or VCS checkout"),
    ("-r", "--requirement", "it includes another file, which the server would read"),
    ("-c", "--constraint", "it includes another file, which the server would read"),
    ("-i", "--index-url", "the package index is the server's setting"),
    ("", "--extra-index-url", "the package index is the server's setting"),
    ("-f", "--find-links", "where packages come from is the server's setting"),
    ("", "--trusted-host", "it turns off TLS verification on the server"),
)
_TAIL_LINES = 40
#: Seconds one pip run may take before the deploy fails.
DEFAULT_TIMEOUT = 900.0


def _text(requirements: bytes) -> str:
    return requirements.decode("utf-8-sig", "surrogateescape")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """``(first line number, line)`` for each requirement line, the way pip reads them:
    backslash continuations joined, comments and blank lines dropped, whitespace stripped.
    """
    out: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        if not pending:
            start = number
        if raw.endswith("\\") and not _COMMENT.match(raw):
            pending.append(raw[:-1])
            continue
        pending.append(raw)
        line = _COMMENT.sub("", "".join(pending)).strip()
        pending = []
        if line:
            out.append((start, line))
    if pending:
        line = _COMMENT.sub("", "".join(pending)).strip()
        if line:
            out.append((start, line))
    return out


def _normalised(requirements: bytes) -> str:
    return "\n".join(line for _, line in _logical_lines(_text(requirements)))


def has_requirements(requirements: bytes) -> bool:
    """Whether a requirements.txt asks for anything (not empty or only comments)."""
    return bool(_logical_lines(_text(requirements)))


def _looks_local(token: str) -> bool:
    lowered = token.lower()
    if re.search(r"(^|[@+])\s*file:", lowered):
        return True
    if "://" in lowered:
        return False
    return lowered.startswith((".", "/", "~")) or "/" in lowered or "\\" in lowered


def check_requirements(requirements: bytes) -> None:
    """Refuse requirement lines that would reach outside the install job.

    Raises :class:`InvalidParameterValue` naming the line and the reason.
    """
    try:
        text = requirements.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InvalidParameterValue("requirements.txt is not UTF-8 text") from None
    for number, line in _logical_lines(text):
        where = f"requirements.txt line {number} ({line!r})"
        if _ENV_VAR.search(line):
            raise InvalidParameterValue(
                f"{where}: ${{VARIABLE}} references are not allowed; "
                "pip would expand them from the Nimbus server's environment"
            )
        for token in line.split():
            if not token.startswith("-"):
                continue
            for short, long, why in _FORBIDDEN:
                is_long = token == long or token.startswith(long + "=")
                is_short = bool(short) and not token.startswith("--") and token.startswith(short)
                if is_long or is_short:
                    raise InvalidParameterValue(
                        f"{where}: {long} is not allowed in requirements.txt ({why})"
                    )
        requirement = re.split(r"[\s;]", line, maxsplit=1)[0]
        if not requirement.startswith("-") and _looks_local(line if "@" in line else requirement):
            raise InvalidParameterValue(
                f"{where}: local paths and file: URLs are not allowed; "
                "list a package name (or an http(s) URL) instead"
            )


class LayerStore:
    """Cached dependency layers (see the module docstring)."""

    def __init__(self, root: Path, *, python: str, timeout: float = DEFAULT_TIMEOUT) -> None:
        """``python`` is the interpreter that runs pip (Nimbus's own ``sys.executable``)."""
        self._layers = root / "layers"
        self._tmp = root / "tmp"
        self._python = python
        self._timeout = timeout
        self._locks: dict[str, asyncio.Lock] = {}

    @staticmethod
    def key(requirements: bytes, runtime: str) -> str:
        """sha256 hex of ``runtime + "\\0" + normalised requirements``."""
        data = runtime + "\0" + _normalised(requirements)
        return hashlib.sha256(data.encode("utf-8", "surrogateescape")).hexdigest()

    def path(self, key: str) -> Path:
        """Where the layer with this key is (or would be)."""
        return self._layers / check_hex(key)

    async def ensure(self, requirements: bytes, runtime: str) -> str:
        """Build the layer for these requirements unless it exists; return its key.

        Raises :class:`InvalidParameterValue` for a refused line and
        :class:`DependencyInstallError` (with pip's own output) when pip fails.
        """
        check_requirements(requirements)
        key = self.key(requirements, runtime)
        target = self.path(key)
        if target.is_dir():
            return key
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if not target.is_dir():
                await self._build(_normalised(requirements), target)
        return key

    async def _build(self, requirements: str, target: Path) -> None:
        def prepare() -> Path:
            self._layers.mkdir(parents=True, exist_ok=True)
            self._tmp.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=f"layer-{target.name[:12]}-", dir=self._tmp))

        work = await asyncio.to_thread(prepare)
        try:
            site = work / "site"
            if requirements:
                listing = work / "requirements.txt"
                listing.write_text(requirements + "\n", encoding="utf-8", errors="surrogateescape")
                await self._pip(work, site, listing)
            site.mkdir(exist_ok=True)
            await asyncio.to_thread(publish_tree, site, target)
        finally:
            await asyncio.to_thread(remove_tree, work)

    async def _pip(self, work: Path, site: Path, listing: Path) -> None:
        env = dict(os.environ)
        env["PIP_NO_WARN_SCRIPT_LOCATION"] = "1"
        proc = await asyncio.create_subprocess_exec(
            self._python,
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--target",
            str(site),
            "-r",
            str(listing),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
            cwd=work,
            # Its own process group, so a timeout or cancel also stops builds pip started.
            start_new_session=True,
        )
        try:
            output, _ = await asyncio.wait_for(proc.communicate(), self._timeout)
        except TimeoutError:
            await _kill(proc)
            raise DependencyInstallError(
                f"installing requirements.txt timed out after {self._timeout:g} s"
            ) from None
        except BaseException:
            await _kill(proc)
            raise
        if proc.returncode != 0:
            lines = output.decode("utf-8", "replace").rstrip().splitlines()
            raise DependencyInstallError(
                "installing requirements.txt failed:\n" + "\n".join(lines[-_TAIL_LINES:])
            )


async def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        await proc.wait()
