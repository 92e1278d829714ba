"""The ``nimbus`` command line.

Thin by design (STYLE 9): each command parses its arguments and calls the HTTP
API (:mod:`nimbus.cli.client`) or the library (``nimbus up`` calls
:func:`nimbus.server.serve`). One module per command group:

- :mod:`nimbus.cli.scaffold`: ``init``
- :mod:`nimbus.cli.functions`: ``deploy``, ``invoke``, ``list``, ``describe``, ``delete``
- :mod:`nimbus.cli.logs`: ``logs``
- :mod:`nimbus.cli.server`: ``up``

A user error (bad input, an API error, an unreachable server) prints one line,
``error: <message>``, to stderr and exits 1; Ctrl-C exits 130. Never a traceback.
Only typer is imported up front; rich, httpx, yaml and pydantic are imported by
the commands that use them, so ``nimbus invoke`` starts fast in scripts.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer
from typer.core import TyperGroup

from nimbus.cli import functions, invocations, keys, logs, scaffold, secrets, server, triggers
from nimbus.cli.common import DEFAULT_URL, CliError, State, api_key, print_error
from nimbus.errors import NimbusError

__all__ = ["CliError", "app", "main"]


class _Group(TyperGroup):
    """Turns the errors users cause into one ``error:`` line and exit status 1."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]
        try:
            return super().invoke(ctx)
        except (CliError, NimbusError) as e:
            print_error(e.message)
            raise typer.Exit(1) from None


app = typer.Typer(
    name="nimbus",
    cls=_Group,
    help="Nimbus: deploy a function, call it, stop thinking about servers.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"nimbus {version('nimbus')}")
        except PackageNotFoundError:
            typer.echo("nimbus (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    url: Annotated[
        str,
        typer.Option(
            "--url",
            envvar="NIMBUS_URL",
            help="The Nimbus server to talk to.",
        ),
    ] = DEFAULT_URL,
    api_key_file: Annotated[
        str | None,
        typer.Option(
            "--api-key-file",
            envvar="NIMBUS_API_KEY_FILE",
            help="A file holding the API key (else NIMBUS_API_KEY, then "
            "~/.config/nimbus/api-key, then the local data dir's admin.key).",
        ),
    ] = None,
    _show_version: Annotated[
        bool,
        typer.Option(
            "--version", is_eager=True, callback=_version, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise CliError(f"invalid --url {url!r}: expected http://HOST:PORT")
    # A transport given by the caller (tests) survives; the URL comes from --url.
    transport = ctx.obj.transport if isinstance(ctx.obj, State) else None
    ctx.obj = State(url=url, transport=transport, api_key=api_key(os.environ, api_key_file))


app.command("init")(scaffold.init)
app.command("deploy")(functions.deploy)
app.command("invoke")(functions.invoke)
app.command("list")(functions.list_functions)
app.command("describe")(functions.describe)
app.command("delete")(functions.delete)
app.command("logs")(logs.logs)
app.command("up")(server.up)
app.add_typer(invocations.app, name="invocations")
app.add_typer(triggers.app, name="triggers")
app.add_typer(keys.app, name="keys")
app.add_typer(secrets.app, name="secrets")


def main() -> None:
    """Console-script entry point (``nimbus``)."""
    try:
        app(prog_name="nimbus")
    except (CliError, NimbusError) as e:  # raised outside a command, e.g. while parsing
        print_error(e.message)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
