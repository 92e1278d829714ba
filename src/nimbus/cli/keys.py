"""``nimbus keys create|list|revoke``: API keys (the admin scope)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from nimbus.cli.common import age, listing, open_client, print_table

app = typer.Typer(help="API keys: create, list, revoke (needs an admin key).", no_args_is_help=True)

SCOPES = ("admin", "deploy", "invoke", "read")


@app.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="What the key is for, e.g. ci.")],
    scope: Annotated[
        list[str] | None,
        typer.Option(
            "--scope",
            "-s",
            help="admin, deploy, invoke or read (repeatable; default: deploy and invoke).",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Create a key. Its secret is printed once: keep it (NIMBUS_API_KEY)."""
    scopes = list(scope or ["deploy", "invoke"])
    with open_client(ctx) as client:
        key = client.create_key(name, scopes)
    if as_json:
        typer.echo(json.dumps(key, indent=2))
        return
    typer.echo(f"Created key {key.get('id')} ({', '.join(key.get('scopes', []))}) for {name!r}.")
    typer.echo("Its secret, shown only now (send it as 'Authorization: Bearer <secret>'):")
    typer.echo(f"  {key.get('secret')}")
    typer.echo(f"AWS clients sign with access key id {key.get('id')} and that secret.")


@app.command("list")
def list_keys(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """List the keys (never their secrets)."""
    with open_client(ctx) as client:
        keys = client.list_keys()
    if as_json:
        typer.echo(json.dumps(keys, indent=2))
        return
    table = listing("ID", "NAME", "SCOPES", "CREATED", "STATE")
    for key in keys:
        revoked = key.get("revoked_at")
        table.add_row(
            str(key.get("id")),
            str(key.get("name", "")),
            ",".join(key.get("scopes", [])),
            age(key.get("created_at")),
            f"revoked {age(revoked)}" if revoked else "active",
        )
    print_table(table)


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(metavar="ID", help="The key's id (NIMB…).")],
) -> None:
    """Revoke a key: every request with it is refused from now on."""
    with open_client(ctx) as client:
        client.revoke_key(key_id)
    typer.echo(f"Revoked key {key_id}.")
