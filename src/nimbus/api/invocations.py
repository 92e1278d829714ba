"""``/v1/invocations``: asynchronous invocations — status, attempts, logs, results, cancel.

Submitting is not here: it is ``POST /v1/functions/{name}/invoke`` with
``X-Nimbus-Invocation-Type: Event`` (:mod:`nimbus.api.app`) or OpenFaaS's
``/async-function/{name}`` (:mod:`nimbus.gateway.asyncapp`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from fastapi import APIRouter, Query

from nimbus.api.scopes import needs
from nimbus.asyncinvoke import FUNCTION_ERRORS, AsyncInvoker, iso_time, json_value
from nimbus.errors import InvalidParameterValue
from nimbus.observability.logs import LogRecord
from nimbus.queue import STATUSES, Invocation

#: ``X-Nimbus-Invocation-Type`` (or Lambda's ``X-Amz-Invocation-Type``) values.
INVOCATION_TYPES = ("RequestResponse", "Event", "DryRun")


def invocation_type(headers: Mapping[str, str]) -> str:
    """How the caller wants ``/invoke`` to run: ``RequestResponse`` (default), ``Event``
    (asynchronous, 202) or ``DryRun`` (checks only, 204)."""
    value = headers.get("x-nimbus-invocation-type") or headers.get("x-amz-invocation-type")
    if value is None or value == "":
        return "RequestResponse"
    for kind in INVOCATION_TYPES:
        if value.lower() == kind.lower():
            return kind
    raise InvalidParameterValue(
        f"X-Nimbus-Invocation-Type must be one of {', '.join(INVOCATION_TYPES)} (got {value!r})"
    )


def invocation_out(
    invocation: Invocation, logs: dict[str, list[LogRecord]] | None = None
) -> dict[str, Any]:
    """The invocation object of docs/api.md (attempts' ``logs`` only when given)."""
    attempts = []
    for a in invocation.attempts:
        attempt: dict[str, Any] = {
            "number": a.number,
            "started_at": iso_time(a.started_at),
            "ended_at": iso_time(a.ended_at) if a.ended_at is not None else None,
            "outcome": a.outcome,
            "request_id": a.request_id,
            "error": json_value(a.error),
        }
        if logs is not None:
            attempt["logs"] = [r.to_wire() for r in logs.get(a.request_id, [])]
        attempts.append(attempt)
    out: dict[str, Any] = {
        "id": invocation.id,
        "function": invocation.function,
        "status": invocation.status,
        "source": invocation.source,
        "created_at": iso_time(invocation.created_at),
        "updated_at": iso_time(invocation.updated_at),
        "attempts": attempts,
        # Counted from the attempts: the queue's own counter leaves out the last one
        # when it fails the invocation rather than retrying it.
        "function_errors": sum(1 for a in invocation.attempts if a.outcome in FUNCTION_ERRORS),
        "result": json_value(invocation.result),
        "error": json_value(invocation.error),
        "idempotency_key": invocation.idempotency_key,
    }
    if invocation.status == "queued":
        out["next_attempt_at"] = iso_time(invocation.not_before)
    return out


def invocation_summary(invocation: Invocation) -> dict[str, Any]:
    """A list entry: no attempts, result or error (``GET /v1/invocations/{id}`` has them)."""
    last = invocation.attempts[-1] if invocation.attempts else None
    return {
        "id": invocation.id,
        "function": invocation.function,
        "status": invocation.status,
        "source": invocation.source,
        "created_at": iso_time(invocation.created_at),
        "updated_at": iso_time(invocation.updated_at),
        "attempt_count": len(invocation.attempts),
        "last_outcome": last.outcome if last is not None else None,
    }


def invocations_router(async_invoker: AsyncInvoker) -> APIRouter:
    router = APIRouter(tags=["invocations"])

    @router.get("/v1/invocations", dependencies=[needs("read")])
    async def list_invocations(
        function: str | None = None,
        status: str | None = None,
        limit: Annotated[int, Query(ge=1, le=10000)] = 100,
    ) -> Any:
        if status is not None and status not in STATUSES:
            raise InvalidParameterValue(
                f"status must be one of {', '.join(STATUSES)} (got {status!r})"
            )
        found = await async_invoker.list_invocations(function=function, status=status, limit=limit)
        return {"invocations": [invocation_summary(i) for i in found]}

    @router.get("/v1/invocations/{invocation_id}", dependencies=[needs("invoke", "read")])
    async def get_invocation(invocation_id: str) -> Any:
        invocation = await async_invoker.get(invocation_id)
        return invocation_out(invocation, await async_invoker.attempt_logs(invocation))

    @router.delete("/v1/invocations/{invocation_id}", dependencies=[needs("invoke", "deploy")])
    async def cancel_invocation(invocation_id: str) -> Any:
        return invocation_out(await async_invoker.cancel(invocation_id))

    return router
