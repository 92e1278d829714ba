"""Function commands: ``deploy``, ``invoke``, ``list``, ``describe``, ``delete``.

Each parses its arguments, checks what it can locally (so a bad ``nimbus.yaml``
or bad ``--data`` fails before anything is sent), and makes one or two API calls
through :class:`nimbus.cli.client.Client`. Rich and httpx are imported inside the
commands: ``nimbus invoke`` is used in scripts and starts faster without them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Annotated, Any

import typer

from nimbus.cli.common import (
    CliError,
    age,
    human_size,
    listing,
    open_client,
    print_table,
    state,
    stdout_console,
)
from nimbus.errors import InvalidParameterValue

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, ProgressColumn, TaskID

    from nimbus.cli.client import InvokeResponse

SPEC_FILE = "nimbus.yaml"


# -- deploy ------------------------------------------------------------------


def deploy(
    ctx: typer.Context,
    directory: Annotated[
        Path, typer.Argument(help="The function directory, with nimbus.yaml.", show_default=True)
    ] = Path("."),
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Publish the new version even if its init fails (it serves errors)."
        ),
    ] = False,
) -> None:
    """Package a function directory and deploy it: create it, or publish a new version.

    The new version's init runs before it takes traffic: if it fails (an import error, a
    missing handler or library), the deploy fails with that error and the previous
    version keeps serving."""
    raw_spec = read_spec(directory)
    from nimbus.models import parse_spec

    try:
        spec = parse_spec(raw_spec)
    except InvalidParameterValue as e:
        raise CliError(f"{directory / SPEC_FILE}: {e.message}") from None

    from nimbus.cli.client import Upload
    from nimbus.packaging import package_directory

    url = state(ctx).url
    console = stdout_console()
    with open_client(ctx) as client, _Steps(console) as steps:
        steps.begin(f"Packaging {spec.name}")
        code = package_directory(directory)
        steps.finish(human_size(len(code)))

        try:
            client.get_function(spec.name)
            exists = True
        except CliError as e:
            if e.status != 404:
                raise
            exists = False

        # nimbus.yaml is the whole truth: an update sends every field (defaults filled in),
        # so a line deleted from the file resets that field instead of keeping its old value.
        upload = Upload.build(
            spec.model_dump(mode="json") if exists else raw_spec, code, force=force
        )
        steps.begin("Uploading", total=upload.size)
        titles = {
            "code": "Unpacking",
            "dependencies": "Installing dependencies",
            "init": "Running the init",
        }
        current = {"step": ""}

        def on_step(step: str, message: str) -> None:
            """The server's progress: a step begins, or a line of it (pip's) arrives."""
            if step != current["step"]:
                steps.finish()
                current["step"] = step
                steps.begin(titles.get(step, step.capitalize()), announce=True)
            else:
                steps.detail(message)

        def sent() -> None:
            steps.finish(human_size(upload.size))

        failed: CliError | None = None
        try:
            if exists:
                function = client.update_function(spec.name, upload, steps.advance, sent, on_step)
            else:
                function = client.create_function(upload, steps.advance, sent, on_step)
        except CliError as e:
            steps.fail()
            failed = e
        else:
            steps.finish()
    if failed is not None:
        if failed.details:
            _print_init_error(failed.details)
        raise failed

    console.print(f"Deployed {spec.name} version {function.get('version', '?')}", markup=False)
    console.print(f"  curl {url}/function/{spec.name}", markup=False)
    hostname = function.get("hostname")
    if isinstance(hostname, str) and hostname:
        port = url.rsplit(":", 1)[-1] if url.count(":") == 2 else ""
        console.print(f"  curl http://{hostname}{':' + port if port else ''}/", markup=False)


def _print_init_error(details: dict[str, Any]) -> None:
    """A failed init as the function's logs have it: type, message, the function's frames."""
    err = typer.echo
    err(f"{details.get('errorType', 'Error')}: {details.get('errorMessage', '')}", err=True)
    trace = details.get("stackTrace")
    if isinstance(trace, list) and trace:
        err("Traceback (most recent call last):", err=True)
        for frame in trace:
            err(str(frame).rstrip("\n"), err=True)


def read_spec(directory: Path) -> dict[str, Any]:
    """The mapping in ``directory/nimbus.yaml``, exactly as written (no defaults filled in)."""
    import yaml

    if not directory.is_dir():
        raise CliError(f"{directory} is not a directory")
    path = directory / SPEC_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CliError(
            f"no {SPEC_FILE} in {directory} (create a function with `nimbus init NAME`)"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise CliError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise CliError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    if data is None:
        raise CliError(f"{path} is empty: it needs at least `name: <function name>`")
    if not isinstance(data, dict):
        raise CliError(
            f"{path} must be a mapping of fields (name, runtime, handler, ...), "
            f"not a {type(data).__name__}"
        )
    return data


def has_requirements(directory: Path) -> bool:
    """Whether ``requirements.txt`` asks the server to install anything."""
    from nimbus.packaging import has_requirements as asks_for_anything

    try:
        return asks_for_anything((directory / "requirements.txt").read_bytes())
    except OSError:
        return False


def _yaml_problem(error: Exception) -> str:
    import yaml

    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        problem = error.problem or error.context or "syntax error"
        return f"{problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(error).split())


class _Steps:
    """The deploy's steps: a live display on a terminal; plain lines when piped."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._description = ""

    def __enter__(self) -> _Steps:
        if self.console.is_terminal:
            from rich.progress import Progress

            self._progress = Progress(*_columns(), console=self.console)
            self._progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is None:
            return
        if exc_type is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self._description} [red]failed")
            self._progress.stop_task(self._task)
        self._progress.stop()

    def begin(self, description: str, *, total: int | None = None, announce: bool = False) -> None:
        """Start a step: a byte bar when ``total`` is given, else a spinner."""
        self._description = description
        if self._progress is not None:
            self._task = self._progress.add_task(
                description, total=total, bytes=total is not None, detail=""
            )
        elif announce:
            self.console.print(f"{description} ...", markup=False)

    def detail(self, text: str) -> None:
        """A line of what the current step is doing (on a pipe: printed, indented)."""
        text = text.strip()
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, detail=text[:60])
        elif text:
            self.console.print(f"  {text}", markup=False)

    def fail(self) -> None:
        """The current step failed: mark it so, and stop the live display."""
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=f"{self._description} [red]failed")
            self._progress.stop_task(self._task)
            self._task = None

    def advance(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def finish(self, detail: str = "") -> None:
        if self._task is None and self._progress is not None:
            return
        if self._progress is not None and self._task is not None:
            total = self._progress.tasks[self._task].total or 1
            self._progress.update(self._task, total=total, completed=total, detail=detail)
        elif detail:
            self.console.print(f"{self._description}: {detail}", markup=False)
        self._task = None


def _columns() -> list[ProgressColumn | str]:
    """Spinner, step, then the upload's byte bar or another step's detail."""
    from rich.console import RenderableType
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        ProgressColumn,
        SpinnerColumn,
        Task,
        TextColumn,
    )
    from rich.text import Text

    class BarOrDetail(ProgressColumn):
        """The upload's byte bar; for the other steps, their detail (the zip's size)."""

        def __init__(self) -> None:
            super().__init__()
            self._bar = BarColumn(bar_width=30)

        def render(self, task: Task) -> RenderableType:
            if task.fields.get("bytes"):
                return self._bar.render(task)
            return Text(str(task.fields.get("detail", "")), style="dim")

    class Bytes(DownloadColumn):
        def render(self, task: Task) -> Text:
            return super().render(task) if task.fields.get("bytes") else Text("")

    return [
        SpinnerColumn(finished_text="[green]✓"),
        TextColumn("{task.description}"),
        BarOrDetail(),
        Bytes(binary_units=True),
    ]


