"""``MemoryQueue``: the ``Queue`` protocol in plain dicts, for unit tests of the logic above it.

Same semantics as :class:`nimbus.queue.sqlite.SqliteQueue` (the behavioural tests run
against both), no durability. Not for production: nothing survives the process.
"""

from __future__ import annotations

import builtins
import uuid
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nimbus.errors import ResourceConflict, ResourceNotFound
from nimbus.queue.base import (
    FINISHED,
    LEASE_EXPIRED,
    STATUSES,
    SUCCEEDED,
    Attempt,
    Invocation,
    Lease,
    Queue,
    Status,
)


@dataclass(slots=True)
class _Record:
    seq: int
    id: str
    function: str
    payload: bytes
    status: Status
    created_at: float
    updated_at: float
    not_before: float
    idempotency_key: str | None
    idempotency_expires: float | None
    source: str
    headers: dict[str, str]
    attempts: list[Attempt] = field(default_factory=list)
    function_errors: int = 0
    result: bytes | None = None
    error: bytes | None = None
    lease_token: str | None = None
    lease_expires: float | None = None

    def snapshot(self) -> Invocation:
        return Invocation(
            id=self.id,
            function=self.function,
            payload=self.payload,
            status=self.status,
            created_at=self.created_at,
            updated_at=self.updated_at,
            attempts=tuple(self.attempts),
            function_errors=self.function_errors,
            not_before=self.not_before,
            result=self.result,
            error=self.error,
            idempotency_key=self.idempotency_key,
            source=self.source,
            headers=dict(self.headers),
        )

    def end_attempt(self, ended_at: float, outcome: str, error: bytes | None) -> None:
        last = self.attempts[-1]
        self.attempts[-1] = Attempt(
            last.number, last.started_at, ended_at, outcome, last.request_id, error
        )


