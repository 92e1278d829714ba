"""The exec'd launcher (``ProcessLauncher``): a fresh ``python -I -S bootstrap.py`` per
instance, the reference the zygote's forks are measured against. Real processes."""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import orjson

from nimbus.executor.core import Executor, ProcessLauncher
from nimbus.models import FunctionSpec, Version
from nimbus.runtimes.registry import available_runtimes

FIXTURES = Path(__file__).parent.parent / "fixtures" / "functions"


def test_an_execd_instance_serves_and_reports_its_output() -> None:
    async def run() -> None:
        lines: list[tuple[str, str]] = []
        executor = Executor(
            ProcessLauncher(),
            available_runtimes(),
            lambda sha: FIXTURES / "print-lots",
            lambda sha: Path("/nonexistent"),
            lambda fn, ver, inst, rid, msg, platform=False: lines.append((rid, msg)),
            max_log_bytes=1 << 20,
        )
        runtime = f"python{sys.version_info.major}.{sys.version_info.minor}"
        spec = FunctionSpec(name="execd", runtime=runtime, handler="app.handler", timeout=10)
        inst = await executor.start(Version(spec, 1, "0" * 64, None, 0.0))
        try:
            rid = uuid.uuid4()
            result = await inst.invoke(str(rid), rid.bytes, orjson.dumps({"lines": 2}))
            assert result.error is None and orjson.loads(result.body) == {"printed": 2}
            assert result.cold
            mine = [m for r, m in lines if r == str(rid)]
            assert mine[1:3] == ["line 0", "line 1"] and mine[-1].startswith("REPORT")
            assert ("", "init line from module top") in lines
        finally:
            await inst.stop()
            await executor.close()
        assert inst.process.returncode is not None

    asyncio.run(run())
