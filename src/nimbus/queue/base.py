"""The ``Queue`` protocol for asynchronous invocations, its messages, and ``backoff``.

Kept narrow so that the embedded SQLite queue and a NATS JetStream queue (cluster
mode) can be siblings behind it: no SQL in the surface, and the queue never reads
the clock — every operation that depends on time takes ``now`` (epoch seconds), so
the logic above it is tested with a synthetic clock.

Life of an invocation::

    submit ─► queued ──lease──► running ──succeed──► succeeded
                ▲                 │  │
                └────retry────────┘  └──fail──► failed | dead-lettered
                │
                └──cancel──► cancelled          (only while queued)

Delivery is at-least-once: a ``running`` invocation whose lease expired (its
worker crashed, or the whole process did) is delivered again by ``lease``, after
recording the lost attempt with the outcome ``"LeaseExpired"``. Every delivery
carries a fresh token; ``succeed``/``retry``/``fail`` with a token that is no
longer current do nothing and return ``None``, so a stale worker can never
overwrite a newer state.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Literal, Protocol

Status = Literal["queued", "running", "succeeded", "failed", "dead-lettered", "cancelled"]

STATUSES: tuple[Status, ...] = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "dead-lettered",
    "cancelled",
)

#: States an invocation never leaves; ``purge`` only deletes these.
FINISHED: frozenset[Status] = frozenset({"succeeded", "failed", "dead-lettered", "cancelled"})

#: The outcome recorded for an attempt whose lease ran out before it finished.
LEASE_EXPIRED = "LeaseExpired"

#: The outcome recorded for a successful attempt.
SUCCEEDED = "succeeded"


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery of an invocation to a worker."""

    number: int
    """1-based."""
    started_at: float
    ended_at: float | None
    outcome: str | None
    """``"succeeded"``, ``"Unhandled"``, ``"Timeout"``, ``"Crash"``, ``"Init"``,
    ``"OutOfMemory"``, ``"Throttled"``, ``"ServiceError"``, ``"LeaseExpired"``;
    ``None`` while the attempt runs."""
    request_id: str
    """The invoke request id of this attempt, assigned by ``lease`` (its logs carry it)."""
    error: bytes | None
    """Lambda's error JSON when the attempt failed."""


@dataclass(frozen=True, slots=True)
class Invocation:
    """A snapshot of an asynchronous invocation."""

    id: str
    """A uuid4 string, assigned by ``submit``."""
    function: str
    payload: bytes
    status: Status
    created_at: float
    updated_at: float
    attempts: tuple[Attempt, ...]
    function_errors: int
    """Attempts that failed because of the function (counted against ``max_retries``)."""
    not_before: float
    """The earliest time it may be delivered (``submit`` time, then the retry backoff)."""
    result: bytes | None
    """The success body."""
    error: bytes | None
    """The last error body (cleared when an attempt succeeds)."""
    idempotency_key: str | None
    source: str
    """``"api"``, ``"gateway"``, ``"schedule:<trigger>"``, …"""
    headers: dict[str, str]
    """Small metadata only, e.g. ``{"x-callback-url": ...}``."""


@dataclass(frozen=True, slots=True)
class Lease:
    """The right to run one attempt of an invocation until ``expires_at``."""

    invocation: Invocation
    token: str
    """Identifies this delivery; ``succeed``/``retry``/``fail`` must present it."""
    attempt: int
    expires_at: float

    @property
    def request_id(self) -> str:
        """The request id to invoke this attempt with (so its logs can be found)."""
        return self.invocation.attempts[self.attempt - 1].request_id


class Queue(Protocol):
    """A durable queue of asynchronous invocations. All times are epoch seconds."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

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
        """Store a new queued invocation durably before returning ``(invocation, True)``.

        If ``idempotency_key`` was submitted for the same function less than
        ``retention`` seconds ago (the window is fixed by that first submission),
        store nothing and return ``(first invocation, False)``.
        """
        ...

    async def lease(
        self,
        *,
        now: float,
        lease_for: Callable[[str], float] | float,
        limit: int = 1,
        functions: Collection[str] | None = None,
        exclude: Collection[str] = (),
    ) -> list[Lease]:
        """Deliver up to ``limit`` due invocations, longest-due first, marked running.

        Due means queued with ``not_before <= now``, or running with an expired
        lease (that attempt is closed as ``"LeaseExpired"`` and a new one starts).
        ``lease_for`` is the lease length in seconds, or a function of the
        function name returning it; it may be called on the queue's own thread,
        so it must be cheap and pure. ``functions`` restricts delivery to those
        functions; ``exclude`` skips functions (for per-function concurrency caps).
        """
        ...

    async def succeed(self, lease: Lease, result: bytes, *, now: float) -> Invocation | None:
        """Finish the attempt and the invocation as succeeded; ``None`` if the token is stale."""
        ...

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
        """Finish the attempt as failed and queue the invocation again from ``not_before``.

        ``function_error=True`` counts the attempt in ``function_errors``.
        ``None`` if the token is stale.
        """
        ...

    async def fail(
        self,
        lease: Lease,
        *,
        now: float,
        outcome: str,
        error: bytes | None,
        dead_letter: bool,
    ) -> Invocation | None:
        """Finish the attempt and the invocation: ``dead-lettered`` or ``failed``.

        ``None`` if the token is stale.
        """
        ...

    async def cancel(self, invocation_id: str, *, now: float) -> Invocation:
        """Cancel a queued invocation.

        ``ResourceNotFound`` for an unknown id, ``ResourceConflict`` if it is not queued.
        """
        ...

    async def get(self, invocation_id: str) -> Invocation:
        """One invocation (``ResourceNotFound`` if unknown)."""
        ...

    async def list(
        self,
        *,
        function: str | None = None,
        status: Status | None = None,
        limit: int = 100,
        before: float | None = None,
    ) -> list[Invocation]:
        """Invocations newest first; ``before`` keeps those created strictly before it."""
        ...

    async def stats(self, *, now: float) -> dict[str, dict[str, int]]:
        """Per function that has invocations: a count for every status, plus
        ``"due"`` (queued and deliverable at ``now``) and ``"lease_expired"``
        (running, lease expired at ``now``: to be redelivered)."""
        ...

    async def purge(self, *, older_than: float) -> int:
        """Delete finished invocations last updated before ``older_than``; return how many.

        Their idempotency keys go with them, except that an invocation whose
        idempotency window is still open at ``older_than`` is kept, so that
        deduplication never breaks inside its window.
        """
        ...

    async def delete_function(self, function: str) -> None:
        """Drop every invocation of a function, whatever its state (leases become stale)."""
        ...


def backoff(
    attempt: int,
    *,
    base: float = 1.0,
    factor: float = 2.0,
    cap: float = 300.0,
    jitter: float = 0.1,
    rand: Callable[[], float] = random.random,
) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based).

    ``base * factor ** (attempt - 1)``, capped at ``cap``, then spread by up to
    ``± jitter`` of itself (``rand()`` in [0, 1) picks where) so that a burst of
    failures does not come back as a burst; never above ``cap``, never below 0.
    """
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    try:
        delay = min(cap, base * factor ** (attempt - 1))
    except OverflowError:
        delay = cap
    delay *= 1.0 + jitter * (2.0 * rand() - 1.0)
    return max(0.0, min(cap, delay))