# -- invoke ------------------------------------------------------------------


def invoke(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The function to invoke.")],
    data: Annotated[
        str,
        typer.Option("--data", "-d", help="The event: JSON text, @FILE, or @- for stdin."),
    ] = "{}",
    raw: Annotated[
        bool, typer.Option("--raw", help="Print the result exactly as returned.")
    ] = False,
    run_async: Annotated[
        bool,
        typer.Option(
            "--async",
            help="Queue the invocation and print its id at once (then: nimbus invocations get ID).",
        ),
    ] = False,
    idempotency_key: Annotated[
        str | None,
        typer.Option(
            "--idempotency-key",
            help="With --async: a second call with the same key returns the first id "
            "and runs nothing new.",
        ),
    ] = None,
) -> None:
    """Invoke a function with an event and print its result (or, --async, its invocation id)."""
    if idempotency_key is not None and not run_async:
        raise CliError("--idempotency-key only applies to --async invocations")
    event = read_event(data)
    if run_async:
        with open_client(ctx) as client:
            accepted = client.invoke_async(name, event, idempotency_key=idempotency_key)
        if accepted.replay:
            typer.echo(
                f"(idempotency key {idempotency_key!r} was used before: this is that invocation)",
                err=True,
            )
        typer.echo(accepted.invocation_id)
        return
    with open_client(ctx) as client:
        result = client.invoke(name, event)
    if result.function_error:
        raise CliError(function_error_line(result))
    if raw:
        typer.echo(result.body, nl=False)
        return
    try:
        value = json.loads(result.body)
    except ValueError:
        typer.echo(result.body)
        return
    typer.echo(json.dumps(value, indent=2, ensure_ascii=False))


