"""Deploy, version, update and delete through the real API; every bad input is a clear 400."""

from __future__ import annotations

import io
import json
import os
import stat
import zipfile
from pathlib import Path

import pytest

from tests.support import FIXTURES, NimbusServer, make_zip, running, zip_of


def error_of(r: object) -> tuple[int, str, str]:
    body = r.json()  # type: ignore[attr-defined]
    return r.status_code, body["error"]["code"], body["error"]["message"]  # type: ignore[attr-defined]


def test_versions_update_and_delete(server: NimbusServer) -> None:
    r = server.deploy("echo", name="fn-ver")
    assert r.status_code == 201
    first = r.json()
    assert first["version"] == 1 and first["versions"][0]["version"] == 1
    assert server.deploy("echo", name="fn-ver").status_code == 409

    # Config only: a new version, same code.
    r = server.update("fn-ver", spec={"memory": 256, "environment": {"A": "1"}})
    assert r.status_code == 200, r.text
    second = r.json()
    assert second["version"] == 2 and second["spec"]["memory"] == 256
    assert second["code_sha256"] == first["code_sha256"]
    assert second["spec"]["timeout"] == first["spec"]["timeout"]  # untouched fields kept

    # Code only.
    _, code = zip_of("hello")
    r = server.update("fn-ver", code=code)
    assert r.status_code == 200
    third = r.json()
    assert third["version"] == 3 and third["code_sha256"] != first["code_sha256"]
    assert third["spec"]["memory"] == 256
    assert [v["version"] for v in third["versions"]] == [1, 2, 3]
    assert server.invoke("fn-ver", {"queryStringParameters": {"name": "v3"}}).json() == {
        "hello": "v3"
    }

    listed = [f["name"] for f in server.client.get("/v1/functions").json()["functions"]]
    assert "fn-ver" in listed

    assert server.client.delete("/v1/functions/fn-ver").status_code == 204
    assert server.client.get("/v1/functions/fn-ver").status_code == 404
    assert server.invoke("fn-ver").status_code == 404
    assert server.client.delete("/v1/functions/fn-ver").status_code == 404


def test_update_errors(server: NimbusServer) -> None:
    assert server.update("fn-missing", spec={"memory": 256}).status_code == 404
    assert server.deploy("echo", name="fn-upd").status_code == 201
    code, wire, msg = error_of(server.update("fn-upd"))
    assert (code, wire) == (400, "InvalidParameterValue") and "nothing to update" in msg
    code, _, msg = error_of(server.update("fn-upd", spec={"name": "other"}))
    assert code == 400 and "rename" in msg
    code, _, msg = error_of(server.update("fn-upd", spec={"timeout": 0}))
    assert code == 400 and "timeout" in msg
    assert server.client.get("/v1/functions/fn-upd").json()["version"] == 1  # nothing published


def test_update_replaces_instances_with_new_version(server: NimbusServer) -> None:
    assert server.deploy("env-context", name="fn-roll").status_code == 201
    assert server.invoke("fn-roll").json()["greeting"] == "hi"
    assert (
        server.update("fn-roll", spec={"environment": {"GREETING": "hello again"}}).status_code
        == 200
    )
    out = server.invoke("fn-roll").json()
    assert out["greeting"] == "hello again" and out["function_version"] == "2"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ({"name": "Bad_Name"}, "name: must start with a lowercase letter"),
        ({"name": "x" * 64}, "name:"),
        ({"name": "ok", "runtime": "cobol85"}, "unknown runtime 'cobol85'"),
        ({"name": "ok", "memory": 64}, "memory: must be between 128 and 10240 MB"),
        ({"name": "ok", "memory": 10241}, "memory: must be between 128 and 10240 MB"),
        ({"name": "ok", "timeout": 0}, "timeout: must be between 1 and 900 seconds"),
        ({"name": "ok", "timeout": 901}, "timeout: must be between 1 and 900 seconds"),
        ({"name": "ok", "handler": "nodot"}, "handler: must be 'module.function'"),
        ({"name": "ok", "colour": "blue"}, "colour: unknown field"),
        ({"name": "ok", "environment": {"AWS_LAMBDA_FUNCTION_NAME": "x"}}, "set by Nimbus"),
        ({}, "name: is required"),
    ],
)
def test_invalid_specs_are_rejected(
    server: NimbusServer, spec: dict[str, object], needle: str
) -> None:
    _, code = zip_of("hello")
    status, wire, msg = error_of(server.create(spec, code))
    assert (status, wire) == (400, "InvalidParameterValue")
    assert needle in msg, msg


