"""The pure half of asynchronous invocations: what to do after an attempt, and what
the destinations receive. No I/O and no clock: everything takes ``now``.

Outcomes are the strings recorded on each :class:`~nimbus.queue.Attempt`.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from nimbus.errors import InvalidParameterValue
from nimbus.models import Account, AsyncSpec, FunctionSpec
from nimbus.outbound import OutboundPolicy, check_url
from nimbus.queue import Invocation, backoff
from nimbus.queue.base import LEASE_EXPIRED, SUCCEEDED

#: Outcomes that are the function's fault: counted against ``max_retries``.
FUNCTION_ERRORS = frozenset({"Unhandled", "Timeout", "Crash", "Init", "OutOfMemory"})
#: The scheduler had no instance in time (429).
THROTTLED = "Throttled"
#: Nimbus failed (a crashed zygote, a full disk, …): retried like throttling.
SERVICE_ERROR = "ServiceError"
#: The function was deleted: the invocation fails, without destinations.
NOT_FOUND = "ResourceNotFound"
#: The event cannot be invoked at all (over the synchronous payload limit).
TOO_LARGE = "RequestTooLarge"
#: Dead-lettered when leased, without running: older than ``max_event_age``.
AGE_EXCEEDED = "EventAgeExceeded"
#: The node shut down while the attempt ran; put back to run again.
INTERRUPTED = "Interrupted"

#: Attempts that never reached the function (for ``approximateInvokeCount``).
NOT_INVOKED = frozenset({THROTTLED, NOT_FOUND, TOO_LARGE, AGE_EXCEEDED})

Condition = Literal["Success", "RetriesExhausted", "EventAgeExceeded"]

#: Leases are this many times the function's timeout (plus the scheduler's queue wait).
LEASE_FACTOR = 6

# ------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Succeed:
    """Record the result; ``on_success`` and the callback follow."""


@dataclass(frozen=True, slots=True)
class Retry:
    """Queue the invocation again from ``not_before``."""

    not_before: float
    function_error: bool


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Finish the invocation: ``dead-lettered`` (with destinations) or ``failed`` (without)."""

    dead_letter: bool
    condition: Condition | None


Decision = Succeed | Retry | GiveUp


def expired(created_at: float, config: AsyncSpec, now: float) -> bool:
    """Whether an event submitted at ``created_at`` is past its ``max_event_age``."""
    return now - created_at >= config.max_event_age


def decide(
    *,
    outcome: str,
    attempt: int,
    function_errors: int,
    created_at: float,
    config: AsyncSpec,
    now: float,
    rand: Callable[[], float] = random.random,
) -> Decision:
    """What to do after attempt number ``attempt`` (1-based) ended with ``outcome``.

    ``function_errors`` counts the *earlier* attempts that failed because of the
    function. The backoff before the next attempt is
    ``backoff(attempt, base, factor, backoff_max)`` whatever the kind of failure.
    """
    if outcome == SUCCEEDED:
        return Succeed()
    if outcome == NOT_FOUND:
        return GiveUp(dead_letter=False, condition=None)
    if outcome == TOO_LARGE:
        return GiveUp(dead_letter=True, condition="RetriesExhausted")
    function_error = outcome in FUNCTION_ERRORS
    if function_error and function_errors + 1 > config.max_retries:
        return GiveUp(dead_letter=True, condition="RetriesExhausted")
    delay = backoff(
        attempt,
        base=config.backoff_base,
        factor=config.backoff_factor,
        cap=config.backoff_max,
        rand=rand,
    )
    if expired(created_at, config, now + delay):
        return GiveUp(dead_letter=True, condition="EventAgeExceeded")
    return Retry(not_before=now + delay, function_error=function_error)


