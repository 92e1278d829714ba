"""Secrets: set once, read only by the instances of the functions that name them, never
returned by the API, encrypted on disk, rotated into running functions, and the
environment of a function redacted for readers who may not deploy."""

from __future__ import annotations

import secrets
from pathlib import Path

import httpx

from tests.support import NimbusServer, make_zip, nimbus_cli

# Read at init (module level, in the function's zygote) and at invoke.
APP = b"""
import os
AT_INIT = os.environ.get("DB_PASSWORD")

def handler(event, context):
    return {
        "at_init": AT_INIT,
        "now": os.environ.get("DB_PASSWORD"),
        "plain": os.environ.get("PLAIN"),
        "all": sorted(k for k in os.environ if k.startswith("DB_")),
    }
"""


def spec(name: str, **extra: object) -> dict[str, object]:
    return {"name": name, "runtime": "python3.11", "handler": "app.handler", **extra}


def put_secret(server: NimbusServer, name: str, value: str) -> httpx.Response:
    return server.client.put(f"/v1/secrets/{name}", json={"value": value})


def key_with(server: NimbusServer, *scopes: str) -> str:
    r = server.client.post("/v1/keys", json={"name": "secrets-test", "scopes": list(scopes)})
    assert r.status_code == 201, r.text
    return str(r.json()["secret"])


def test_a_secret_reaches_only_its_functions_instances(server: NimbusServer) -> None:
    value = "pw-" + secrets.token_urlsafe(16)
    r = put_secret(server, "sec-db-password", value)
    assert r.status_code == 201, r.text
    assert value not in r.text and r.json()["name"] == "sec-db-password"

    fn = spec("sec-uses-secret", secrets={"DB_PASSWORD": "sec-db-password"})
    r = server.create({**fn, "environment": {"PLAIN": "visible"}}, make_zip({"app.py": APP}))
    assert r.status_code == 201, r.text
    assert value not in r.text
    out = server.invoke("sec-uses-secret", {}).json()
    assert out == {"at_init": value, "now": value, "plain": "visible", "all": ["DB_PASSWORD"]}

    # A function that does not name it never sees it.
    assert server.create(spec("sec-no-secret"), make_zip({"app.py": APP})).status_code == 201
    assert server.invoke("sec-no-secret", {}).json()["now"] is None

    # No route returns the value: the function, the list, the secret itself.
    for path in ("/v1/functions/sec-uses-secret", "/v1/functions", "/v1/secrets"):
        body = server.client.get(path).text
        assert value not in body, path
    described = server.client.get("/v1/secrets/sec-db-password").json()
    assert described["used_by"] == ["sec-uses-secret"] and "value" not in described

    # Nor does the disk hold it in clear (the database, its WAL).
    for path in server.data_dir.glob("*.db*"):
        assert value.encode() not in path.read_bytes(), path.name


def test_a_changed_secret_reaches_the_running_function(server: NimbusServer) -> None:
    assert put_secret(server, "sec-rotated", "old-value").status_code == 201
    fn = spec("sec-rotating", secrets={"DB_PASSWORD": "sec-rotated"})
    assert server.create(fn, make_zip({"app.py": APP})).status_code == 201
    assert server.invoke("sec-rotating", {}).json()["now"] == "old-value"

    r = put_secret(server, "sec-rotated", "new-value")
    assert r.status_code == 200, r.text
    assert r.json()["used_by"] == ["sec-rotating"]
    out = server.invoke("sec-rotating", {}).json()
    assert (out["at_init"], out["now"]) == ("new-value", "new-value")


def test_a_secret_in_use_cannot_be_removed(server: NimbusServer) -> None:
    assert put_secret(server, "sec-in-use", "v").status_code == 201
    fn = spec("sec-holder", secrets={"DB_X": "sec-in-use"})
    assert server.create(fn, make_zip({"app.py": APP})).status_code == 201
    r = server.client.delete("/v1/secrets/sec-in-use")
    assert r.status_code == 409, r.text
    assert "sec-holder" in r.json()["error"]["message"]
    assert server.client.delete("/v1/functions/sec-holder").status_code == 204
    assert server.client.delete("/v1/secrets/sec-in-use").status_code == 204
    assert server.client.get("/v1/secrets/sec-in-use").status_code == 404


def test_a_function_naming_an_unknown_secret_is_refused(server: NimbusServer) -> None:
    fn = spec("sec-missing", secrets={"DB_PASSWORD": "sec-never-set"})
    r = server.create(fn, make_zip({"app.py": APP}))
    assert r.status_code == 400, r.text
    assert "'sec-never-set' does not exist" in r.json()["error"]["message"]
    assert server.client.get("/v1/functions/sec-missing").status_code == 404


def test_bad_secrets_are_refused(server: NimbusServer) -> None:
    for name, body in (
        ("bad%20name", {"value": "x"}),
        ("-dash-first", {"value": "x"}),
        ("ok-name", {"value": ""}),
        ("ok-name", {"value": 5}),
        ("ok-name", {"value": "x" * 40_000}),
    ):
        r = server.client.put(f"/v1/secrets/{name}", json=body)
        assert r.status_code == 400, (name, r.text)
        assert r.json()["error"]["code"] == "InvalidParameterValue"
    assert server.client.get("/v1/secrets/ok-name").status_code == 404


def test_environment_values_are_redacted_for_readers(server: NimbusServer) -> None:
    fn = spec("sec-env", environment={"API_TOKEN": "tok-123"})
    assert server.create(fn, make_zip({"app.py": APP})).status_code == 201
    read_key, deploy_key = key_with(server, "read"), key_with(server, "deploy")
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {read_key}"}) as c:
        for r in (c.get("/v1/functions/sec-env"), c.get("/v1/functions")):
            assert r.status_code == 200 and "tok-123" not in r.text, r.text
        env = c.get("/v1/functions/sec-env").json()["spec"]["environment"]
        assert env == {"API_TOKEN": "(redacted)"}
    with httpx.Client(base_url=server.url, headers={"authorization": f"Bearer {deploy_key}"}) as c:
        env = c.get("/v1/functions/sec-env").json()["spec"]["environment"]
        assert env == {"API_TOKEN": "tok-123"}


def test_the_cli_sets_lists_and_removes_secrets(server: NimbusServer, tmp_path: Path) -> None:
    value = "cli-" + secrets.token_urlsafe(8)
    source = tmp_path / "value.txt"
    source.write_text(value)
    r = nimbus_cli(server, "secrets", "set", "sec-cli", "--from-file", str(source))
    assert r.returncode == 0, r.stderr
    assert value not in r.stdout
    listed = nimbus_cli(server, "secrets", "list")
    assert listed.returncode == 0 and "sec-cli" in listed.stdout and value not in listed.stdout
    removed = nimbus_cli(server, "secrets", "rm", "sec-cli")
    assert removed.returncode == 0, removed.stderr
    again = nimbus_cli(server, "secrets", "rm", "sec-cli")
    assert again.returncode != 0 and "no secret named 'sec-cli'" in again.stderr
    assert "Traceback" not in again.stderr