class MemoryQueue:
    """An in-memory ``Queue``."""

    def __init__(self) -> None:
        self._records: dict[str, _Record] = {}
        self._seq = 0

    async def open(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def submit(
        self,
        function: str,
        payload: bytes,
        *,
        now: float,
        idempotency_key: str | None = None,
        retention: float = 86400.0,
        source: str = "api",
        headers: dict[str, str] | None = None,
    ) -> tuple[Invocation, bool]:
        if idempotency_key is not None:
            first = self._newest_with_key(function, idempotency_key)
            if first is not None and (first.idempotency_expires or 0.0) > now:
                return first.snapshot(), False
        self._seq += 1
        record = _Record(
            seq=self._seq,
            id=str(uuid.uuid4()),
            function=function,
            payload=payload,
            status="queued",
            created_at=now,
            updated_at=now,
            not_before=now,
            idempotency_key=idempotency_key,
            idempotency_expires=None if idempotency_key is None else now + retention,
            source=source,
            headers=dict(headers or {}),
        )
        self._records[record.id] = record
        return record.snapshot(), True

    def _newest_with_key(self, function: str, key: str) -> _Record | None:
        found = [
            r for r in self._records.values() if r.function == function and r.idempotency_key == key
        ]
        return max(found, key=lambda r: r.seq) if found else None

    async def lease(
        self,
        *,
        now: float,
        lease_for: Callable[[str], float] | float,
        limit: int = 1,
        functions: Collection[str] | None = None,
        exclude: Collection[str] = (),
    ) -> builtins.list[Lease]:
        if limit <= 0:
            return []
        wanted = None if functions is None else set(functions)
        skipped = set(exclude)
        due: list[tuple[float, int, _Record]] = []
        for r in self._records.values():
            if (wanted is not None and r.function not in wanted) or r.function in skipped:
                continue
            if r.status == "queued" and r.not_before <= now:
                due.append((r.not_before, r.seq, r))
            elif r.status == "running" and r.lease_expires is not None and r.lease_expires <= now:
                due.append((r.lease_expires, r.seq, r))
        due.sort(key=lambda d: (d[0], d[1]))
        leases = []
        for _, _, r in due[:limit]:
            if r.status == "running":
                assert r.lease_expires is not None
                r.end_attempt(r.lease_expires, LEASE_EXPIRED, None)
            length = lease_for if isinstance(lease_for, int | float) else lease_for(r.function)
            number = len(r.attempts) + 1
            r.attempts.append(Attempt(number, now, None, None, str(uuid.uuid4()), None))
            r.status = "running"
            r.lease_token = uuid.uuid4().hex
            r.lease_expires = now + length
            r.updated_at = now
            leases.append(Lease(r.snapshot(), r.lease_token, number, r.lease_expires))
        return leases

    def _current(self, lease: Lease) -> _Record | None:
        r = self._records.get(lease.invocation.id)
        if r is None or r.status != "running" or r.lease_token != lease.token:
            return None
        return r

    async def succeed(self, lease: Lease, result: bytes, *, now: float) -> Invocation | None:
        r = self._current(lease)
        if r is None:
            return None
        r.end_attempt(now, SUCCEEDED, None)
        r.status, r.result, r.error = "succeeded", result, None
        r.lease_token = r.lease_expires = None
        r.updated_at = now
        return r.snapshot()

    async def retry(
        self,
        lease: Lease,
        *,
        now: float,
        not_before: float,
        outcome: str,
        error: bytes | None,
        function_error: bool,
    ) -> Invocation | None:
        r = self._current(lease)
        if r is None:
            return None
        r.end_attempt(now, outcome, error)
        r.status, r.error, r.not_before = "queued", error, not_before
        r.function_errors += int(function_error)
        r.lease_token = r.lease_expires = None
        r.updated_at = now
        return r.snapshot()

    async def fail(
        self,
        lease: Lease,
        *,
        now: float,
        outcome: str,
        error: bytes | None,
        dead_letter: bool,
    ) -> Invocation | None:
        r = self._current(lease)
        if r is None:
            return None
        r.end_attempt(now, outcome, error)
        r.status, r.error = ("dead-lettered" if dead_letter else "failed"), error
        r.lease_token = r.lease_expires = None
        r.updated_at = now
        return r.snapshot()

    async def cancel(self, invocation_id: str, *, now: float) -> Invocation:
        r = self._get(invocation_id)
        if r.status != "queued":
            raise ResourceConflict(
                f"invocation {invocation_id} is {r.status}; "
                "only queued invocations can be cancelled"
            )
        r.status, r.updated_at = "cancelled", now
        return r.snapshot()

    def _get(self, invocation_id: str) -> _Record:
        r = self._records.get(invocation_id)
        if r is None:
            raise ResourceNotFound(f"invocation {invocation_id!r} does not exist")
        return r

    async def get(self, invocation_id: str) -> Invocation:
        return self._get(invocation_id).snapshot()

    async def list(
        self,
        *,
        function: str | None = None,
        status: Status | None = None,
        limit: int = 100,
        before: float | None = None,
    ) -> builtins.list[Invocation]:
        found = [
            r
            for r in self._records.values()
            if (function is None or r.function == function)
            and (status is None or r.status == status)
            and (before is None or r.created_at < before)
        ]
        found.sort(key=lambda r: (r.created_at, r.seq), reverse=True)
        return [r.snapshot() for r in found[: max(0, limit)]]

    async def stats(self, *, now: float) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in self._records.values():
            counts = out.setdefault(
                r.function, {**dict.fromkeys(STATUSES, 0), "due": 0, "lease_expired": 0}
            )
            counts[r.status] += 1
            if r.status == "queued" and r.not_before <= now:
                counts["due"] += 1
            if r.status == "running" and r.lease_expires is not None and r.lease_expires <= now:
                counts["lease_expired"] += 1
        return out

    async def purge(self, *, older_than: float) -> int:
        gone = [
            r.id
            for r in self._records.values()
            if r.status in FINISHED
            and r.updated_at < older_than
            and (r.idempotency_expires is None or r.idempotency_expires <= older_than)
        ]
        for invocation_id in gone:
            del self._records[invocation_id]
        return len(gone)

    async def delete_function(self, function: str) -> None:
        for invocation_id in [r.id for r in self._records.values() if r.function == function]:
            del self._records[invocation_id]


if TYPE_CHECKING:

    def _conforms(queue: MemoryQueue) -> Queue:
        return queue