def test_spec_not_json_and_missing_parts(server: NimbusServer) -> None:
    _, code = zip_of("hello")
    r = server.client.post("/v1/functions", data={"spec": "{nope"}, files={"code": ("c.zip", code)})
    assert error_of(r)[:2] == (400, "InvalidParameterValue")
    r = server.client.post("/v1/functions", data={"spec": json.dumps({"name": "nocode"})})
    status, wire, msg = error_of(r)
    assert (status, wire) == (400, "InvalidParameterValue") and "code" in msg


def _zip_with(info: zipfile.ZipInfo, data: bytes = b"x") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("app.py", "def handler(e, c):\n    return 1\n")
        z.writestr(info, data)
    return buf.getvalue()


def _link(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def _device(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFCHR | 0o666) << 16
    return info


@pytest.mark.parametrize(
    ("code", "needle"),
    [
        (_zip_with(zipfile.ZipInfo("/etc/evil.py")), "/etc/evil.py"),
        (_zip_with(zipfile.ZipInfo("../escape.py")), "../escape.py"),
        (_zip_with(zipfile.ZipInfo("pkg/../../escape.py")), "escape.py"),
        (_zip_with(_link("link.py"), b"/etc/shadow"), "link.py"),
        (_zip_with(_device("dev.py")), "dev.py"),
        (b"this is not a zip", "zip"),
        (make_zip({"other.py": b"x = 1\n"}), "module 'app' not found"),
    ],
)
def test_bad_code_is_rejected(server: NimbusServer, code: bytes, needle: str) -> None:
    status, wire, msg = error_of(server.create({"name": "badcode"}, code))
    assert (status, wire) == (400, "InvalidParameterValue"), msg
    assert needle in msg, msg
    assert server.client.get("/v1/functions/badcode").status_code == 404


def test_oversized_zip_is_rejected(tmp_path: Path, server: NimbusServer) -> None:
    # Random bytes do not compress: a 51 MB zip.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as z:
        z.writestr("app.py", "def handler(e, c):\n    return 1\n")
        z.writestr("blob.bin", os.urandom(51 * 1024 * 1024))
    status, wire, msg = error_of(server.create({"name": "toobig"}, buf.getvalue()))
    assert (status, wire) == (413, "RequestTooLarge") and "50" in msg


def test_zip_bomb_over_unpacked_limit_is_rejected(server: NimbusServer) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("app.py", "def handler(e, c):\n    return 1\n")
        z.writestr("zeros.bin", b"\0" * (251 * 1024 * 1024))
    status, _wire, msg = error_of(server.create({"name": "bomb"}, buf.getvalue()))
    assert status in (400, 413) and "250" in msg, msg


def test_code_is_read_only_and_content_addressed(server: NimbusServer) -> None:
    a = server.deploy("hello", name="fn-ca-a").json()
    b = server.deploy("hello", name="fn-ca-b").json()
    assert a["code_sha256"] == b["code_sha256"]
    code_dir = server.data_dir / "code" / a["code_sha256"]
    assert (code_dir / "app.py").is_file()
    assert not (code_dir / "app.py").stat().st_mode & 0o222
    assert not code_dir.stat().st_mode & 0o222


def test_requirements_install_into_a_shared_cached_layer(server: NimbusServer) -> None:
    r = server.deploy("with-deps", name="fn-deps-a")
    assert r.status_code == 201, r.text
    layer = r.json()["layer_sha256"]
    assert layer
    assert server.invoke("fn-deps-a").json() == {"dep": "from a dependency layer"}
    layer_dir = server.data_dir / "layers" / layer
    mtime = layer_dir.stat().st_mtime_ns
    r = server.deploy("with-deps", name="fn-deps-b")
    assert r.json()["layer_sha256"] == layer
    assert layer_dir.stat().st_mtime_ns == mtime  # reused, not reinstalled
    assert server.invoke("fn-deps-b").json() == {"dep": "from a dependency layer"}


def test_failing_install_fails_deploy_and_previous_version_keeps_serving(
    server: NimbusServer, tmp_path: Path
) -> None:
    assert server.deploy("hello", name="fn-pipfail").status_code == 201
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "app.py").write_text((FIXTURES / "hello" / "app.py").read_text())
    (broken / "nimbus.yaml").write_text("name: fn-pipfail\nhandler: app.handler\n")
    (broken / "requirements.txt").write_text("nimbus-no-such-package-xyz==9.9\n")
    _, code = zip_of(broken)
    status, wire, msg = error_of(server.update("fn-pipfail", code=code))
    assert (status, wire) == (400, "InvalidParameterValue")
    assert "nimbus-no-such-package-xyz" in msg and "requirements.txt" in msg
    desc = server.client.get("/v1/functions/fn-pipfail").json()
    assert desc["version"] == 1
    assert server.invoke("fn-pipfail", {"queryStringParameters": {"name": "still"}}).json() == {
        "hello": "still"
    }


