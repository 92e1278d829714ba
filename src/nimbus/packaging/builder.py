"""Where ``pip install`` of a function's requirements runs: the :class:`Builder` protocol.

Siblings:

- :class:`SandboxBuilder`: in a sandbox of its own (:mod:`nimbus.executor.sandbox.jail`),
  on the same root filesystem instances run on (so what pip resolves for that
  root's glibc is what imports at run time), as an unprivileged uid no function
  has, without capabilities, under the instance seccomp filter, in a cgroup
  (memory, pids, a CPU share), with a time limit; network only through an egress
  namespace (the host and link-local unreachable), or none at all when the
  operator's pip settings name no index. Nothing of the host is visible but the
  root, a work directory, pip itself (read-only) and the operator's local
  ``--find-links`` directories (read-only).
- :class:`HostBuilder`: pip on the host, as the server's user
  (``--insecure-no-sandbox`` only, where instances are not sandboxed either).

Both pass on only the operator's pip settings (``PIP_INDEX_URL``,
``PIP_EXTRA_INDEX_URL``, ``PIP_FIND_LINKS``, ``PIP_NO_INDEX``, …), never the rest of
the server's environment, and report pip's output line by line as it comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from nimbus.errors import DependencyInstallError

if TYPE_CHECKING:
    from nimbus.executor.sandbox.cgroups import CgroupDriver
    from nimbus.executor.sandbox.network import EgressNetworks
    from nimbus.executor.sandbox.rootfs import Rootfs

__all__ = ["BUILD_UID", "Builder", "HostBuilder", "SandboxBuilder", "pip_environment"]

#: The uid builds run as: below every function's (those start at 200000), never one.
BUILD_UID = 199999
#: The pip settings an operator's environment may give builds.
PIP_SETTINGS = (
    "PIP_INDEX_URL",
    "PIP_EXTRA_INDEX_URL",
    "PIP_FIND_LINKS",
    "PIP_NO_INDEX",
    "PIP_TRUSTED_HOST",
    "PIP_DEFAULT_TIMEOUT",
    "PIP_RETRIES",
    "PIP_ONLY_BINARY",
    "PIP_PREFER_BINARY",
    "PIP_CERT",
)
#: The CA bundle builds (and instances) see: the host's, copied into the runtime layer.
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
_TAIL_LINES = 40
Progress = Callable[[str], None]


class Builder(Protocol):
    """Installs a requirements file into a directory, or raises DependencyInstallError."""

    async def install(
        self, work: Path, requirements: Path, target: Path, progress: Progress
    ) -> None:
        """``pip install --target target -r requirements``; ``work`` (which holds both)
        is the build's scratch space. ``progress`` gets pip's output, line by line."""
        ...


def pip_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The operator's pip settings out of ``environ``; nothing else of it."""
    return {k: environ[k] for k in PIP_SETTINGS if environ.get(k)}


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


_PIP_ARGS = (
    "install",
    "--disable-pip-version-check",
    "--no-input",
    "--no-cache-dir",
    "--prefer-binary",  # a wheel, even an older one, over building an sdist
    "--progress-bar",
    "off",
)


