"""The ``FunctionStore`` protocol: everything the control plane needs from a database.

Kept narrow so that the embedded SQLite store and the cluster PostgreSQL store
are siblings behind it. Version numbers are assigned by the store, inside its
transaction, so two concurrent publishes can never get the same number.
"""

from __future__ import annotations

from typing import Protocol

from nimbus.models import FunctionRecord, FunctionSpec, TriggerState, Version


class TriggerStateStore(Protocol):
    """Where schedule triggers remember their last fire times (see nimbus.triggers.runner)."""

    async def trigger_states(self) -> dict[tuple[str, str], TriggerState]:
        """Every trigger's state, keyed by ``(function, trigger name)``."""
        ...

    async def save_trigger_state(
        self,
        function: str,
        name: str,
        *,
        created_at: float,
        last_fire: float | None,
        fingerprint: str = "",
    ) -> None:
        """Insert or replace one trigger's state, durably before returning.

        Does nothing if ``function`` does not exist (it was deleted meanwhile).
        """
        ...

    async def delete_trigger_state(self, function: str, name: str) -> None:
        """Forget one trigger's state (the trigger was removed); no error if there is none."""
        ...


class FunctionStore(TriggerStateStore, Protocol):
    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def load(self) -> list[FunctionRecord]:
        """Every function with its latest version."""
        ...

    async def reserve_uid(self) -> int:
        """A sandbox uid never handed out before, for a function about to be created
        (its init runs before the function exists: see ``Functions``)."""
        ...

    async def publish(
        self,
        spec: FunctionSpec,
        code_sha256: str,
        layer_sha256: str | None,
        *,
        create: bool,
        uid: int | None = None,
    ) -> FunctionRecord:
        """Publish a new version of ``spec.name``.

        ``create=True`` makes a new function (``ResourceConflict`` if it exists), with
        ``uid`` when given (from :meth:`reserve_uid`), else a new one; ``create=False``
        adds a version to an existing one (``ResourceNotFound`` if not).
        """
        ...

    async def versions(self, name: str) -> list[Version]:
        """Every version of a function, oldest first (``ResourceNotFound`` if none)."""
        ...

    async def referenced(self) -> set[str]:
        """Every code sha256 and layer key a version of any function names (what the
        code and layer stores must keep)."""
        ...

    async def delete(self, name: str) -> None:
        """Remove a function, all its versions and its triggers' states
        (``ResourceNotFound`` if missing)."""
        ...