def read_event(data: str) -> bytes:
    """The ``--data`` value as bytes, checked to be JSON before anything is sent."""
    where = "--data"
    if data.startswith("@"):
        source = data[1:]
        if source == "-":
            payload = sys.stdin.buffer.read()
            where = "stdin"
        else:
            try:
                payload = Path(source).read_bytes()
            except OSError as e:
                raise CliError(f"cannot read --data file {source}: {e.strerror or e}") from None
            where = source
    else:
        payload = data.encode()
    if payload.strip():  # empty means {} (docs/api.md)
        try:
            json.loads(payload)
        except UnicodeDecodeError:
            raise CliError(f"{where} is not valid JSON: it is not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise CliError(
                f"{where} is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})"
            ) from None
    return payload


def function_error_line(result: InvokeResponse) -> str:
    """``errorType: errorMessage`` from Lambda's error body."""
    kind = result.function_error or "Unhandled"
    try:
        body = json.loads(result.body)
    except ValueError:
        body = None
    if isinstance(body, dict):
        error_type = str(body.get("errorType") or kind)
        message = str(body.get("errorMessage") or "")
        return f"{error_type}: {message}" if message else error_type
    text = result.body.decode("utf-8", "replace").strip()
    return f"{kind}: {text}" if text else f"the function failed ({kind})"


# -- list, describe, delete --------------------------------------------------


