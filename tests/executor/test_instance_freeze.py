"""When an :class:`Instance` asks its process to freeze and thaw: only when idle, once,
and thawed by the next invocation. A real exec'd instance (whose plain process has no
cgroup: its freeze and thaw are recorded here, and do nothing). The freezer itself is
tested in tests/sandbox/test_cgroups_real.py and end to end in tests/e2e/test_freeze.py."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import orjson

from nimbus.executor.core import Executor, ProcessLauncher, State
from nimbus.executor.launcher import InstanceProcess
from nimbus.models import FunctionSpec, Version
from nimbus.runtimes.registry import available_runtimes

FIXTURES = Path(__file__).parent.parent / "fixtures" / "functions"


class Recording:
    """An :class:`InstanceProcess` that records freeze/thaw and delegates the rest."""

    def __init__(self, inner: InstanceProcess, calls: list[str]) -> None:
        self.inner = inner
        self.calls = calls

    @property
    def pid(self) -> int:
        return self.inner.pid

    @property
    def returncode(self) -> int | None:
        return self.inner.returncode

    async def wait(self) -> int:
        return await self.inner.wait()

    def kill(self) -> None:
        self.calls.append("kill")
        self.inner.kill()

    def oom_killed(self) -> bool:
        return self.inner.oom_killed()

    def freeze(self) -> None:
        self.calls.append("freeze")
        self.inner.freeze()

    def thaw(self) -> None:
        self.calls.append("thaw")
        self.inner.thaw()

    async def cleanup(self) -> None:
        await self.inner.cleanup()


def test_an_instance_freezes_only_when_idle_and_the_next_invocation_thaws_it() -> None:
    async def run() -> None:
        executor = Executor(
            ProcessLauncher(),
            available_runtimes(),
            lambda sha: FIXTURES / "echo",
            lambda sha: Path("/nonexistent"),
            lambda fn, ver, inst, rid, msg, platform=False: None,
            max_log_bytes=1 << 20,
        )
        runtime = f"python{sys.version_info.major}.{sys.version_info.minor}"
        spec = FunctionSpec(name="frz", runtime=runtime, handler="app.handler", timeout=10)
        inst = await executor.start(Version(spec, 1, "0" * 64, None, 0.0))
        calls: list[str] = []
        inst.process = Recording(inst.process, calls)
        try:
            assert inst.state is State.IDLE
            inst.freeze()
            inst.freeze()  # already frozen: nothing more
            assert calls == ["freeze"]

            rid = uuid.uuid4()
            result = await inst.invoke(str(rid), rid.bytes, orjson.dumps({"n": 1}))
            assert result.error is None, result.body
            assert calls == ["freeze", "thaw"]  # thawed before its event, once

            inst.state = State.BUSY  # as while an invocation runs: never frozen
            inst.freeze()
            assert calls == ["freeze", "thaw"]
            inst.state = State.IDLE
            rid = uuid.uuid4()
            await inst.invoke(str(rid), rid.bytes, orjson.dumps({"n": 2}))
            assert calls == ["freeze", "thaw"]  # not frozen: nothing to thaw
        finally:
            await inst.stop()
            await executor.close()

    asyncio.run(run())
