"""How an instance process is started: the ``Launcher`` protocol and plain processes.

A launcher turns a :class:`LaunchPlan` into a running process. The plain
:class:`ProcessLauncher` starts an unsandboxed child in its own session (so its
whole process group can be killed); the sandboxed and zygote launchers are
siblings with the same surface.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True, slots=True)
class LaunchPlan:
    """Everything needed to start one instance."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    #: The instance's end of its socket; it keeps this fd number.
    sock_fd: int
    #: The write end of the output pipe; becomes fd 1 and 2.
    output_fd: int
    memory_mb: int


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


class Launcher(Protocol):
    async def launch(self, plan: LaunchPlan) -> InstanceProcess: ...


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


class ProcessLauncher:
    """Starts instances as plain processes (no sandbox)."""

    async def launch(self, plan: LaunchPlan) -> PlainProcess:
        proc = await asyncio.create_subprocess_exec(
            *plan.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=plan.output_fd,
            stderr=plan.output_fd,
            pass_fds=(plan.sock_fd,),
            env=plan.env,
            cwd=str(plan.cwd),
            start_new_session=True,
        )
        return PlainProcess(proc)
