"""The platform's own lines in a function's log: ``START``, ``END``, ``REPORT``, ``INIT_REPORT``.

One formatter for all of them, in the function's log format (Lambda's
LoggingConfig): tab-separated text, or with ``logging.format: JSON`` the JSON
records Lambda writes (``platform.start``, ``platform.runtimeDone``,
``platform.report``, ``platform.initReport``), filtered by ``system_level``
(``WARN`` keeps none of these; ``platform.runtimeDone`` only at ``DEBUG``).
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from nimbus.models import FunctionSpec, InvokeResult

__all__ = ["PlatformLog"]

_LEVELS = {"DEBUG": 0, "INFO": 1, "WARN": 2}


def _now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


class PlatformLog:
    """The platform lines of one function version, as its logging settings want them."""

    __slots__ = ("_json", "_level", "memory", "version")

    def __init__(self, spec: FunctionSpec, version: int) -> None:
        self.version = version
        self.memory = spec.memory
        self._json = spec.logging.format == "JSON"
        self._level = _LEVELS[spec.logging.system_level or "INFO"]

    def _record(self, kind: str, record: dict[str, Any]) -> str:
        return orjson.dumps({"time": _now(), "type": kind, "record": record}).decode()

    def start(self, request_id: str) -> str | None:
        if self._level > 1:
            return None
        if self._json:
            return self._record(
                "platform.start", {"requestId": request_id, "version": str(self.version)}
            )
        return f"START RequestId: {request_id} Version: {self.version}"

    def trailer(self, r: InvokeResult) -> list[str]:
        """What follows an invocation's own output: ``END`` and ``REPORT``."""
        if self._level > 1:
            return []
        status, error_type = _status(r)
        if self._json:
            metrics: dict[str, Any] = {
                "durationMs": round(r.duration_ms, 2),
                "billedDurationMs": r.billed_ms,
                "memorySizeMB": self.memory,
                "maxMemoryUsedMB": r.max_memory_mb,
            }
            if r.init_ms is not None:
                metrics["initDurationMs"] = round(r.init_ms, 2)
            if r.restore_ms is not None:
                metrics["restoreDurationMs"] = round(r.restore_ms, 2)
            record: dict[str, Any] = {"requestId": r.request_id, "metrics": metrics}
            record["status"] = status
            if error_type:
                record["errorType"] = error_type
            lines = []
            if self._level == 0:
                lines.append(
                    self._record(
                        "platform.runtimeDone", {"requestId": r.request_id, "status": status}
                    )
                )
            lines.append(self._record("platform.report", record))
            return lines
        report = (
            f"REPORT RequestId: {r.request_id}\tDuration: {r.duration_ms:.2f} ms\t"
            f"Billed Duration: {r.billed_ms} ms\tMemory Size: {self.memory} MB\t"
            f"Max Memory Used: {r.max_memory_mb} MB"
        )
        if r.init_ms is not None:
            report += f"\tInit Duration: {r.init_ms:.2f} ms"
        if r.restore_ms is not None:
            report += f"\tRestore Duration: {r.restore_ms:.2f} ms"
        report += "\tStart: cold" if r.cold else "\tStart: warm"
        if status != "success" and r.error != "Unhandled":
            report += f"\tStatus: {status}"
            if error_type:
                report += f"\tError Type: {error_type}"
        return [f"END RequestId: {r.request_id}", report]

    def init_report(
        self, init_ms: float, phase: str, error_type: str | None = None, *, kind: str = "init"
    ) -> str | None:
        """``INIT_REPORT``: an init that failed (phase ``init``), or a function zygote's
        init (phase ``zygote``, ``kind`` its initialization type)."""
        if self._level > 1 and error_type is None:
            return None
        status = "error" if error_type else "success"
        if self._json:
            record: dict[str, Any] = {
                "initializationType": kind,
                "phase": phase,
                "status": status,
                "metrics": {"durationMs": round(init_ms, 2)},
            }
            if error_type:
                record["errorType"] = error_type
            return self._record("platform.initReport", record)
        line = f"INIT_REPORT Init Duration: {init_ms:.2f} ms\tPhase: {phase}\tStatus: {status}"
        if error_type:
            line += f"\tError Type: {error_type}"
        return line


def _status(r: InvokeResult) -> tuple[str, str | None]:
    """Lambda's ``status`` and ``errorType`` of a report."""
    if r.error is None:
        return "success", None
    if r.error == "Timeout":
        return "timeout", None
    return "error", ("Runtime.OutOfMemory" if r.error == "OutOfMemory" else None)
