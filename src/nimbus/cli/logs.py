"""``nimbus logs``: print a function's log records, or follow them as they arrive."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import typer

from nimbus.cli.common import open_client


def logs(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The function whose logs to print.")],
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new records until Ctrl-C.")
    ] = False,
    since: Annotated[
        str | None,
        typer.Option(
            "--since",
            help="Only records since: 30s, 10m, 2h, 1d, an ISO 8601 time or epoch seconds.",
            show_default=False,
        ),
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            "-n",
            min=1,
            max=10000,
            help="At most this many of the latest records (server default: 1000).",
            show_default=False,
        ),
    ] = None,
    timestamps: Annotated[
        bool, typer.Option("--timestamps", "-t", help="Prefix each line with its time.")
    ] = False,
) -> None:
    """Print a function's logs: START, its own output, END and REPORT lines."""
    with open_client(ctx) as client:
        if not follow:
            body = client.logs(name, since=since, limit=limit)
            records = body.get("records")
            for record in records if isinstance(records, list) else []:
                _print(record, timestamps=timestamps)
            return
        stream = client.follow_logs(name, since=since, limit=limit)
        try:
            for record in stream:
                _print(record, timestamps=timestamps)
        except KeyboardInterrupt:
            return  # Ctrl-C is how one stops following: not an error
        finally:
            stream.close()


def _print(record: Any, *, timestamps: bool) -> None:
    if not isinstance(record, dict):
        return
    # One record can hold several lines (a traceback), joined by "\r" as Lambda's runtime
    # does; a terminal would draw them over each other.
    message = str(record.get("message", "")).rstrip("\r\n").replace("\r", "\n")
    if timestamps:
        # click strips the style when stdout is not a terminal.
        message = typer.style(_time(record.get("time")), dim=True) + " " + message
    typer.echo(message)


def _time(value: object) -> str:
    if isinstance(value, int | float):
        try:
            return datetime.fromtimestamp(value).isoformat(sep=" ", timespec="milliseconds")
        except (ValueError, OverflowError, OSError):
            pass
    return str(value)
