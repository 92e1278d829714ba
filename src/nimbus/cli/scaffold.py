"""``nimbus init``: scaffold a function directory from the templates in ``nimbus/templates``."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Annotated

import typer

from nimbus.cli.common import CliError, state

#: Template file -> file created; ``{{name}}`` in a template becomes the function's name.
TEMPLATES = {"python": {"nimbus.yaml.tmpl": "nimbus.yaml", "app.py.tmpl": "app.py"}}


def init(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Function name: lowercase letters, digits and -.")],
    directory: Annotated[
        Path | None,
        typer.Option("--dir", help="Where to create it (default: ./NAME).", show_default=False),
    ] = None,
) -> None:
    """Create a new function directory with nimbus.yaml and a hello-world app.py."""
    from nimbus.models import NAME_RE

    if not NAME_RE.fullmatch(name):
        raise CliError(
            f"invalid function name {name!r}: it must start with a lowercase letter and contain "
            "only lowercase letters, digits and '-', at most 63 characters"
        )
    target = directory if directory is not None else Path(name)
    created = scaffold(target, name, runtime="python")
    url = state(ctx).url
    typer.echo(f"Created {target}/ with {', '.join(p.name for p in created)}")
    typer.echo("Next:")
    typer.echo(f"  nimbus deploy {target}")
    typer.echo(f"  curl '{url}/function/{name}?name=ada'")


def scaffold(target: Path, name: str, *, runtime: str) -> list[Path]:
    """Write the templates for ``runtime`` into ``target``, which must be absent or empty."""
    if target.exists():
        if not target.is_dir():
            raise CliError(f"{target} already exists and is not a directory")
        if any(target.iterdir()):
            raise CliError(f"{target} already exists and is not empty; use another --dir")
    source = resources.files("nimbus") / "templates" / runtime
    created = []
    try:
        target.mkdir(parents=True, exist_ok=True)
        for template, filename in TEMPLATES[runtime].items():
            text = (source / template).read_text(encoding="utf-8").replace("{{name}}", name)
            path = target / filename
            with path.open("x", encoding="utf-8") as f:  # "x": never overwrite
                f.write(text)
            created.append(path)
    except OSError as e:
        raise CliError(f"cannot create {e.filename or target}: {e.strerror or e}") from None
    return created