def list_functions(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """List deployed functions."""
    with open_client(ctx) as client:
        functions = client.list_functions()
    if as_json:
        typer.echo(json.dumps({"functions": functions}, indent=2))
        return
    if not functions:
        typer.echo("No functions deployed. Start with: nimbus init hello && nimbus deploy hello")
        return
    table = listing(
        "NAME", "VERSION", "RUNTIME", "MEMORY", "TIMEOUT", "INSTANCES", "UPDATED", right=(1,)
    )
    for fn in functions:
        spec = _dict(fn.get("spec"))
        instances = _dict(fn.get("instances"))
        table.add_row(
            str(fn.get("name", "?")),
            str(fn.get("version", "?")),
            str(spec.get("runtime", "?")),
            f"{_num(spec.get('memory'))} MB",
            f"{_num(spec.get('timeout'))} s",
            f"{instances.get('idle', 0)} idle / {instances.get('busy', 0)} busy",
            age(fn.get("updated_at")),
        )
    print_table(table)


def describe(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The function to describe.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the API's JSON.")] = False,
) -> None:
    """Show a function: its configuration, code, versions and instances."""
    with open_client(ctx) as client:
        fn = client.get_function(name)
    if as_json:
        typer.echo(json.dumps(fn, indent=2))
        return
    from rich.table import Table
    from rich.text import Text

    base = state(ctx).url
    spec = _dict(fn.get("spec"))
    scaling = _dict(spec.get("scaling"))
    instances = _dict(fn.get("instances"))
    environment = _dict(spec.get("environment"))
    path = str(fn.get("url") or f"/function/{name}")
    layer = fn.get("layer_sha256")
    rows: list[tuple[str, str]] = [
        ("name", str(fn.get("name", name))),
        ("version", str(fn.get("version", "?"))),
        ("url", path if "://" in path else base + path),
        ("runtime", str(spec.get("runtime", "?"))),
        ("handler", str(spec.get("handler", "?"))),
        ("memory", f"{_num(spec.get('memory'))} MB"),
        ("timeout", f"{_num(spec.get('timeout'))} s"),
        ("network", str(spec.get("network", "?"))),
        (
            "scaling",
            f"min {_num(scaling.get('min'))}, max {_num(scaling.get('max'))}, "
            f"concurrency {_num(scaling.get('concurrency'))}, "
            f"keep warm {_num(scaling.get('keep_warm'))} s",
        ),
        (
            "environment",
            "\n".join(f"{k}={v}" for k, v in sorted(environment.items())) or "-",
        ),
    ]
    if spec.get("description"):
        rows.append(("description", str(spec["description"])))
    rows += [
        ("code", f"sha256 {_short(fn.get('code_sha256'))}"),
        ("layer", f"sha256 {_short(layer)}" if layer else "none (no requirements.txt)"),
        (
            "instances",
            f"{instances.get('total', 0)} ({instances.get('warm', 0)} warm: "
            f"{instances.get('idle', 0)} idle, {instances.get('busy', 0)} busy; "
            f"{instances.get('starting', 0)} starting)",
        ),
        (
            "starts",
            f"{_dict(fn.get('starts')).get('cold', 0)} cold, "
            f"{_dict(fn.get('starts')).get('warm', 0)} warm",
        ),
        (
            "zygote",
            f"{_dict(fn.get('zygote')).get('runtime', '?')}: "
            + ("up" if _dict(fn.get("zygote")).get("up") else "down")
            + "; function zygote: "
            + ("up" if _dict(fn.get("zygote")).get("function") else "down"),
        ),
        ("created", _when(fn.get("created_at"))),
        ("updated", _when(fn.get("updated_at"))),
    ]
    versions = [_dict(v) for v in fn.get("versions") or []]
    versions.sort(key=lambda v: v.get("version") or 0, reverse=True)
    rows.append(
        (
            "versions",
            "\n".join(
                f"{v.get('version', '?')}  {age(v.get('created_at'))}  "
                f"code {_short(v.get('code_sha256'))}"
                for v in versions
            )
            or "-",
        )
    )
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        grid.add_row(Text(key), Text(value))
    print_table(grid)


def delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The function to delete.")],
) -> None:
    """Delete a function: its versions, instances and logs."""
    with open_client(ctx) as client:
        client.delete_function(name)
    typer.echo(f"Deleted {name}")


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _num(value: object) -> str:
    """``30`` for 30.0; ``?`` when missing."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return "?" if value is None else str(value)


def _short(digest: object) -> str:
    return str(digest)[:12] if digest else "?"


def _when(value: object) -> str:
    return f"{value} ({age(value)})" if value else "-"
