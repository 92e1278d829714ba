"""The durable queue of asynchronous invocations: a protocol, its backends and a fake."""

from nimbus.queue.base import (
    FINISHED,
    LEASE_EXPIRED,
    STATUSES,
    Attempt,
    Invocation,
    Lease,
    Queue,
    Status,
    backoff,
)
from nimbus.queue.memory import MemoryQueue
from nimbus.queue.sqlite import SqliteQueue

__all__ = [
    "FINISHED",
    "LEASE_EXPIRED",
    "STATUSES",
    "Attempt",
    "Invocation",
    "Lease",
    "MemoryQueue",
    "Queue",
    "SqliteQueue",
    "Status",
    "backoff",
]
