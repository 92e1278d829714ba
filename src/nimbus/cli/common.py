"""Pieces every command shares: the error a user sees, per-run state, small formatters.

Only the standard library and typer are imported at module level: ``nimbus invoke``
runs in scripts, so rich and httpx are imported by the commands that need them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:
    import httpx
    from rich.console import Console, RenderableType
    from rich.table import Table

    from nimbus.cli.client import Client

DEFAULT_URL = "http://127.0.0.1:8080"


class CliError(Exception):
    """A problem the user can fix: printed as one ``error: <message>`` line, exit 1.

    ``code`` and ``status`` are set when the message came from the API's error body.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        status: int | None = None,
        details: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status
        #: The API error's ``details`` (a failed init's Lambda error), when it has some.
        self.details = details


@dataclass(frozen=True, slots=True)
class State:
    """What the global options decided, shared with every command through ``ctx.obj``.

    ``transport`` is for tests: pass ``obj=State(url, transport=httpx.MockTransport(...))``
    to ``CliRunner.invoke`` and every API call goes to it.
    """

    url: str
    transport: httpx.BaseTransport | None = None
    #: The API key sent with every request (see :func:`api_key`).
    api_key: str | None = None


def state(ctx: typer.Context) -> State:
    obj = ctx.find_root().obj
    if not isinstance(obj, State):  # only when a command is invoked without the root group
        raise CliError("internal error: the CLI was not initialised")
    return obj


def open_client(ctx: typer.Context) -> Client:
    """A client for the server chosen with ``--url``; use it as a context manager."""
    from nimbus.cli.client import Client

    st = state(ctx)
    return Client(st.url, transport=st.transport, api_key=st.api_key)


def api_key(environ: Mapping[str, str], key_file: str | None = None) -> str | None:
    """The key the CLI sends: ``NIMBUS_API_KEY``; else the file ``--api-key-file`` (or
    ``NIMBUS_API_KEY_FILE``) names; else ``$XDG_CONFIG_HOME/nimbus/api-key``; else, on
    the machine that runs ``nimbus up`` with the default data dir, its ``admin.key``
    when this user can read it (what ``make up`` then ``nimbus deploy`` needs)."""
    from nimbus.config import default_data_dir

    if environ.get("NIMBUS_API_KEY"):
        return environ["NIMBUS_API_KEY"].strip()
    if key_file:
        try:
            return Path(key_file).read_text().strip()
        except OSError as e:
            raise CliError(f"cannot read the API key file {key_file}: {e.strerror}") from None
    config = Path(environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "nimbus"
    data = Path(environ.get("NIMBUS_DATA_DIR") or default_data_dir(environ))
    for path in (config / "api-key", data / "admin.key"):
        try:
            return path.read_text().strip()
        except OSError:
            continue
    return None


def print_error(message: str) -> None:
    typer.echo(f"error: {message}", err=True)


def stdout_console() -> Console:
    """A rich console on stdout. Piped, it stays plain and does not wrap at 80 columns."""
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = 240
    return console


def print_table(table: RenderableType) -> None:
    """Print a table on stdout; piped, without the padding rich leaves at line ends."""
    console = stdout_console()
    if console.is_terminal:
        console.print(table)
        return
    with console.capture() as captured:
        console.print(table)
    typer.echo("\n".join(line.rstrip() for line in captured.get().splitlines()))


def listing(*columns: str, right: tuple[int, ...] = ()) -> Table:
    """The borderless table every list command prints (``right``: right-aligned columns)."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column)
    for index in right:
        table.columns[index].justify = "right"
    return table


def human_size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def parse_time(value: object) -> datetime | None:
    """An API timestamp (ISO 8601, or epoch seconds) as an aware datetime, or None."""
    try:
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
        if isinstance(value, str) and value:
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        pass
    return None


def age(value: object, now: datetime | None = None) -> str:
    """``"5m ago"`` for an API timestamp; the value itself when it is not one."""
    when = parse_time(value)
    if when is None:
        return str(value) if value not in (None, "") else "-"
    seconds = max(0, int(((now or datetime.now(UTC)) - when).total_seconds()))
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= length:
            return f"{seconds // length}{unit} ago"
    return f"{seconds}s ago"
