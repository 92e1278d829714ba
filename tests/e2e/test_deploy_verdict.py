"""A deploy runs the new version's init before it takes traffic (the deploy-time verdict)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support import FIXTURES, NimbusServer, zip_of
from tests.support import nimbus_cli as nimbus


def test_a_broken_update_is_refused_and_the_previous_version_keeps_serving(
    server: NimbusServer,
) -> None:
    assert server.deploy("hello", name="vd-update").status_code == 201
    _, broken = zip_of("init-error")
    r = server.update("vd-update", code=broken)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "FunctionInitError"
    assert "version 2 of 'vd-update' was not published" in error["message"]
    assert "version 1 keeps serving" in error["message"]
    # The error the first request would have got, in Lambda's shape.
    assert error["details"]["errorType"] == "Runtime.ImportModuleError"
    assert "a_module_that_does_not_exist" in error["details"]["errorMessage"]
    described = server.client.get("/v1/functions/vd-update").json()
    assert described["version"] == 1 and [v["version"] for v in described["versions"]] == [1]
    assert server.client.get("/function/vd-update", params={"name": "ada"}).status_code == 200
    # A fixed version publishes as version 2.
    _, fixed = zip_of("echo")
    assert server.update("vd-update", code=fixed).json()["version"] == 2


def test_a_broken_new_function_is_not_created(server: NimbusServer) -> None:
    for fixture, error_type in (
        ("init-no-library", "OSError"),
        ("no-handler", "Runtime.HandlerNotFound"),
        ("init-syntax", "Runtime.UserCodeSyntaxError"),
    ):
        name = f"vd-{fixture}"
        r = server.deploy(fixture, name=name)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["details"]["errorType"] == error_type, r.text
        assert server.client.get(f"/v1/functions/{name}").status_code == 404
        assert server.client.get(f"/function/{name}").status_code == 404
    assert (
        "libnimbus-not-installed.so.1"
        in server.deploy("init-no-library", name="vd-lib").json()["error"]["details"][
            "errorMessage"
        ]
    )
    # The same name deploys once its code is fixed.
    assert server.deploy("hello", name="vd-init-syntax").status_code == 201


def test_force_publishes_a_broken_version(server: NimbusServer) -> None:
    r = server.deploy("init-error", name="vd-force", force=True)
    assert r.status_code == 201, r.text
    r = server.invoke("vd-force")
    assert r.headers["x-nimbus-function-error"] == "Init"


def with_deps(tmp_path: Path, name: str, requirement: str) -> Path:
    """A function with a dependency no other test asks for the same way (its own layer)."""
    fn = tmp_path / name
    fn.mkdir()
    (fn / "nimbus.yaml").write_text(f"name: {name}\nhandler: app.handler\n")
    (fn / "app.py").write_text((FIXTURES / "with-deps" / "app.py").read_text())
    (fn / "requirements.txt").write_text(requirement + "\n")
    return fn


def test_progress_streams_the_steps_and_pips_own_lines(
    server: NimbusServer, tmp_path: Path
) -> None:
    spec, code = zip_of(with_deps(tmp_path, "vd-progress", "nimbus-testdep>=0.9"))
    with server.client.stream(
        "POST",
        "/v1/functions",
        data={"spec": json.dumps(spec)},
        files={"code": ("code.zip", code, "application/zip")},
        headers={"accept": "application/x-ndjson"},
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("application/x-ndjson")
        events = [json.loads(line) for line in r.iter_lines() if line.strip()]
    steps = [e["step"] for e in events if "step" in e]
    assert steps[0] == "code" and "dependencies" in steps and steps[-1] == "init"
    pip_lines = [e["message"] for e in events if e.get("step") == "dependencies"]
    assert any("nimbus-testdep" in line or "nimbus_testdep" in line for line in pip_lines)
    assert events[-1]["result"]["name"] == "vd-progress"
    assert events[-1]["result"]["version"] == 1
    # A failure ends the stream with the error and the status it would have had.
    spec, code = zip_of("init-error", name="vd-progress-bad")
    with server.client.stream(
        "POST",
        "/v1/functions",
        data={"spec": json.dumps(spec)},
        files={"code": ("code.zip", code, "application/zip")},
        headers={"accept": "application/x-ndjson"},
    ) as r:
        last = json.loads(list(r.iter_lines())[-1])
    assert last["status"] == 400 and last["error"]["code"] == "FunctionInitError"


def test_the_cli_says_why_and_force_overrides(server: NimbusServer, tmp_path: Path) -> None:
    fn = tmp_path / "vd-cli"
    fn.mkdir()
    (fn / "nimbus.yaml").write_text("name: vd-cli\nhandler: app.handler\n")
    (fn / "app.py").write_text((FIXTURES / "hello" / "app.py").read_text())
    out = nimbus(server, "deploy", str(fn))
    assert out.returncode == 0, out.stderr
    (fn / "app.py").write_text("import a_module_nobody_has\n\ndef handler(e, c):\n    return 1\n")
    out = nimbus(server, "deploy", str(fn))
    assert out.returncode == 1
    assert "Runtime.ImportModuleError: Unable to import module 'app'" in out.stderr
    assert "version 1 keeps serving" in out.stderr
    assert "Traceback" not in out.stdout and "nimbus/" not in out.stderr
    assert server.client.get("/v1/functions/vd-cli").json()["version"] == 1
    out = nimbus(server, "deploy", "--force", str(fn))
    assert out.returncode == 0, out.stderr
    assert "Deployed vd-cli version 2" in out.stdout


def test_the_cli_shows_the_dependency_install(server: NimbusServer, tmp_path: Path) -> None:
    out = nimbus(server, "deploy", str(with_deps(tmp_path, "vd-cli-deps", "nimbus-testdep>=0.8")))
    assert out.returncode == 0, out.stderr
    # Piped (no terminal): each step on a line of its own, pip's lines indented under it.
    assert "Installing dependencies ..." in out.stdout
    assert "Running the init ..." in out.stdout
    assert any(line.startswith("  ") and "testdep" in line for line in out.stdout.splitlines())
