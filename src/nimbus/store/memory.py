"""``MemoryStore``: the ``FunctionStore`` protocol in plain dicts, for unit tests.

Same semantics as :class:`nimbus.store.sqlite.SqliteStore`, no durability: a
test that "restarts" keeps the same ``MemoryStore`` object. Not for production.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from nimbus.errors import ResourceConflict, ResourceNotFound
from nimbus.models import FunctionRecord, FunctionSpec, TriggerState, Version
from nimbus.store.sqlite import FIRST_UID


class MemoryStore:
    """An in-memory ``FunctionStore``; ``clock`` stamps published versions."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._functions: dict[str, tuple[float, int]] = {}  # name -> (created_at, uid)
        self._versions: dict[str, list[Version]] = {}
        self._triggers: dict[tuple[str, str], TriggerState] = {}
        self._next_uid = FIRST_UID

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def load(self) -> list[FunctionRecord]:
        return [
            FunctionRecord(name, self._functions[name][0], self._versions[name][-1])
            for name in sorted(self._functions)
        ]

    async def reserve_uid(self) -> int:
        uid = self._next_uid
        self._next_uid += 1
        return uid

    async def publish(
        self,
        spec: FunctionSpec,
        code_sha256: str,
        layer_sha256: str | None,
        *,
        create: bool,
        uid: int | None = None,
    ) -> FunctionRecord:
        now = self._clock()
        exists = spec.name in self._functions
        if create and exists:
            raise ResourceConflict(f"function {spec.name!r} already exists")
        if not create and not exists:
            raise ResourceNotFound(f"function {spec.name!r} does not exist")
        if not exists:
            self._functions[spec.name] = (now, uid if uid is not None else await self.reserve_uid())
            self._versions[spec.name] = []
        created_at, uid = self._functions[spec.name]
        number = len(self._versions[spec.name]) + 1
        version = Version(spec, number, code_sha256, layer_sha256, now, uid)
        self._versions[spec.name].append(version)
        return FunctionRecord(spec.name, created_at, version)

    async def versions(self, name: str) -> list[Version]:
        if name not in self._versions:
            raise ResourceNotFound(f"function {name!r} does not exist")
        return list(self._versions[name])

    async def referenced(self) -> set[str]:
        return {
            h
            for versions in self._versions.values()
            for v in versions
            for h in (v.code_sha256, v.layer_sha256)
            if h
        }

    async def delete(self, name: str) -> None:
        if name not in self._functions:
            raise ResourceNotFound(f"function {name!r} does not exist")
        del self._functions[name]
        del self._versions[name]
        for key in [k for k in self._triggers if k[0] == name]:
            del self._triggers[key]

    async def trigger_states(self) -> dict[tuple[str, str], TriggerState]:
        return dict(self._triggers)

    async def save_trigger_state(
        self,
        function: str,
        name: str,
        *,
        created_at: float,
        last_fire: float | None,
        fingerprint: str = "",
    ) -> None:
        if function in self._functions:
            self._triggers[function, name] = TriggerState(
                function, name, created_at, last_fire, fingerprint
            )

    async def delete_trigger_state(self, function: str, name: str) -> None:
        self._triggers.pop((function, name), None)
