"""``nimbus invocations get|list|cancel``: asynchronous invocations.

Submitting is ``nimbus invoke NAME --async`` (:mod:`nimbus.cli.functions`); these
commands read what became of it, through ``/v1/invocations`` (docs/api.md).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from nimbus.cli.common import (
    CliError,
    age,
    listing,
    open_client,
    print_table,
    stdout_console,
)

app = typer.Typer(help="Asynchronous invocations: status, results, cancel.", no_args_is_help=True)

#: What ``--status`` accepts (the queue's states).
STATUSES = ("queued", "running", "succeeded", "failed", "dead-lettered", "cancelled")


@app.command("get")
def get(
    ctx: typer.Context,
    invocation_id: Annotated[str, typer.Argument(metavar="ID", help="The invocation id.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Show an invocation: status, each attempt with its logs, the result or error."""
    with open_client(ctx) as client:
        inv = client.get_invocation(invocation_id)
    if as_json:
        typer.echo(json.dumps(inv, indent=2, ensure_ascii=False))
        return
    from rich.table import Table
    from rich.text import Text

    attempts = [a for a in inv.get("attempts") or [] if isinstance(a, dict)]
    rows = [
        ("id", str(inv.get("id", invocation_id))),
        ("function", str(inv.get("function", "?"))),
        ("status", str(inv.get("status", "?"))),
        ("source", str(inv.get("source", "?"))),
        ("created", _when(inv.get("created_at"))),
        ("updated", _when(inv.get("updated_at"))),
        ("attempts", str(len(attempts))),
    ]
    if inv.get("next_attempt_at"):
        rows.append(("next attempt", str(inv["next_attempt_at"])))
    if inv.get("idempotency_key"):
        rows.append(("idempotency key", str(inv["idempotency_key"])))
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        grid.add_row(Text(key), Text(value))
    print_table(grid)

    console = stdout_console()
    for a in attempts:
        outcome = a.get("outcome") or "running"
        console.print(
            f"\nattempt {a.get('number', '?')}: {outcome}  started {a.get('started_at', '?')}"
            f"  request id {a.get('request_id', '?')}",
            markup=False,
            style="bold",
        )
        if a.get("error") is not None and outcome != "succeeded":
            console.print("  " + _error_line(a["error"]), markup=False)
        for record in a.get("logs") or []:
            if isinstance(record, dict):
                console.print("  " + str(record.get("message", "")), markup=False)
    if inv.get("status") == "succeeded":
        console.print("\nresult:", markup=False, style="bold")
        typer.echo(_pretty(inv.get("result")))
    elif inv.get("error") is not None:
        console.print("\nerror:", markup=False, style="bold")
        typer.echo(_pretty(inv.get("error")))


@app.command("list")
def list_invocations(
    ctx: typer.Context,
    function: Annotated[
        str | None, typer.Option("--function", "-f", help="Only this function's.")
    ] = None,
    status: Annotated[
        str | None, typer.Option("--status", "-s", help=f"Only these: {', '.join(STATUSES)}.")
    ] = None,
    limit: Annotated[int, typer.Option("--limit", "-n", help="At most this many (1-10000).")] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """List asynchronous invocations, newest first."""
    if status is not None and status not in STATUSES:
        raise CliError(f"--status must be one of {', '.join(STATUSES)} (got {status!r})")
    if not 1 <= limit <= 10000:
        raise CliError(f"--limit must be between 1 and 10000 (got {limit})")
    with open_client(ctx) as client:
        found = client.list_invocations(function=function, status=status, limit=limit)
    if as_json:
        typer.echo(json.dumps({"invocations": found}, indent=2, ensure_ascii=False))
        return
    if not found:
        typer.echo("No invocations. Queue one with: nimbus invoke NAME --async")
        return
    table = listing(
        "ID", "FUNCTION", "STATUS", "ATTEMPTS", "LAST OUTCOME", "CREATED", "SOURCE", right=(3,)
    )
    for inv in found:
        table.add_row(
            str(inv.get("id", "?")),
            str(inv.get("function", "?")),
            str(inv.get("status", "?")),
            str(inv.get("attempt_count", "?")),
            str(inv.get("last_outcome") or "-"),
            age(inv.get("created_at")),
            str(inv.get("source", "?")),
        )
    print_table(table)


@app.command("cancel")
def cancel(
    ctx: typer.Context,
    invocation_id: Annotated[str, typer.Argument(metavar="ID", help="The invocation id.")],
) -> None:
    """Cancel a queued invocation (one that runs or has finished cannot be)."""
    with open_client(ctx) as client:
        inv = client.cancel_invocation(invocation_id)
    typer.echo(f"Cancelled {inv.get('id', invocation_id)} ({inv.get('function', '?')})")


def _when(value: object) -> str:
    return f"{value} ({age(value)})" if value else "-"


def _pretty(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, indent=2, ensure_ascii=False)


def _error_line(error: Any) -> str:
    if isinstance(error, dict):
        kind = str(error.get("errorType") or "error")
        message = str(error.get("errorMessage") or "")
        return f"{kind}: {message}" if message else kind
    return str(error)
