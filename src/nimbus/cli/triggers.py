"""``nimbus triggers list|add|remove``: a function's event sources."""

from __future__ import annotations

import typer

app = typer.Typer(help="A function's triggers (schedules, …).", no_args_is_help=True)
