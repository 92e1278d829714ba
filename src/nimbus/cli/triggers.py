"""``nimbus triggers list|add|remove``: a function's event sources.

Adding or removing a trigger publishes a new version of the function (the API
does it: ``/v1/functions/{name}/triggers``, docs/api.md). A trigger is checked
here first, so a bad schedule fails before anything is sent.
"""

from __future__ import annotations

import json
import os
from enum import Enum
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import quote

import typer

from nimbus.cli.common import CliError, age, listing, open_client, parse_time, print_table
from nimbus.errors import InvalidParameterValue

if TYPE_CHECKING:
    from nimbus.cli.client import Client

app = typer.Typer(
    help="A function's triggers: schedules, NATS, Redis, MQTT, AMQP, files.", no_args_is_help=True
)


class Overlap(Enum):
    allow = "allow"
    forbid = "forbid"
    replace = "replace"


class CatchUp(Enum):
    none = "none"
    once = "once"


def _client(ctx: typer.Context) -> Client:
    return open_client(ctx)


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
    """List a function's triggers: schedules with their next and last runs, message and
    file triggers with their state (connected / reconnecting / error) and counters."""
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
    table = listing("NAME", "TYPE", "SOURCE", "STATE", "DETAIL")
    for t in triggers:
        table.add_row(str(t.get("name", "?")), str(t.get("type", "?")), *_columns(t))
    print_table(table)


def _columns(t: dict[str, Any]) -> tuple[str, str, str]:
    """SOURCE, STATE and DETAIL of one trigger."""
    if t.get("type") == "schedule":
        source = f"{t.get('schedule', '?')} ({t.get('timezone', 'UTC')})"
        last = age(t.get("last_fire")) if t.get("last_fire") else "never"
        detail = f"last run {last}; overlap {t.get('overlap', '?')}, catch-up {t.get('catch_up')}"
        return source, f"next {_in(t.get('next_fire'))}", detail
    what = {
        "nats": lambda: (
            str(t.get("subject")) + (f" (stream {t['stream']})" if t.get("stream") else "")
        ),
        "redis": lambda: f"stream {t.get('stream')}",
        "mqtt": lambda: f"topic {t.get('topic')}",
        "amqp": lambda: f"queue {t.get('queue')}",
        "files": lambda: str(t.get("path")),
    }.get(str(t.get("type")), lambda: "?")()
    url = t.get("url") or t.get("url_in_use")
    source = f"{url} {what}" if url else what
    raw_status = t.get("status")
    status: dict[str, Any] = raw_status if isinstance(raw_status, dict) else {}
    state_ = str(status.get("state", "?"))
    detail = (
        f"{status.get('succeeded', 0)} ok, {status.get('failed', 0)} failed, "
        f"{status.get('dead_lettered', 0)} dead-lettered, {status.get('in_flight', 0)} in flight"
    )
    if status.get("last_error") and state_ != "connected":
        detail = f"{status['last_error']}; {detail}"
    return source, state_, detail


#: ``--nats SUBJECT`` etc.: the option that names a trigger's type and its main field.
_MAIN_FIELD = {
    "nats": "subject",
    "redis": "stream",
    "mqtt": "topic",
    "amqp": "queue",
    "files": "path",
}


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The function.")],
    schedule: Annotated[
        str | None,
        typer.Option(
            "--schedule",
            "-s",
            help='A cron expression ("*/5 * * * *", "cron(0 12 * * ? *)") or "rate(5 minutes)".',
        ),
    ] = None,
    nats: Annotated[
        str | None, typer.Option("--nats", help="A NATS subject (wildcards * and >).")
    ] = None,
    redis: Annotated[str | None, typer.Option("--redis", help="A Redis stream.")] = None,
    mqtt: Annotated[
        str | None, typer.Option("--mqtt", help="An MQTT topic filter (+ and #).")
    ] = None,
    amqp: Annotated[str | None, typer.Option("--amqp", help="An AMQP (RabbitMQ) queue.")] = None,
    files: Annotated[
        str | None, typer.Option("--files", help="A directory on the node to watch.")
    ] = None,
    url: Annotated[
        str | None, typer.Option("--url", help="The broker's URL (default: the server's).")
    ] = None,
    settings: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="Any other field of the trigger, KEY=VALUE (VALUE read as JSON when it "
            "parses: --set stream=ORDERS --set batch_size=10). Repeatable.",
            metavar="KEY=VALUE",
        ),
    ] = None,
    trigger: Annotated[
        str | None,
        typer.Option("--name", "-n", help="The trigger's name (default: <type>-<index>)."),
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
    """Add a trigger: a schedule, or a NATS, Redis, MQTT, AMQP or file source (publishes
    a new version of the function)."""
    chosen = {
        kind: value
        for kind, value in (
            ("schedule", schedule),
            ("nats", nats),
            ("redis", redis),
            ("mqtt", mqtt),
            ("amqp", amqp),
            ("files", files),
        )
        if value is not None
    }
    if len(chosen) != 1:
        raise CliError(
            "name exactly one source: --schedule, --nats, --redis, --mqtt, --amqp or --files"
        )
    kind, value = next(iter(chosen.items()))
    if kind == "schedule":
        data = _schedule(value, timezone, payload, overlap, catch_up)
    else:
        data = {"type": kind, _MAIN_FIELD[kind]: value}
        if kind == "files":
            data["path"] = os.path.abspath(value)
        if url is not None:
            data["url"] = url
    data.update(_settings(settings or []))
    if trigger is not None:
        data["name"] = trigger
    _check(data)
    body = _call(ctx, "POST", _path(name), json=data)
    added = body.get("trigger")
    if not isinstance(added, dict):
        added = {}
    after = (
        f"next run {_in(added.get('next_fire'))}"
        if kind == "schedule"
        else "see its state with: nimbus triggers list " + name
    )
    typer.echo(
        f"Added trigger {added.get('name', trigger or '?')} to {name} "
        f"(version {body.get('version', '?')}); {after}"
    )


def _schedule(
    schedule: str, timezone: str, payload: str | None, overlap: Overlap, catch_up: CatchUp
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "type": "schedule",
        "schedule": schedule,
        "timezone": timezone,
        "overlap": overlap.value,
        "catch_up": catch_up.value,
    }
    if payload is not None:
        try:
            data["payload"] = json.loads(payload)
        except json.JSONDecodeError as e:
            raise CliError(
                f"--payload is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
            ) from None
    return data


def _settings(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise CliError(f"--set {pair!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def _check(data: dict[str, Any]) -> None:
    """Refuse a bad trigger here, before anything is sent."""
    from nimbus.triggers.schedule import parse_schedule
    from nimbus.triggers.specs import parse_event_trigger

    try:
        if data["type"] == "schedule":
            parse_schedule(data)
        else:
            parse_event_trigger(data)
    except InvalidParameterValue as e:
        raise CliError(e.message) from None


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
