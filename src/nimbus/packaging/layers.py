"""Dependency layers: ``pip install --target`` of a function's requirements.txt, cached.

A layer lives at ``layers/<key>/`` under the data directory, read-only, where
``key`` is the sha256 of the runtime, the root filesystem it was built on and the
normalised requirements (comments, blank lines and continuations do not change
it). Layers are built in ``tmp/`` and renamed into place, so a layer directory is
always complete. One pip run per key at a time: concurrent deploys with the same
requirements share it.

pip runs where the :class:`~nimbus.packaging.builder.Builder` says: sandboxed, on
the root instances run on. It gets the operator's pip settings (``PIP_INDEX_URL``,
``PIP_FIND_LINKS``, ``PIP_NO_INDEX``…) and nothing else of the server's
environment. Requirement lines that would choose another index, read other files
or expand environment variables are refused all the same.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement

from nimbus.errors import InvalidParameterValue
from nimbus.outbound import OutboundPolicy, check_url
from nimbus.packaging.builder import Builder
from nimbus.packaging.code import check_hex, discard_tree, publish_tree, remove_tree

__all__ = ["LayerStore", "check_requirements", "has_requirements"]

#: pip's own rule: a comment starts at a ``#`` at the start of a line or after whitespace.
_COMMENT = re.compile(r"(^|\s+)#.*$")
_ENV_VAR = re.compile(r"\$\{[^}]*\}")
#: Why the options users most often copy from elsewhere are refused.
_REFUSED = {
    "--editable": "editable installs read a project from a path or VCS checkout",
    "--requirement": "it includes another file, which the server would read",
    "--constraint": "it includes another file, which the server would read",
    "--index-url": "the package index is the server's setting",
    "--extra-index-url": "the package index is the server's setting",
    "--find-links": "where packages come from is the server's setting",
    "--trusted-host": "it turns off TLS verification on the server",
}
_SHORT = {"-e": "--editable", "-r": "--requirement", "-c": "--constraint", "-i": "--index-url"}
_SHORT["-f"] = "--find-links"
#: The options a requirements.txt may have: alone on a line, the global ones (exact
#: names: pip's abbreviations are refused, so ``--requirem`` cannot pass as something
#: harmless); after a requirement, only ``--hash``.
_GLOBAL = {"--pre": False, "--prefer-binary": False, "--only-binary": True, "--no-binary": True}
_BINARY_VALUE = re.compile(r"^(:all:|:none:|[A-Za-z0-9._-]+(,[A-Za-z0-9._-]+)*)$")
_HASH = re.compile(r"^--hash[=\s]+(sha256|sha384|sha512):[0-9a-fA-F]+$")
_VCS = ("git+", "hg+", "svn+", "bzr+")


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


def check_requirements(requirements: bytes, outbound: OutboundPolicy | None = None) -> None:
    """Accept only what a user needs in a requirements.txt (an allowlist): PEP 508
    requirements (``name[extras]<specifier>; marker``, ``name @ https://…``) with
    ``--hash`` options, and alone on a line ``--pre``, ``--prefer-binary``,
    ``--only-binary``, ``--no-binary``. Direct URLs must be http(s) to a public
    address (see :mod:`nimbus.outbound`). Each line is parsed with ``packaging``'s own
    parser, as pip parses it.

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
        if line.startswith("-"):
            _check_option(where, line)
        else:
            _check_requirement(where, line, outbound)


def _check_option(where: str, line: str) -> None:
    name, _, value = line.partition("=") if "=" in line.split()[0] else line.partition(" ")
    name, value = name.strip(), value.strip()
    full = _SHORT.get(name[:2], name) if not name.startswith("--") else name
    if full in _REFUSED:
        raise InvalidParameterValue(
            f"{where}: {full} is not allowed in requirements.txt ({_REFUSED[full]})"
        )
    if name not in _GLOBAL:
        allowed = ", ".join(_GLOBAL)
        raise InvalidParameterValue(
            f"{where}: the pip option {name} is not allowed in requirements.txt "
            f"(allowed: {allowed}, and --hash after a requirement)"
        )
    if _GLOBAL[name] != bool(value) or (value and not _BINARY_VALUE.match(value)):
        raise InvalidParameterValue(
            f"{where}: {name} "
            + ("takes :all:, :none: or package names" if _GLOBAL[name] else "takes no value")
        )


def _check_requirement(where: str, line: str, outbound: OutboundPolicy | None) -> None:
    spec, hashes = line, []
    if " --" in line or "\t--" in line:
        at = min(i for i in (line.find(" --"), line.find("\t--")) if i >= 0)
        spec, rest = line[:at].strip(), line[at:].strip()
        hashes = ["--" + part.strip() for part in rest.split("--") if part.strip()]
    for option in hashes:
        if not _HASH.match(option):
            raise InvalidParameterValue(
                f"{where}: after a requirement only --hash=<algorithm>:<digest> is allowed "
                f"(got {option.split('=')[0].split()[0]!r})"
            )
    lowered = spec.lower()
    if lowered.startswith(_VCS) or any(f"@ {v}" in lowered or f"@{v}" in lowered for v in _VCS):
        raise InvalidParameterValue(
            f"{where}: version-control requirements are not supported (builds have no git); "
            "list a released package, or a URL of a wheel or sdist"
        )
    if "://" in spec and "@" not in spec.split("://")[0]:
        raise InvalidParameterValue(
            f"{where}: give a URL as 'name @ <url>', so the package's name is known"
        )
    try:
        requirement = Requirement(spec)
    except InvalidRequirement as e:
        if _looks_local(spec):
            raise InvalidParameterValue(
                f"{where}: local paths and file: URLs are not allowed; "
                "list a package name (or an http(s) URL) instead"
            ) from None
        raise InvalidParameterValue(f"{where}: not a valid requirement ({e})") from None
    if requirement.url is not None:
        if requirement.url.lower().startswith("file:"):
            raise InvalidParameterValue(
                f"{where}: local paths and file: URLs are not allowed; "
                "list a package name (or an http(s) URL) instead"
            )
        check_url(requirement.url, f"{where}: the URL", outbound)


def _looks_local(token: str) -> bool:
    lowered = token.lower()
    if re.search(r"(^|[@+])\s*file:", lowered):
        return True
    if "://" in lowered:
        return False
    return lowered.startswith((".", "/", "~")) or "/" in lowered or "\\" in lowered


class LayerStore:
    """Cached dependency layers (see the module docstring)."""

    def __init__(
        self,
        root: Path,
        builder: Builder,
        *,
        platform: str = "",
        outbound: OutboundPolicy | None = None,
    ) -> None:
        """``platform`` names what layers are built against (the base root's digest):
        a layer built on another root is another layer. ``outbound``: what direct URLs
        may reach besides public addresses."""
        self._outbound = outbound
        self._layers = root / "layers"
        self._tmp = root / "tmp"
        self._builder = builder
        self._platform = platform
        self._locks: dict[str, asyncio.Lock] = {}

    def key(self, requirements: bytes, runtime: str) -> str:
        """sha256 hex of ``runtime + "\\0" + [platform + "\\0" +] normalised requirements``."""
        head = runtime + "\0" + (self._platform + "\0" if self._platform else "")
        data = head + _normalised(requirements)
        return hashlib.sha256(data.encode("utf-8", "surrogateescape")).hexdigest()

    def path(self, key: str) -> Path:
        """Where the layer with this key is (or would be)."""
        return self._layers / check_hex(key)

    async def ensure(
        self,
        requirements: bytes,
        runtime: str,
        progress: Callable[[str], None] | None = None,
    ) -> str:
        """Build the layer for these requirements unless it exists; return its key.

        Raises :class:`InvalidParameterValue` for a refused line and
        :class:`DependencyInstallError` (with pip's own output) when pip fails.
        ``progress`` gets pip's output as it comes.
        """
        check_requirements(requirements, self._outbound)
        key = self.key(requirements, runtime)
        target = self.path(key)
        if target.is_dir():
            return key
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            if not target.is_dir():
                await self._build(_normalised(requirements), target, progress or _ignore)
        return key

    def collect(self, keep: set[str]) -> tuple[int, int]:
        """Remove every layer whose key is not in ``keep``: ``(count, bytes)``. Blocking."""
        count = freed = 0
        for layer in list(self._layers.iterdir()) if self._layers.is_dir() else []:
            if layer.name in keep or len(layer.name) != 64:
                continue
            freed += discard_tree(layer, self._tmp)
            count += 1
        return count, freed

    async def _build(
        self, requirements: str, target: Path, progress: Callable[[str], None]
    ) -> None:
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
                await self._builder.install(work, listing, site, progress)
            site.mkdir(exist_ok=True)
            await asyncio.to_thread(publish_tree, site, target)
        finally:
            await asyncio.to_thread(remove_tree, work)


def _ignore(_: str) -> None:
    return None