def function_cap(spec: FunctionSpec) -> int:
    """Invocations of this function the async workers may run at once."""
    cap = spec.async_.max_concurrency or max(1, spec.scaling.max // 2)
    return max(1, min(cap, spec.scaling.max))


def lease_length(spec: FunctionSpec, queue_timeout: float) -> float:
    """A lease outlives any attempt: waiting for an instance, its init and its run."""
    return LEASE_FACTOR * spec.timeout + queue_timeout


def iso_time(ts: float) -> str:
    """``2026-11-27T05:00:00.123Z``."""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def function_arn(name: str, account: Account | None = None) -> str:
    return (account or Account()).function_arn(name)


def json_value(data: bytes | None) -> Any:
    """``data`` parsed when it is JSON, else as text (``None`` stays ``None``)."""
    if data is None:
        return None
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return data.decode("utf-8", "replace")


def error_json(error_type: str, message: str) -> bytes:
    """Lambda's error shape, for failures that did not come from the function."""
    return orjson.dumps({"errorType": error_type, "errorMessage": message})


def invoke_count(invocation: Invocation) -> int:
    """Attempts that reached (or may have reached) the function."""
    return sum(1 for a in invocation.attempts if a.outcome not in NOT_INVOKED)


def destination_record(
    invocation: Invocation,
    condition: Condition,
    now: float,
    *,
    invoke_count: int,
    version: int | None,
    outcome: str | None,
    response: bytes | None,
    account: Account | None = None,
) -> dict[str, Any]:
    """Lambda's destination record for an invocation that finished.

    ``outcome`` and ``response`` are those of the last attempt that produced a
    response (``None`` when none ran): they become ``responseContext`` and
    ``responsePayload``.
    """
    record: dict[str, Any] = {
        "version": "1.0",
        "timestamp": iso_time(now),
        "requestContext": {
            "requestId": invocation.id,
            "functionArn": function_arn(invocation.function, account),
            "condition": condition,
            "approximateInvokeCount": invoke_count,
        },
        "requestPayload": json_value(invocation.payload),
    }
    if outcome is not None and response is not None:
        status = {THROTTLED: 429, SERVICE_ERROR: 500}.get(outcome, 200)
        context: dict[str, Any] = {
            "statusCode": status,
            "executedVersion": str(version) if version is not None else "$LATEST",
        }
        if outcome in FUNCTION_ERRORS or outcome == LEASE_EXPIRED:
            context["functionError"] = "Unhandled"
        record["responseContext"] = context
        record["responsePayload"] = json_value(response)
    return record


def trigger_failure_record(
    function: str,
    request_id: str,
    condition: str,
    now: float,
    *,
    payload: bytes,
    invoke_count: int,
    version: int | None,
    response: bytes | None,
    account: Account | None = None,
) -> dict[str, Any]:
    """Lambda's failure record for messages of an event trigger that were given up
    (``RetriesExhausted``, ``RecursiveInvocationDetected``, ...), as an event source
    mapping's on-failure destination gets it."""
    record: dict[str, Any] = {
        "version": "1.0",
        "timestamp": iso_time(now),
        "requestContext": {
            "requestId": request_id,
            "functionArn": function_arn(function, account),
            "condition": condition,
            "approximateInvokeCount": invoke_count,
        },
        "requestPayload": json_value(payload),
    }
    if response is not None:
        record["responseContext"] = {
            "statusCode": 200,
            "executedVersion": str(version) if version is not None else "$LATEST",
            "functionError": "Unhandled",
        }
        record["responsePayload"] = json_value(response)
    return record


#: Longest ``Idempotency-Key`` accepted.
MAX_IDEMPOTENCY_KEY = 256


def check_idempotency_key(key: str | None) -> str | None:
    """The ``Idempotency-Key`` header's value, or ``InvalidParameterValue``."""
    if key is None:
        return None
    if not 1 <= len(key) <= MAX_IDEMPOTENCY_KEY or not key.isprintable() or not key.isascii():
        raise InvalidParameterValue(
            f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} printable ASCII characters"
        )
    return key


def check_callback_url(url: str | None, policy: OutboundPolicy | None = None) -> str | None:
    """The ``X-Callback-Url`` header's value, or ``InvalidParameterValue``: an http(s)
    URL that does not name a refused address (see :mod:`nimbus.outbound`)."""
    if url is None:
        return None
    return check_url(url, "X-Callback-Url", policy)
