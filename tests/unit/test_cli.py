"""The ``nimbus`` CLI without a server: local checks, output, and the API client's error mapping.

API calls go to an ``httpx.MockTransport`` passed in through ``State``; the
end-to-end tests run the same commands against a real ``nimbus up``.
"""

from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import sys
import types
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner, Result

from nimbus.cli import app, main
from nimbus.cli.client import Client, Upload
from nimbus.cli.common import CliError, State, age
from nimbus.models import parse_spec

UNREACHABLE = "http://127.0.0.1:9"  # discard port: closed on loopback
URL = "http://nimbus.test"

Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def runner() -> CliRunner:
    # The developer's own NIMBUS_* variables must not leak into these tests.
    return CliRunner(
        env={
            k: None
            for k in (
                "NIMBUS_URL",
                "NIMBUS_API_KEY",
                "NIMBUS_API_KEY_FILE",
                "NIMBUS_HOST",
                "NIMBUS_PORT",
                "NIMBUS_DATA_DIR",
                "NIMBUS_MAX_INSTANCES",
                "NIMBUS_QUEUE_DEPTH",
                "NIMBUS_QUEUE_TIMEOUT",
                "NIMBUS_SHUTDOWN_GRACE",
                "NIMBUS_LOG_LEVEL",
                "NIMBUS_DEPLOY",
            )
        }
    )


class Api:
    """A fake Nimbus API: records requests, answers with a handler per test."""

    def __init__(self, handler: Handler) -> None:
        self.requests: list[httpx.Request] = []
        self._handler = handler

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        return self._handler(request)

    def state(self) -> State:
        return State(url=URL, transport=httpx.MockTransport(self))


def no_calls(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"unexpected API call {request.method} {request.url}")


def run(runner: CliRunner, args: list[str], api: Api | None = None, **kw: Any) -> Result:
    obj = (api or Api(no_calls)).state()
    return runner.invoke(app, ["--url", URL, *args], obj=obj, **kw)


