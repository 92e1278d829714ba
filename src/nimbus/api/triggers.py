"""``/v1/functions/{name}/triggers``: list, add and remove a function's triggers.

Triggers are part of the function's spec, so adding or removing one publishes a
new version (through :meth:`Functions.update`, like ``PUT /v1/functions/{name}``
with a new ``triggers`` list); the runner picks it up at once. Listing adds what
only the runner knows: each trigger's next and last fire times.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from nimbus.errors import InvalidParameterValue, ResourceConflict, ResourceNotFound
from nimbus.functions import Functions
from nimbus.triggers.runner import ScheduleRunner
from nimbus.triggers.schedule import parse_schedule

#: The request body of ``POST .../triggers`` in the OpenAPI document (parsed by hand, so
#: that a bad trigger gets parse_schedule's message rather than a generic one).
_TRIGGER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["schedule"],
                    "properties": {
                        "type": {"type": "string", "enum": ["schedule"]},
                        "schedule": {"type": "string", "example": "rate(5 minutes)"},
                        "timezone": {"type": "string", "default": "UTC"},
                        "payload": {"description": "any JSON; the event's detail"},
                        "overlap": {"type": "string", "enum": ["allow", "forbid", "replace"]},
                        "catch_up": {"type": "string", "enum": ["none", "once"]},
                        "name": {"type": "string"},
                    },
                    "additionalProperties": False,
                }
            }
        },
    }
}


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _view(trigger: dict[str, Any]) -> dict[str, Any]:
    return {
        **trigger,
        "next_fire": _iso(trigger["next_fire"]),
        "last_fire": _iso(trigger["last_fire"]),
    }


def _json(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content), status_code, media_type="application/json")


def triggers_router(functions: Functions, runner: ScheduleRunner) -> APIRouter:
    router = APIRouter(tags=["triggers"])
    # Add and remove read the current list and publish a new one: one at a time, so
    # two concurrent changes cannot lose each other's trigger.
    lock = asyncio.Lock()

    @router.get("/v1/functions/{name}/triggers")
    async def list_triggers(name: str) -> Any:
        version = functions.current(name)
        return _json({"triggers": [_view(t) for t in runner.describe(version)]})

    @router.post("/v1/functions/{name}/triggers", status_code=201, openapi_extra=_TRIGGER_BODY)
    async def add_trigger(name: str, request: Request) -> Any:
        """Body: one trigger, as in ``nimbus.yaml`` (``type`` defaults to ``schedule``)."""
        functions.current(name)  # 404 before looking at the body
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError as e:
            raise InvalidParameterValue(f"the trigger must be JSON ({e})") from None
        if not isinstance(body, dict):
            raise InvalidParameterValue("the trigger must be a JSON object")
        kind = body.get("type", "schedule")
        if kind != "schedule":
            raise InvalidParameterValue(
                f"trigger.type: unknown trigger type {kind!r} (supported: schedule)"
            )
        spec = parse_schedule(body)
        async with lock:
            existing = [dict(t) for t in functions.current(name).spec.triggers]
            names = {str(t.get("name")) for t in existing}
            trigger = spec.name or _free_name(names, len(existing))
            if trigger in names:
                raise ResourceConflict(f"function {name!r} already has a trigger {trigger!r}")
            new = {**spec.as_dict(), "name": trigger}
            record = await functions.update(name, {"triggers": [*existing, new]}, None)
        added = [t for t in runner.describe(record.current) if t["name"] == trigger]
        return _json(
            {"function": name, "version": record.current.number, "trigger": _view(added[0])},
            201,
        )

    @router.delete("/v1/functions/{name}/triggers/{trigger}")
    async def remove_trigger(name: str, trigger: str) -> Any:
        async with lock:
            existing = [dict(t) for t in functions.current(name).spec.triggers]
            remaining = [t for t in existing if t.get("name") != trigger]
            if len(remaining) == len(existing):
                raise ResourceNotFound(f"function {name!r} has no trigger {trigger!r}")
            record = await functions.update(name, {"triggers": remaining}, None)
        return _json({"function": name, "version": record.current.number, "removed": trigger})

    return router


def _free_name(taken: set[str], start: int) -> str:
    """The default name of a new trigger: ``schedule-<index>``, or the next free one."""
    index = start
    while f"schedule-{index}" in taken:
        index += 1
    return f"schedule-{index}"