@dataclass
class SandboxBuilder:
    """Builds in a sandbox on the instances' root (see the module docstring)."""

    rootfs: Rootfs
    cgroups: CgroupDriver
    egress: EgressNetworks
    seccomp_path: Path
    #: The runtime interpreter (the one instances run), at its path inside the root.
    python: str
    timeout: float = 900.0
    memory_mb: int = 3072
    environ: Mapping[str, str] = field(default_factory=dict)
    nofile: int = 4096
    #: Private networks builds may reach anyway (the operator's --outbound-allow).
    allow: tuple[str, ...] = ()

    async def install(
        self, work: Path, requirements: Path, target: Path, progress: Progress
    ) -> None:
        import pip  # the server's own: bound read-only into the sandbox

        from nimbus.executor.sandbox.cgroups import Limits
        from nimbus.executor.zygote.client import NIMBUS_ROOT

        pip_env = pip_environment(self.environ)
        binds: list[list[object]] = [
            [str(work), "/var/task", True],
            [str(Path(pip.__file__).parent), "/var/runtime/pip", False],
        ]
        links = []
        for n, link in enumerate(pip_env.get("PIP_FIND_LINKS", "").split()):
            if "://" in link and not link.startswith("file://"):
                links.append(link)
            elif os.path.isdir(path := link.removeprefix("file://")):
                if os.stat(path).st_mode & 0o005 != 0o005:
                    raise DependencyInstallError(
                        f"the server's PIP_FIND_LINKS directory {path} cannot be read by the "
                        f"build sandbox (uid {BUILD_UID}): make it readable by others (o+rx)"
                    )
                binds.append([os.path.realpath(path), f"/mnt/find-links/{n}", False])
                links.append(f"/mnt/find-links/{n}")
        cert = pip_env.pop("PIP_CERT", "")
        if cert and os.path.realpath(cert) != os.path.realpath(CA_BUNDLE) and os.path.isfile(cert):
            binds.append([os.path.realpath(cert), "/mnt/pip-cert", False])
            pip_env["PIP_CERT"] = "/mnt/pip-cert"
        elif cert:
            pip_env["PIP_CERT"] = CA_BUNDLE
        if links:
            pip_env["PIP_FIND_LINKS"] = " ".join(links)
        else:
            pip_env.pop("PIP_FIND_LINKS", None)
        offline = _truthy(pip_env.get("PIP_NO_INDEX")) and not any("://" in x for x in links)
        netns = None
        if not offline:
            net = await self.egress.ensure("!build", public_only=True, allow=self.allow)
            netns = net.path

        (work / "tmp").mkdir(exist_ok=True)
        target.mkdir(exist_ok=True)
        for scratch in (work, work / "tmp", target):
            os.chown(scratch, BUILD_UID, BUILD_UID)

        def inside(path: Path) -> str:
            return "/var/task/" + str(path.relative_to(work))

        name = f"build-{secrets.token_hex(6)}"
        limits = Limits.for_memory_mb(self.memory_mb, pids_max=1024)
        procs = self.cgroups.create(name, limits)
        env = {
            "PATH": "/var/lang/bin:/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": "/tmp",
            "TMPDIR": "/var/task/tmp",
            "PIP_NO_WARN_SCRIPT_LOCATION": "1",
            "PIP_ROOT_USER_ACTION": "ignore",
            **pip_env,
        }
        spec = {
            "rootfs": str(self.rootfs.path),
            "base": str(self.rootfs.base),
            "prefix": str(self.rootfs.python_prefix),
            "hidden": [str(p) for p in self.rootfs.hidden],
            "procs": procs,
            "netns": netns,
            "binds": binds,
            "uid": BUILD_UID,
            "tmp_mb": 64,
            "memory_bytes": limits.memory_bytes,
            "fsize": 4 * 2**30,
            "nofile": self.nofile,
            "seccomp": str(self.seccomp_path),
            "hostname": "build",
            "cwd": "/var/task",
            "argv": [
                self.python,
                "-I",
                "-S",
                "-c",
                "import sys; sys.path.insert(0, '/var/runtime'); "
                "from pip._internal.cli.main import main; sys.exit(main())",
                *_PIP_ARGS,
                "--target",
                inside(target),
                "-r",
                inside(requirements),
            ],
            "env": env,
        }
        jail = Path(NIMBUS_ROOT) / "nimbus" / "executor" / "sandbox" / "jail.py"
        try:
            await _run(
                [self.python, "-I", "-S", str(jail), NIMBUS_ROOT],
                stdin=json.dumps(spec).encode(),
                env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
                cwd=work,
                timeout=self.timeout,
                progress=progress,
                kill=lambda: self.cgroups.kill(name),
            )
        finally:
            await _remove_cgroup(self.cgroups, name)
        _own_by_root(target)


@dataclass
class HostBuilder:
    """pip on the host, as the server's own user (never with untrusted code)."""

    python: str
    timeout: float = 900.0
    environ: Mapping[str, str] = field(default_factory=dict)

    async def install(
        self, work: Path, requirements: Path, target: Path, progress: Progress
    ) -> None:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "HOME": str(work),
            "TMPDIR": str(work),
            "PIP_NO_WARN_SCRIPT_LOCATION": "1",
            "PIP_ROOT_USER_ACTION": "ignore",
            **pip_environment(self.environ),
        }
        await _run(
            [
                self.python,
                "-I",
                "-m",
                "pip",
                *_PIP_ARGS,
                "--target",
                str(target),
                "-r",
                str(requirements),
            ],
            env=env,
            cwd=work,
            timeout=self.timeout,
            progress=progress,
        )


async def _run(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: Path,
    timeout: float,
    progress: Progress,
    kill: Callable[[], None] | None = None,
    stdin: bytes | None = None,
) -> None:
    """Run a build command (``stdin`` its input), streaming its lines to ``progress``; raise
    DependencyInstallError with the tail of its output when it fails or times out."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=cwd,
        # Its own process group, so a timeout or cancel also stops what pip started.
        start_new_session=True,
    )
    tail: list[str] = []
    if stdin is not None:
        assert proc.stdin is not None
        proc.stdin.write(stdin)
        await proc.stdin.drain()
        proc.stdin.close()

    async def read() -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip()
            tail.append(line)
            del tail[:-_TAIL_LINES]
            if line:
                progress(line)

    try:
        await asyncio.wait_for(asyncio.gather(read(), proc.wait()), timeout)
    except TimeoutError:
        await _kill(proc, kill)
        raise DependencyInstallError(
            f"installing requirements.txt timed out after {timeout:g} s"
        ) from None
    except BaseException:
        await _kill(proc, kill)
        raise
    if proc.returncode != 0:
        raise DependencyInstallError("installing requirements.txt failed:\n" + "\n".join(tail))


async def _kill(proc: asyncio.subprocess.Process, kill: Callable[[], None] | None) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    if kill is not None:
        with contextlib.suppress(OSError):
            kill()
    with contextlib.suppress(Exception):
        await proc.wait()


async def _remove_cgroup(cgroups: CgroupDriver, name: str) -> None:
    delay = 0.005
    for _ in range(40):
        with contextlib.suppress(OSError):
            cgroups.kill(name)
            if cgroups.remove(name):
                return
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.25)


def _own_by_root(tree: Path) -> None:
    """What the build uid wrote becomes root's (it is published read-only after)."""
    for dirpath, dirs, files in os.walk(tree):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(dirpath, name), 0, 0)
    os.lchown(tree, 0, 0)
