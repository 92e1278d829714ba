"""``nimbus triggers list|add|remove``: a function's event sources.

Adding or removing a trigger publishes a new version of the function (the API
does it: ``/v1/functions/{name}/triggers``, docs/api.md). A trigger is checked
here first, so a bad schedule fails before anything is sent.
"""

from __future__ import annotations

import json
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer

from nimbus.cli.common import CliError, age, listing, parse_time, print_table, state
from nimbus.errors import InvalidParameterValue

if TYPE_CHECKING:
    from nimbus.cli.client import Client

app = typer.Typer(help="A function's triggers (schedules, …).", no_args_is_help=True)


class Overlap(Enum):
    allow = "allow"
    forbid = "forbid"
    replace = "replace"


class CatchUp(Enum):
    none = "none"
    once = "once"


def _client(ctx: typer.Context) -> Client:
    from nimbus.cli.client import Client

    st = state(ctx)
    return Client(st.url, transport=st.transport)


def _path(name: str, trigger: str | None = None) -> str:
    path = f"/v1/functions/{quote(name, safe='')}/triggers"
    return path if trigger is None else f"{path}/{quote(trigger, safe='')}"


def _call(ctx: typer.Context, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
    with _client(ctx) as client:
        # The shared client's plumbing: API errors become one-line CliErrors.
        return client._json(client._send(method, path, **kwargs))


@app.command("list")
def list_triggers(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The function.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """List a function's triggers with their next and last fire times."""
    body = _call(ctx, "GET", _path(name))
    triggers = [t for t in body.get("triggers") or [] if isinstance(t, dict)]
    if as_json:
        typer.echo(json.dumps({"triggers": triggers}, indent=2))
        return
    if not triggers:
        typer.echo(
            f"{name} has no triggers. Add one with: "
            f'nimbus triggers add {name} --schedule "rate(5 minutes)"'
        )
        return
    table = listing("NAME", "TYPE", "SCHEDULE", "TIMEZONE", "OVERLAP", "CATCH-UP", "NEXT", "LAST")
    for t in triggers:
        table.add_row(
            str(t.get("name", "?")),
            str(t.get("type", "?")),
            str(t.get("schedule", "?")),
            str(t.get("timezone", "?")),
            str(t.get("overlap", "?")),
            str(t.get("catch_up", "?")),
            _in(t.get("next_fire")),
            age(t.get("last_fire")) if t.get("last_fire") else "never",
        )
    print_table(table)


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The function.")],
    schedule: Annotated[
        str,
        typer.Option(
            "--schedule",
            "-s",
            help='A cron expression ("*/5 * * * *", "cron(0 12 * * ? *)") or "rate(5 minutes)".',
        ),
    ],
    trigger: Annotated[
        str | None,
        typer.Option("--name", "-n", help="The trigger's name (default: schedule-<index>)."),
    ] = None,
    timezone: Annotated[
        str, typer.Option("--timezone", "--tz", help="IANA time zone cron fields are read in.")
    ] = "UTC",
    payload: Annotated[
        str | None,
        typer.Option("--payload", help="JSON sent as the event's detail (default {})."),
    ] = None,
    overlap: Annotated[
        Overlap, typer.Option("--overlap", help="When earlier runs are still going.")
    ] = Overlap.allow,
    catch_up: Annotated[
        CatchUp, typer.Option("--catch-up", help="After downtime: skip missed runs, or run one.")
    ] = CatchUp.none,
) -> None:
    """Add a schedule trigger (publishes a new version of the function)."""
    from nimbus.triggers.schedule import parse_schedule

    data: dict[str, Any] = {
        "type": "schedule",
        "schedule": schedule,
        "timezone": timezone,
        "overlap": overlap.value,
        "catch_up": catch_up.value,
    }
    if trigger is not None:
        data["name"] = trigger
    if payload is not None:
        try:
            data["payload"] = json.loads(payload)
        except json.JSONDecodeError as e:
            raise CliError(
                f"--payload is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
            ) from None
    try:
        parse_schedule(data)
    except InvalidParameterValue as e:
        raise CliError(e.message) from None
    body = _call(ctx, "POST", _path(name), json=data)
    added = body.get("trigger")
    if not isinstance(added, dict):
        added = {}
    typer.echo(
        f"Added trigger {added.get('name', trigger or '?')} to {name} "
        f"(version {body.get('version', '?')}); next run {_in(added.get('next_fire'))}"
    )


@app.command("remove")
def remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The function.")],
    trigger: Annotated[str, typer.Argument(help="The trigger's name.")],
) -> None:
    """Remove a trigger (publishes a new version of the function)."""
    body = _call(ctx, "DELETE", _path(name, trigger))
    typer.echo(f"Removed trigger {trigger} from {name} (version {body.get('version', '?')})")


def _in(value: object) -> str:
    """``"2026-11-27T05:00:00Z (in 4m)"`` for a future API timestamp."""
    from datetime import UTC, datetime

    when = parse_time(value)
    if when is None:
        return str(value) if value not in (None, "") else "-"
    seconds = int((when - datetime.now(UTC)).total_seconds())
    if seconds <= 0:
        return f"{value} (now)"
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{value} (in {seconds // length}{unit})"
    return f"{value} (in {seconds}s)"