def test_openapi_and_health(server: NimbusServer) -> None:
    spec = server.client.get("/openapi.json").json()
    assert "/v1/functions" in spec["paths"] and "/v1/functions/{name}/invoke" in spec["paths"]
    assert server.client.get("/healthz").json()["status"] == "ok"
    metrics = server.client.get("/metrics").text
    assert "nimbus_invocations_total" in metrics or "nimbus_instances" in metrics
    r = server.client.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "ResourceNotFound"


APP_OF = "def handler(event, context):\n    return {{'which': {which!r}}}\n"


def test_deleting_a_function_removes_code_no_other_function_uses(server: NimbusServer) -> None:
    spec = {"runtime": "python3.11", "handler": "app.handler"}
    own = server.create(
        {**spec, "name": "gc-own"}, make_zip({"app.py": APP_OF.format(which="own").encode()})
    ).json()["code_sha256"]
    shared_zip = make_zip({"app.py": APP_OF.format(which="shared").encode()})
    shared = server.create({**spec, "name": "gc-a"}, shared_zip).json()["code_sha256"]
    assert server.create({**spec, "name": "gc-b"}, shared_zip).status_code == 201
    for name in ("gc-own", "gc-a"):
        assert server.client.delete(f"/v1/functions/{name}").status_code == 204
    assert not (server.data_dir / "code" / own).exists()
    assert not (server.data_dir / "blobs" / "sha256" / own).exists()
    assert (server.data_dir / "code" / shared).is_dir()  # gc-b still uses it
    assert server.invoke("gc-b").json() == {"which": "shared"}


def test_code_storage_is_capped_and_a_restart_clears_leftovers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    args = ["--insecure-no-sandbox", "--max-code-storage-bytes", str(300_000)]
    spec = {"runtime": "python3.11", "handler": "app.handler"}

    def code(tag: str) -> bytes:  # ~100 KB that does not compress
        return make_zip(
            {"app.py": APP_OF.format(which=tag).encode(), "blob.bin": os.urandom(100_000)}
        )

    with running(data, args=args) as s:
        assert s.create({**spec, "name": "cap-a"}, code("a")).status_code == 201
        r = s.create({**spec, "name": "cap-b"}, code("b"))
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "CodeStorageExceeded"
        assert "code storage is full" in r.json()["error"]["message"]
        assert s.client.get("/v1/functions/cap-b").status_code == 404
        assert s.client.delete("/v1/functions/cap-a").status_code == 204
        assert s.create({**spec, "name": "cap-b"}, code("b")).status_code == 201
    crashed = data / "tmp" / "code-0123456789ab-crashed"
    crashed.mkdir(parents=True)
    (crashed / "half.py").write_text("half")
    with running(data, args=args) as s:
        assert not crashed.exists()
        assert s.invoke("cap-b").json() == {"which": "b"}
