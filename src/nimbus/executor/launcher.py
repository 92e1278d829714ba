"""How an instance process is started: the ``Launcher`` protocol and plain processes.

A launcher turns a :class:`LaunchPlan` into a running process. Siblings:

- :class:`ProcessLauncher`: ``exec`` a fresh interpreter per instance, in its
  own session, unsandboxed (the reference, and the fallback);
- :class:`~nimbus.executor.zygote.client.ZygoteLauncher`: fork from a zygote
  that has the runtime loaded, sandboxed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class LaunchError(Exception):
    """The launcher could not start the instance (its message says why, for the logs)."""


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Everything needed to start one instance."""

    #: Unique over the node's lifetime: ``<function>-<random>``.
    instance_id: str
    function: str
    #: The exec'd command line (exec-based launchers only).
    argv: list[str]
    #: The instance's whole environment.
    env: dict[str, str]
    code_dir: Path
    layer_dir: Path | None
    #: The instance's end of its socket; passed to the instance.
    sock_fd: int
    #: The write end of the output pipe; becomes fd 1 and 2.
    output_fd: int
    #: The token of the output sentinel.
    token: str
    uid: int
    memory_mb: int
    tmp_mb: int
    network: str
    #: Host directories mounted read-only in the sandbox: ``(host path, path inside)``.
    mounts: tuple[tuple[str, str], ...] = ()
    #: Start a function zygote (init, then fork instances) rather than an instance.
    zygote: bool = False
    #: Fork this instance from the function zygote launched with this instance id.
    zygote_of: str = ""


class InstanceProcess(Protocol):
    """A started instance process."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    async def wait(self) -> int:
        """Wait for exit; the return code, negative for a signal."""
        ...

    def kill(self) -> None:
        """Kill the instance and everything it started. Idempotent, never blocks."""
        ...

    def oom_killed(self) -> bool:
        """Did the kernel's OOM killer end it (its memory limit)?"""
        ...

    def freeze(self) -> None:
        """Stop everything the instance runs until :meth:`thaw` (its cgroup's freezer);
        a no-op where there is none. Never blocks."""
        ...

    def thaw(self) -> None:
        """Let a frozen instance run again; a no-op if it is not frozen."""
        ...

    async def cleanup(self) -> None:
        """After exit: release what the instance held (cgroups, …). Idempotent."""
        ...


class Launcher(Protocol):
    #: Whether the instance expects its environment and token as a SPEC frame on its
    #: socket (forked instances) rather than from exec (``argv``/``env``).
    spec_over_socket: bool

    @property
    def sandboxed(self) -> bool:
        """Instances run on the sandbox's root (``/var/task``, ``/var/lang``...)."""
        ...

    #: Paths as the instance sees them: ``/var/task`` in a sandbox, the host path otherwise.
    def task_root(self, plan_code_dir: Path) -> str: ...

    def layer_root(self, plan_layer_dir: Path) -> str: ...

    async def launch(self, plan: LaunchPlan) -> InstanceProcess: ...

    async def close(self) -> None: ...


class PlainProcess:
    """A child in its own session: ``kill()`` signals its whole process group."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self._proc = proc

    @property
    def pid(self) -> int:
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    async def wait(self) -> int:
        return await self._proc.wait()

    def kill(self) -> None:
        # The group outlives its leader: signal it even when the leader is gone.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, signal.SIGKILL)

    def oom_killed(self) -> bool:
        return False

    # A plain process has no cgroup: nothing of it is frozen between invocations.
    def freeze(self) -> None:
        return None

    def thaw(self) -> None:
        return None

    async def cleanup(self) -> None:
        return None


class ProcessLauncher:
    """Starts instances as plain processes (no sandbox), one ``exec`` each."""

    spec_over_socket = False
    sandboxed = False

    def task_root(self, code_dir: Path) -> str:
        return str(code_dir)

    def layer_root(self, layer_dir: Path) -> str:
        return str(layer_dir)

    async def launch(self, plan: LaunchPlan) -> PlainProcess:
        proc = await asyncio.create_subprocess_exec(
            *plan.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=plan.output_fd,
            stderr=plan.output_fd,
            pass_fds=(plan.sock_fd,),
            env=plan.env,
            cwd=str(plan.code_dir),
            start_new_session=True,
        )
        return PlainProcess(proc)

    async def close(self) -> None:
        return None