def assert_user_error(result: Result, *fragments: str) -> None:
    """Exit 1, exactly one ``error:`` line on stderr, nothing like a traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0]


def error_response(status: int, code: str, message: str, **headers: str) -> httpx.Response:
    return httpx.Response(
        status, json={"error": {"code": code, "message": message}}, headers=headers
    )


def function_object(name: str = "hello", version: int = 1) -> dict[str, Any]:
    return {
        "name": name,
        "version": version,
        "spec": {
            "name": name,
            "runtime": "python3.11",
            "handler": "app.handler",
            "memory": 128,
            "timeout": 30.0,
            "environment": {"GREETING": "hi"},
            "scaling": {"min": 0, "max": 10, "concurrency": 1, "keep_warm": 300},
            "network": "none",
            "description": "",
        },
        "code_sha256": "ab" * 32,
        "layer_sha256": None,
        "created_at": "2026-11-27T05:00:00Z",
        "updated_at": "2026-11-27T05:10:00Z",
        "versions": [
            {"version": v, "created_at": "2026-11-27T05:00:00Z", "code_sha256": "cd" * 32}
            for v in range(1, version + 1)
        ],
        "instances": {"total": 3, "warm": 3, "idle": 2, "busy": 1, "starting": 0},
        "starts": {"cold": 4, "warm": 9},
        "zygote": {"runtime": "python3.11", "up": True},
        "url": f"/function/{name}",
    }


# -- init --------------------------------------------------------------------


def test_init_creates_a_deployable_function(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = run(runner, ["init", "hello"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "hello").iterdir()) == ["app.py", "nimbus.yaml"]
    assert "nimbus deploy hello" in result.stdout

    spec = yaml.safe_load((tmp_path / "hello" / "nimbus.yaml").read_text())
    assert spec["name"] == "hello"
    assert spec["runtime"] == "python3.11"
    assert spec["handler"] == "app.handler"
    assert (spec["memory"], spec["timeout"]) == (128, 30)
    assert spec["scaling"]["max"] >= 1
    assert parse_spec(spec).name == "hello"
    assert "requirements.txt" in (tmp_path / "hello" / "nimbus.yaml").read_text()


def load_handler(path: Path) -> Callable[[Any, Any], Any]:
    module_spec = importlib.util.spec_from_file_location(f"scaffolded_{id(path)}", path)
    assert module_spec is not None and module_spec.loader is not None
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    handler: Callable[[Any, Any], Any] = module.handler
    return handler


def test_init_handler_answers_http_and_direct_events(runner: CliRunner, tmp_path: Path) -> None:
    result = run(runner, ["init", "greeter", "--dir", str(tmp_path / "g")])
    assert result.exit_code == 0, result.output
    handler = load_handler(tmp_path / "g" / "app.py")

    http_event = {
        "version": "2.0",
        "rawPath": "/",
        "rawQueryString": "name=ada",
        "queryStringParameters": {"name": "ada"},
        "requestContext": {"http": {"method": "GET", "path": "/"}},
        "isBase64Encoded": False,
    }
    response = handler(http_event, None)
    assert response["statusCode"] == 200
    assert response["headers"]["content-type"] == "application/json"
    assert json.loads(response["body"]) == {"message": "Hello, ada!"}

    post_event = {**http_event, "queryStringParameters": None, "body": '{"name": "bob"}'}
    assert json.loads(handler(post_event, None)["body"]) == {"message": "Hello, bob!"}
    assert json.loads(handler({**post_event, "body": "not json"}, None)["body"]) == {
        "message": "Hello, world!"
    }

    assert handler({"name": "ada"}, None) == {"message": "Hello, ada!"}
    assert handler({}, None) == {"message": "Hello, world!"}


def test_init_into_an_existing_empty_directory(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = run(runner, ["init", "fn", "--dir", str(tmp_path / "empty")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "empty" / "app.py").is_file()


def test_init_refuses_to_overwrite(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "taken"
    target.mkdir()
    (target / "app.py").write_text("mine\n")
    result = run(runner, ["init", "taken", "--dir", str(target)])
    assert_user_error(result, "not empty")
    assert (target / "app.py").read_text() == "mine\n"
    assert not (target / "nimbus.yaml").exists()

    (tmp_path / "file").write_text("x")
    assert_user_error(
        run(runner, ["init", "fn", "--dir", str(tmp_path / "file")]), "not a directory"
    )


@pytest.mark.parametrize("name", ["Hello", "1abc", "a_b", "a.b", "", "a" * 64, "abc\n"])
def test_init_rejects_invalid_names(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.chdir(tmp_path)
    assert_user_error(run(runner, ["init", name]), "invalid function name")
    assert list(tmp_path.iterdir()) == []


# -- deploy: local checks ----------------------------------------------------


def test_deploy_without_nimbus_yaml(runner: CliRunner, tmp_path: Path) -> None:
    assert_user_error(run(runner, ["deploy", str(tmp_path)]), "no nimbus.yaml", "nimbus init")


def test_deploy_missing_directory(runner: CliRunner, tmp_path: Path) -> None:
    assert_user_error(run(runner, ["deploy", str(tmp_path / "nope")]), "not a directory")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("name: [hello\n", "is not valid YAML"),
        ("name: hello\n  runtime: x\n", "is not valid YAML"),
        ("- name: hello\n", "must be a mapping"),
        ("just a string\n", "must be a mapping"),
        ("", "is empty"),
        ("name: hello\nmemory: 5\n", "memory: must be between 128 and 10240 MB"),
        ("name: Hello\n", "name:"),
        ("runtime: python3.11\n", "name: is required"),
        ("name: hello\nbogus: 1\n", "bogus: unknown field"),
        ("name: hello\nhandler: nodot\n", "handler"),
    ],
)
def test_deploy_rejects_bad_specs_before_uploading(
    runner: CliRunner, tmp_path: Path, text: str, fragment: str
) -> None:
    (tmp_path / "nimbus.yaml").write_text(text)
    (tmp_path / "app.py").write_text("def handler(event, context):\n    return event\n")
    result = run(runner, ["deploy", str(tmp_path)])  # Api(no_calls): nothing may be sent
    assert_user_error(result, fragment)


# -- deploy: through the API -------------------------------------------------


def read_form(request: httpx.Request) -> dict[str, Any]:
    """Parse the multipart body the way the server does (Starlette)."""
    from starlette.datastructures import UploadFile
    from starlette.requests import Request

    body = request.read()

    async def parse() -> dict[str, Any]:
        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        scope = {
            "type": "http",
            "method": request.method,
            "path": request.url.path,
            "query_string": b"",
            "headers": [(k.encode(), v.encode()) for k, v in request.headers.items()],
        }
        form = await Request(scope, receive).form()
        parsed: dict[str, Any] = {}
        for key, value in form.multi_items():
            if isinstance(value, UploadFile):
                parsed[key] = (value.filename, value.content_type, await value.read())
            else:
                parsed[key] = value
        await form.close()
        return parsed

    return asyncio.run(parse())


def write_function(directory: Path, yaml_text: str, requirements: str | None = None) -> Path:
    directory.mkdir()
    (directory / "nimbus.yaml").write_text(yaml_text)
    (directory / "app.py").write_text("def handler(event, context):\n    return event\n")
    if requirements is not None:
        (directory / "requirements.txt").write_text(requirements)
    return directory


@pytest.mark.parametrize("exists", [False, True])
def test_deploy_uploads_the_spec_and_the_zip(
    runner: CliRunner, tmp_path: Path, exists: bool
) -> None:
    fn = write_function(
        tmp_path / "fn", "name: hello\nmemory: 256\nenvironment: {GREETING: hi}\n", "six\n"
    )
    uploads: list[dict[str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            assert request.url.path == "/v1/functions/hello"
            if exists:
                return httpx.Response(200, json=function_object(version=4))
            return error_response(404, "ResourceNotFound", "function 'hello' does not exist")
        assert request.headers["content-length"] == str(len(request.content))
        assert request.headers["accept"] == "application/x-ndjson"
        uploads.append(read_form(request))
        if exists:
            assert (request.method, request.url.path) == ("PUT", "/v1/functions/hello")
        else:
            assert (request.method, request.url.path) == ("POST", "/v1/functions")
        # The server's progress, streamed: its steps, pip's lines, then the function.
        events = [
            {"step": "code", "message": "unpacking the code"},
            {"step": "dependencies", "message": "installing requirements.txt"},
            {"step": "dependencies", "message": "Collecting six"},
            {"step": "init", "message": "running the init of version 1"},
            {"result": function_object(version=5 if exists else 1)},
        ]
        body = b"".join(json.dumps(e).encode() + b"\n" for e in events)
        return httpx.Response(200, content=body, headers={"content-type": "application/x-ndjson"})

    result = run(runner, ["deploy", str(fn)], Api(handler))
    assert result.exit_code == 0, result.output
    (form,) = uploads
    sent = json.loads(form["spec"])
    if exists:
        # An update sends every field, so a line deleted from nimbus.yaml resets to its default.
        assert sent["memory"] == 256 and sent["environment"] == {"GREETING": "hi"}
        assert sent["timeout"] == 30 and sent["scaling"]["max"] == 10
    else:
        # A create sends what the user wrote; the server fills in the defaults.
        assert sent == {"name": "hello", "memory": 256, "environment": {"GREETING": "hi"}}
    filename, content_type, data = form["code"]
    assert (filename, content_type) == ("code.zip", "application/zip")
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        assert {"app.py", "nimbus.yaml", "requirements.txt"} <= set(z.namelist())

    version = 5 if exists else 1
    lines = result.stdout.splitlines()
    assert lines[-2:] == [f"Deployed hello version {version}", f"  curl {URL}/function/hello"]
    assert "Installing dependencies ..." in result.stdout
    assert "  Collecting six" in result.stdout and "Running the init ..." in result.stdout
    assert result.stderr == ""


def test_deploy_shows_the_server_error(runner: CliRunner, tmp_path: Path) -> None:
    fn = write_function(tmp_path / "fn", "name: hello\n", "nope==9\n")

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "GET":
            return error_response(404, "ResourceNotFound", "function 'hello' does not exist")
        return error_response(400, "InvalidParameterValue", "installing requirements failed")

    result = run(runner, ["deploy", str(fn)], Api(handler))
    assert_user_error(result, "installing requirements failed")
    assert "Deployed" not in result.stdout


def test_upload_chunks_report_progress() -> None:
    upload = Upload.build({"name": "x"}, b"z" * 200_000)
    seen: list[int] = []
    done: list[bool] = []
    body = b"".join(upload.chunks(seen.append, lambda: done.append(True)))
    assert len(body) == upload.size == sum(seen)
    assert done == [True]
    assert upload.content_type.startswith("multipart/form-data; boundary=")


# -- invoke ------------------------------------------------------------------


@pytest.mark.parametrize("data", ["{bad", "{'a': 1}", "[1,", "nan-ish"])
def test_invoke_rejects_invalid_json_before_sending(runner: CliRunner, data: str) -> None:
    assert_user_error(run(runner, ["invoke", "hello", "--data", data]), "--data is not valid JSON")


def test_invoke_data_from_files(runner: CliRunner, tmp_path: Path) -> None:
    assert_user_error(
        run(runner, ["invoke", "hello", "-d", f"@{tmp_path / 'missing.json'}"]), "cannot read"
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"a":')
    assert_user_error(
        run(runner, ["invoke", "hello", "-d", f"@{bad}"]), "bad.json is not valid JSON"
    )

    good = tmp_path / "event.json"
    good.write_text('{"name": "ada"}')
    api = Api(lambda request: httpx.Response(200, json={"message": "Hello, ada!"}))
    result = run(runner, ["invoke", "hello", "-d", f"@{good}"], api)
    assert result.exit_code == 0, result.output
    assert api.requests[0].content == b'{"name": "ada"}'

    result = run(runner, ["invoke", "hello", "-d", "@-"], api, input='{"from": "stdin"}')
    assert result.exit_code == 0, result.output
    assert api.requests[1].content == b'{"from": "stdin"}'


def test_invoke_prints_the_result(runner: CliRunner) -> None:
    api = Api(lambda request: httpx.Response(200, content=b'{"message":"Hello, \xc3\xa9!"}'))
    result = run(runner, ["invoke", "hello"], api)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"message": "Hello, é!"}
    assert result.stdout.startswith("{\n  ")  # pretty
    request = api.requests[0]
    assert (request.method, request.url.path) == ("POST", "/v1/functions/hello/invoke")
    assert request.content == b"{}"

    result = run(runner, ["invoke", "hello", "--raw", "-d", '{"a": 1}'], api)
    assert result.stdout_bytes == b'{"message":"Hello, \xc3\xa9!"}'


def test_invoke_function_error(runner: CliRunner) -> None:
    body = {"errorMessage": "card declined", "errorType": "PaymentDeclined", "stackTrace": []}
    api = Api(
        lambda request: httpx.Response(
            200, json=body, headers={"X-Nimbus-Function-Error": "Unhandled"}
        )
    )
    result = run(runner, ["invoke", "hello"], api)
    assert_user_error(result)
    assert result.stderr == "error: PaymentDeclined: card declined\n"
    assert result.stdout == ""


def test_invoke_unknown_function(runner: CliRunner) -> None:
    api = Api(lambda r: error_response(404, "ResourceNotFound", "function 'nope' does not exist"))
    result = run(runner, ["invoke", "nope"], api)
    assert_user_error(result)
    assert result.stderr == "error: function 'nope' does not exist\n"


# -- unreachable server, bad --url, main() -----------------------------------


@pytest.mark.parametrize(
    "args",
    [["list"], ["describe", "hello"], ["delete", "hello"], ["invoke", "hello"], ["logs", "hi"]],
)
def test_unreachable_server(runner: CliRunner, args: list[str]) -> None:
    result = runner.invoke(app, ["--url", UNREACHABLE, *args])
    assert_user_error(result)
    assert result.stderr == (
        f"error: cannot reach Nimbus at {UNREACHABLE}: is `nimbus up` running?\n"
    )


def test_url_from_environment(runner: CliRunner) -> None:
    result = runner.invoke(app, ["list"], env={"NIMBUS_URL": UNREACHABLE + "/"})
    assert_user_error(result, f"cannot reach Nimbus at {UNREACHABLE}:")


@pytest.mark.parametrize("url", ["localhost:8080", "ftp://x", "http://"])
def test_invalid_url(runner: CliRunner, url: str) -> None:
    assert_user_error(runner.invoke(app, ["--url", url, "list"]), "invalid --url")


def test_main_prints_one_line_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["nimbus", "--url", UNREACHABLE, "list"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("error: cannot reach Nimbus at")
    assert captured.err.count("\n") == 1


def test_main_exits_130_on_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    def serve(settings: Any, *, deploy: Any = ()) -> None:
        raise KeyboardInterrupt

    monkeypatch.setitem(sys.modules, "nimbus.server", types.SimpleNamespace(serve=serve))
    monkeypatch.setattr(sys, "argv", ["nimbus", "up", "--port", "0"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 130


# -- list, describe, delete --------------------------------------------------


def test_list(runner: CliRunner) -> None:
    functions = [function_object("alpha", 2), function_object("beta", 7)]
    api = Api(lambda request: httpx.Response(200, json={"functions": functions}))
    result = run(runner, ["list"], api)
    assert result.exit_code == 0, result.output
    header, *rows = result.stdout.splitlines()
    assert header.split() == [
        "NAME", "VERSION", "RUNTIME", "MEMORY", "TIMEOUT", "INSTANCES", "UPDATED"
    ]  # fmt: skip
    assert rows[0].split()[:3] == ["alpha", "2", "python3.11"]
    assert "2 idle / 1 busy" in rows[1]
    assert all(line == line.rstrip() for line in result.stdout.splitlines())

    result = run(runner, ["list", "--json"], api)
    assert json.loads(result.stdout) == {"functions": functions}

    empty = Api(lambda request: httpx.Response(200, json={"functions": []}))
    assert "No functions deployed" in run(runner, ["list"], empty).stdout


def test_describe(runner: CliRunner) -> None:
    api = Api(lambda request: httpx.Response(200, json=function_object("hello", 3)))
    result = run(runner, ["describe", "hello"], api)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert f"{URL}/function/hello" in out
    assert "abababababab" in out and "ab" * 32 not in out  # short hash
    assert "GREETING=hi" in out
    assert "3 (3 warm: 2 idle, 1 busy; 0 starting)" in out
    assert "4 cold, 9 warm" in out and "python3.11: up" in out
    assert "30 s" in out
    assert api.requests[0].url.path == "/v1/functions/hello"

    assert json.loads(run(runner, ["describe", "hello", "--json"], api).stdout)["version"] == 3


def test_delete(runner: CliRunner) -> None:
    api = Api(lambda request: httpx.Response(204))
    result = run(runner, ["delete", "hello"], api)
    assert result.exit_code == 0, result.output
    assert result.stdout == "Deleted hello\n"
    assert (api.requests[0].method, api.requests[0].url.path) == ("DELETE", "/v1/functions/hello")

    missing = Api(lambda r: error_response(404, "ResourceNotFound", "function 'x' does not exist"))
    assert_user_error(run(runner, ["delete", "x"], missing), "does not exist")


# -- logs --------------------------------------------------------------------


def record(seq: int, message: str) -> dict[str, Any]:
    return {
        "seq": seq,
        "time": 1795000000.5 + seq,
        "version": 1,
        "instance": "a1b2c3d4e5f6",
        "request_id": "r",
        "message": message,
    }


def test_logs(runner: CliRunner) -> None:
    records = [record(1, "START RequestId: r"), record(2, "hello\n"), record(3, "END RequestId: r")]
    api = Api(lambda request: httpx.Response(200, json={"records": records, "next": 3}))
    result = run(runner, ["logs", "hello", "--since", "10m", "-n", "50"], api)
    assert result.exit_code == 0, result.output
    assert result.stdout == "START RequestId: r\nhello\nEND RequestId: r\n"
    params = api.requests[0].url.params
    assert (params["since"], params["limit"]) == ("10m", "50")
    assert "follow" not in params

    stamped = run(runner, ["logs", "hello", "--timestamps"], api).stdout.splitlines()
    assert stamped[1].endswith(" hello") and stamped[1][:4].isdigit()


def test_logs_follow_streams_ndjson(runner: CliRunner) -> None:
    def lines() -> Iterator[bytes]:
        yield (json.dumps(record(1, "first")) + "\n").encode()
        yield b"\n"
        yield (json.dumps(record(2, "second")) + "\n").encode()

    api = Api(
        lambda request: httpx.Response(
            200, content=lines(), headers={"content-type": "application/x-ndjson"}
        )
    )
    result = run(runner, ["logs", "hello", "-f"], api)
    assert result.exit_code == 0, result.output
    assert result.stdout == "first\nsecond\n"
    assert api.requests[0].url.params["follow"] == "true"

    missing = Api(lambda r: error_response(404, "ResourceNotFound", "function 'x' does not exist"))
    assert_user_error(run(runner, ["logs", "x", "-f"], missing), "does not exist")


def test_logs_bad_since_is_the_servers_message(runner: CliRunner) -> None:
    api = Api(lambda r: error_response(400, "InvalidParameterValue", "since: not a time"))
    assert_user_error(run(runner, ["logs", "hello", "--since", "yesterday"], api), "since:")


# -- up ----------------------------------------------------------------------


@pytest.fixture
def fake_serve(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, list[Path]]]:
    calls: list[tuple[Any, list[Path]]] = []

    def serve(settings: Any, *, deploy: Any = ()) -> None:
        calls.append((settings, list(deploy)))

    monkeypatch.setitem(sys.modules, "nimbus.server", types.SimpleNamespace(serve=serve))
    return calls


def test_up_builds_settings_from_options_and_environment(
    runner: CliRunner, tmp_path: Path, fake_serve: list[tuple[Any, list[Path]]]
) -> None:
    fn = tmp_path / "fn"
    fn.mkdir()
    env = {"NIMBUS_QUEUE_DEPTH": "7", "NIMBUS_LOG_LEVEL": "debug", "NIMBUS_PORT": "1234"}
    args = ["up", "--port", "9999", "--data-dir", str(tmp_path / "d"), "--deploy", str(fn)]
    result = runner.invoke(app, args, env=env)
    assert result.exit_code == 0, result.output
    ((settings, deploy),) = fake_serve
    assert settings.port == 9999  # the option wins over NIMBUS_PORT
    assert settings.queue_depth == 7
    assert settings.log_level == "debug"
    assert settings.data_dir == (tmp_path / "d").resolve()
    assert settings.host == "127.0.0.1"
    assert [p.resolve() for p in deploy] == [fn.resolve()]


def test_up_rejects_bad_settings(
    runner: CliRunner, fake_serve: list[tuple[Any, list[Path]]]
) -> None:
    assert_user_error(runner.invoke(app, ["up", "--port", "70000"]), "port must be between")
    assert_user_error(runner.invoke(app, ["up", "--max-instances", "0"]), "max_instances")
    assert fake_serve == []


def test_up_reports_a_taken_port(runner: CliRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    def serve(settings: Any, *, deploy: Any = ()) -> None:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setitem(sys.modules, "nimbus.server", types.SimpleNamespace(serve=serve))
    result = runner.invoke(app, ["up", "--port", "8081"])
    assert_user_error(result, "cannot listen on 127.0.0.1:8081", "Address already in use")


# -- the client's error mapping ----------------------------------------------


def client_for(handler: Handler) -> Client:
    return Client(URL, transport=httpx.MockTransport(handler))


def test_client_maps_api_error_bodies() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return error_response(409, "ResourceConflict", "function 'x' already exists")

    with client_for(handler) as client, pytest.raises(CliError) as info:
        client.get_function("x")
    assert info.value.message == "function 'x' already exists"
    assert (info.value.code, info.value.status) == ("ResourceConflict", 409)


def test_client_maps_throttling_with_retry_after() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return error_response(429, "TooManyRequests", "no capacity", **{"Retry-After": "2"})

    with client_for(handler) as client, pytest.raises(CliError) as info:
        client.invoke("x", b"{}")
    assert info.value.message == "no capacity (retry after 2 s)"


def test_client_maps_non_json_errors() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(502, text="<html>bad gateway</html>")

    with client_for(handler) as client, pytest.raises(CliError) as info:
        client.list_functions()
    assert info.value.message.startswith(f"Nimbus at {URL} answered 502 Bad Gateway")
    assert info.value.status == 502 and info.value.code is None


def test_client_rejects_unexpected_bodies() -> None:
    with (
        client_for(lambda r: httpx.Response(200, text="hello")) as client,
        pytest.raises(CliError, match="not a JSON object"),
    ):
        client.get_function("x")


@pytest.mark.parametrize(
    ("exc", "message"),
    [
        (httpx.ConnectError("refused"), f"cannot reach Nimbus at {URL}: is `nimbus up` running?"),
        (httpx.ConnectTimeout("slow"), f"cannot reach Nimbus at {URL}: is `nimbus up` running?"),
        (httpx.ReadTimeout("slow"), f"Nimbus at {URL} did not answer in time"),
        (httpx.RemoteProtocolError("eof"), f"lost the connection to Nimbus at {URL}: eof"),
    ],
)
def test_client_maps_transport_errors(exc: httpx.HTTPError, message: str) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise exc

    with client_for(handler) as client, pytest.raises(CliError) as info:
        client.list_functions()
    assert info.value.message == message
    with client_for(handler) as client, pytest.raises(CliError) as info:
        list(client.follow_logs("x"))
    assert info.value.message == message


def test_client_quotes_names_into_paths() -> None:
    api = Api(lambda request: httpx.Response(200, json=function_object()))
    with Client(URL, transport=httpx.MockTransport(api)) as client:
        client.get_function("a/../b")
    assert api.requests[0].url.raw_path == b"/v1/functions/a%2F..%2Fb"


def test_age() -> None:
    from datetime import UTC, datetime

    now = datetime(2026, 11, 27, 5, 10, tzinfo=UTC)
    assert age("2026-11-27T05:09:30Z", now) == "30s ago"
    assert age("2026-11-27T03:00:00Z", now) == "2h ago"
    assert age("2026-11-20T05:10:00Z", now) == "7d ago"
    assert age("whenever", now) == "whenever"
    assert age(None, now) == "-"
