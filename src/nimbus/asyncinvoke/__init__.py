"""Asynchronous invocations: accept durably, run at least once, retry, dead-letter.

The gateway's ``/async-function/…``, the API's ``X-Nimbus-Invocation-Type: Event``,
schedule triggers and destinations all call :meth:`AsyncInvoker.submit`, which
returns once the invocation is in the durable :class:`~nimbus.queue.Queue`. A
dispatcher task leases due invocations and runs each in a worker task through the
one :class:`~nimbus.invoke.Invoker`, like any synchronous call.

How much async work runs at once is bounded twice: per function by
``async.max_concurrency`` (default: half of ``scaling.max``), so that a burst of
events leaves instances to synchronous callers; and per node by
``max_concurrency``. The dispatcher leases for each function only up to its
remaining room (``Queue.lease(functions=[name], limit=room)``), so what waits
stays ``queued`` — and cancellable.

What happens after an attempt is :func:`decide`, a pure function of the outcome,
the invocation's history, the function's :class:`~nimbus.models.AsyncSpec` and
the time:

================================  ==========================================================
outcome                           then
================================  ==========================================================
succeeded                         ``succeed``; ``on_success``; ``X-Callback-Url``
function error (Unhandled,        retry after ``backoff`` while ``function_errors`` ≤
Timeout, Crash, Init, OOM)        ``max_retries``; then dead-letter (``RetriesExhausted``)
throttled, platform error         retry after ``backoff`` (not counted against
                                  ``max_retries``) until ``max_event_age`` runs out
function deleted                  ``failed``, no destinations
older than ``max_event_age``      dead-lettered without running (``EventAgeExceeded``)
================================  ==========================================================

A retry whose backoff would end after ``max_event_age`` dead-letters at once.
Dead-lettering sends Lambda's destination record to ``on_failure`` and
``dead_letter`` and calls the ``X-Callback-Url``.

Delivery guarantees. Invocations: at least once (a crashed node's leases expire
and are delivered again). ``function:`` destinations are submitted *before* the
outcome is committed, with an idempotency key derived from the invocation, so
they survive a crash and are not duplicated by a redelivery within the
retention window. HTTP destinations and callbacks are POSTed after the commit,
with a few retries: at most once across a crash.

Modules: :mod:`~nimbus.asyncinvoke.decisions` (pure: the decision, destination
records, caps, header checks), :mod:`~nimbus.asyncinvoke.delivery` (background
POSTs), :mod:`~nimbus.asyncinvoke.invoker` (:class:`AsyncInvoker`: submit, the
dispatcher and its workers).
"""

from nimbus.asyncinvoke.decisions import (
    AGE_EXCEEDED,
    FUNCTION_ERRORS,
    Condition,
    Decision,
    GiveUp,
    Retry,
    Succeed,
    check_callback_url,
    check_idempotency_key,
    decide,
    destination_record,
    expired,
    function_cap,
    iso_time,
    json_value,
    lease_length,
)
from nimbus.asyncinvoke.invoker import AsyncInvoker

__all__ = [
    "AGE_EXCEEDED",
    "FUNCTION_ERRORS",
    "AsyncInvoker",
    "Condition",
    "Decision",
    "GiveUp",
    "Retry",
    "Succeed",
    "check_callback_url",
    "check_idempotency_key",
    "decide",
    "destination_record",
    "expired",
    "function_cap",
    "iso_time",
    "json_value",
    "lease_length",
]
