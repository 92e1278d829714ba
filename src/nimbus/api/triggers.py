"""``/v1/functions/{name}/triggers``: list, add and remove a function's triggers.

Triggers are part of the function's spec, so adding or removing one publishes a
new version (through :meth:`Functions.update`, like ``PUT /v1/functions/{name}``
with a new ``triggers`` list); the runners pick it up at once. Listing adds what
only the runners know: a schedule's next and last fire times, a message or file
trigger's state (connected / reconnecting / error, with the last error) and
counters. Broker URLs are shown without their passwords.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from nimbus.api.scopes import needs
from nimbus.errors import InvalidParameterValue, ResourceConflict, ResourceNotFound
from nimbus.functions import Functions
from nimbus.models import Version
from nimbus.triggers.events import EventTriggers
from nimbus.triggers.runner import ScheduleRunner
from nimbus.triggers.schedule import parse_schedule
from nimbus.triggers.specs import EVENT_TYPES, normalized, parse_event_trigger

#: The request body of ``POST .../triggers`` in the OpenAPI document (parsed by hand, so
#: that a bad trigger gets parse_schedule's message rather than a generic one).
_TRIGGER_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "description": "One trigger as in nimbus.yaml: a schedule, or a nats, "
                    "redis, mqtt, amqp or files trigger (docs/triggers.md lists the fields).",
                    "properties": {
                        "type": {
                            "type": "string",
                            "enum": ["schedule", "nats", "redis", "mqtt", "amqp", "files"],
                            "default": "schedule",
                        },
                        "schedule": {"type": "string", "example": "rate(5 minutes)"},
                        "timezone": {"type": "string", "default": "UTC"},
                        "payload": {"description": "any JSON; the event's detail"},
                        "overlap": {"type": "string", "enum": ["allow", "forbid", "replace"]},
                        "catch_up": {"type": "string", "enum": ["none", "once"]},
                        "name": {"type": "string"},
                    },
                    "additionalProperties": True,
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


def _describe(runner: ScheduleRunner, events: EventTriggers, version: Version) -> list[Any]:
    """Every trigger of the version, in spec order."""
    shown = {t["name"]: _view(t) for t in runner.describe(version)}
    shown.update({t["name"]: t for t in events.describe(version)})
    return [shown[t["name"]] for t in version.spec.triggers if t["name"] in shown]


def triggers_router(
    functions: Functions, runner: ScheduleRunner, events: EventTriggers
) -> APIRouter:
    router = APIRouter(tags=["triggers"])
    # Add and remove read the current list and publish a new one: one at a time, so
    # two concurrent changes cannot lose each other's trigger.
    lock = asyncio.Lock()

    @router.get("/v1/functions/{name}/triggers", dependencies=[needs("read")])
    async def list_triggers(name: str) -> Any:
        version = functions.current(name)
        return _json({"triggers": _describe(runner, events, version)})

    @router.post(
        "/v1/functions/{name}/triggers",
        status_code=201,
        openapi_extra=_TRIGGER_BODY,
        dependencies=[needs("deploy")],
    )
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
        if kind != "schedule" and kind not in EVENT_TYPES:
            raise InvalidParameterValue(
                f"trigger.type: unknown trigger type {kind!r} "
                f"(supported: schedule, {', '.join(EVENT_TYPES)})"
            )
        given: str | None
        if kind == "schedule":
            schedule = parse_schedule(body)
            given, fields = schedule.name, schedule.as_dict()
        else:
            event = parse_event_trigger(body)
            given, fields = event.name, normalized(event, "")
        async with lock:
            existing = [dict(t) for t in functions.current(name).spec.triggers]
            names = {str(t.get("name")) for t in existing}
            trigger = given or _free_name(names, kind, len(existing))
            if trigger in names:
                raise ResourceConflict(f"function {name!r} already has a trigger {trigger!r}")
            new = {**fields, "name": trigger}
            record = await functions.update(name, {"triggers": [*existing, new]}, None)
        added = [t for t in _describe(runner, events, record.current) if t["name"] == trigger]
        return _json({"function": name, "version": record.current.number, "trigger": added[0]}, 201)

    @router.delete("/v1/functions/{name}/triggers/{trigger}", dependencies=[needs("deploy")])
    async def remove_trigger(name: str, trigger: str) -> Any:
        async with lock:
            existing = [dict(t) for t in functions.current(name).spec.triggers]
            remaining = [t for t in existing if t.get("name") != trigger]
            if len(remaining) == len(existing):
                raise ResourceNotFound(f"function {name!r} has no trigger {trigger!r}")
            record = await functions.update(name, {"triggers": remaining}, None)
        return _json({"function": name, "version": record.current.number, "removed": trigger})

    return router


def _free_name(taken: set[str], kind: str, start: int) -> str:
    """The default name of a new trigger: ``<type>-<index>``, or the next free one."""
    index = start
    while f"{kind}-{index}" in taken:
        index += 1
    return f"{kind}-{index}"
