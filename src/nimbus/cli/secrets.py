"""``nimbus secrets set|list|rm``: values functions read as environment variables
(``secrets:`` in nimbus.yaml), kept encrypted by the server and never shown again."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from nimbus.cli.common import CliError, age, listing, open_client, print_table

app = typer.Typer(help="Secrets: set, list, rm (values are never shown).", no_args_is_help=True)


def _read_value(from_file: Path | None) -> str:
    if from_file is not None:
        try:
            return from_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise CliError(
                f"cannot read {from_file}: {getattr(e, 'strerror', None) or e}"
            ) from None
    if sys.stdin.isatty():
        return str(typer.prompt("Value", hide_input=True))
    # Piped: the whole input, less one trailing newline (echo, here-strings).
    value = sys.stdin.read()
    return value[:-1] if value.endswith("\n") else value


@app.command("set")
def set_secret(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The secret's name, e.g. db-password.")],
    from_file: Annotated[
        Path | None,
        typer.Option("--from-file", help="Read the value from a file (as is).", dir_okay=False),
    ] = None,
) -> None:
    """Create or change a secret. The value is read from stdin (or prompted for), never
    from the command line, so it stays out of shell history and ps."""
    value = _read_value(from_file)
    with open_client(ctx) as client:
        record = client.set_secret(name, value)
    users = record.get("used_by") or []
    typer.echo(f"Set secret {name!r}.")
    if users:
        typer.echo(f"Used by {', '.join(users)}: their instances restart with the new value.")


@app.command("list")
def list_secrets(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """List the secrets and the functions using them (never their values)."""
    with open_client(ctx) as client:
        found = client.list_secrets()
    if as_json:
        typer.echo(json.dumps(found, indent=2))
        return
    table = listing("NAME", "UPDATED", "USED BY")
    for record in found:
        table.add_row(
            str(record.get("name")),
            age(record.get("updated_at")),
            ", ".join(record.get("used_by") or []) or "-",
        )
    print_table(table)


@app.command("rm")
def remove(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The secret to remove.")],
) -> None:
    """Remove a secret (refused while a function uses it)."""
    with open_client(ctx) as client:
        client.delete_secret(name)
    typer.echo(f"Removed secret {name!r}.")
