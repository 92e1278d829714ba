"""``nimbus invocations get|list|cancel``: asynchronous invocations."""

from __future__ import annotations

import typer

app = typer.Typer(help="Asynchronous invocations: status, results, cancel.", no_args_is_help=True)
