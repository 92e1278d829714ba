"""The real ``nimbus`` command against a real server: the user's whole loop."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.support import FIXTURES, NimbusServer
from tests.support import nimbus_cli as nimbus


def test_init_deploy_invoke_logs_list_describe_delete(server: NimbusServer, tmp_path: Path) -> None:
    out = nimbus(server, "init", "cli-hello", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    fn = tmp_path / "cli-hello"
    assert (fn / "nimbus.yaml").is_file() and (fn / "app.py").is_file()

    out = nimbus(server, "deploy", str(fn))
    assert out.returncode == 0, out.stderr
    assert "Deployed cli-hello version 1" in out.stdout
    assert f"{server.url}/function/cli-hello" in out.stdout

    r = server.client.get("/function/cli-hello", params={"name": "ada"})
    assert r.status_code == 200 and "ada" in r.text

    out = nimbus(server, "invoke", "cli-hello", "--data", '{"name": "bob"}')
    assert out.returncode == 0, out.stderr
    assert "bob" in out.stdout

    event = tmp_path / "event.json"
    event.write_text(json.dumps({"name": "carol"}))
    out = nimbus(server, "invoke", "cli-hello", "--data", f"@{event}")
    assert out.returncode == 0 and "carol" in out.stdout

    deadline = time.monotonic() + 10
    while True:
        out = nimbus(server, "logs", "cli-hello")
        if out.stdout.count("REPORT RequestId") >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert out.returncode == 0 and out.stdout.count("REPORT RequestId") >= 3

    out = nimbus(server, "list")
    assert out.returncode == 0 and "cli-hello" in out.stdout
    out = nimbus(server, "describe", "cli-hello")
    assert out.returncode == 0 and "cli-hello" in out.stdout and "python3.11" in out.stdout
    out = nimbus(server, "describe", "cli-hello", "--json")
    assert json.loads(out.stdout)["version"] == 1

    # Redeploying the same directory publishes nothing new; a change publishes version 2.
    out = nimbus(server, "deploy", str(fn))
    assert "version 1" in out.stdout
    (fn / "nimbus.yaml").write_text(
        (fn / "nimbus.yaml").read_text().replace("memory: 128", "memory: 256")
    )
    out = nimbus(server, "deploy", str(fn))
    assert out.returncode == 0 and "version 2" in out.stdout, out.stdout + out.stderr

    out = nimbus(server, "delete", "cli-hello")
    assert out.returncode == 0 and "Deleted cli-hello" in out.stdout
    out = nimbus(server, "describe", "cli-hello")
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "does not exist" in out.stderr
    assert "Traceback" not in out.stderr


def test_removing_a_field_from_nimbus_yaml_resets_it(server: NimbusServer, tmp_path: Path) -> None:
    fn = tmp_path / "fn"
    fn.mkdir()
    (fn / "app.py").write_text((FIXTURES / "env-context" / "app.py").read_text())
    (fn / "nimbus.yaml").write_text(
        "name: cli-reset\nhandler: app.handler\nenvironment: {GREETING: hi}\n"
    )
    assert nimbus(server, "deploy", str(fn)).returncode == 0
    assert server.invoke("cli-reset").json()["greeting"] == "hi"
    (fn / "nimbus.yaml").write_text("name: cli-reset\nhandler: app.handler\n")
    assert nimbus(server, "deploy", str(fn)).returncode == 0
    assert server.invoke("cli-reset").json()["greeting"] is None


def test_user_errors_are_one_line_and_non_zero(server: NimbusServer, tmp_path: Path) -> None:
    cases = [
        ("invoke", "cli-nope"),
        ("deploy", str(tmp_path / "missing")),
        ("invoke", "cli-nope", "--data", "{bad json"),
        ("logs", "cli-nope"),
        ("delete", "cli-nope"),
    ]
    for args in cases:
        out = nimbus(server, *args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert out.stderr.startswith("error: "), (args, out.stderr)
        assert out.stderr.strip().count("\n") == 0, (args, out.stderr)
        assert "Traceback" not in out.stderr


def test_function_error_exits_non_zero(server: NimbusServer) -> None:
    assert server.deploy("fails", name="cli-fails").status_code == 201
    out = nimbus(server, "invoke", "cli-fails")
    assert out.returncode == 1
    assert "PaymentDeclined: card 4242 was declined" in out.stderr


def test_unreachable_server(tmp_path: Path) -> None:
    env = {**os.environ, "NIMBUS_URL": "http://127.0.0.1:9"}
    out = subprocess.run(
        [sys.executable, "-m", "nimbus", "list"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert out.returncode == 1
    assert "cannot reach Nimbus at http://127.0.0.1:9" in out.stderr
