"""API keys and scopes on every route; the gateway's ``auth: key``; the bootstrap admin key;
no unauthenticated remote listener; TLS."""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from nimbus.config import Settings
from tests.support import NimbusServer, free_port, nimbus_cli, running


def key_with(server: NimbusServer, *scopes: str) -> str:
    r = server.client.post("/v1/keys", json={"name": "test", "scopes": list(scopes)})
    assert r.status_code == 201, r.text
    return str(r.json()["secret"])


def as_key(server: NimbusServer, key: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, timeout=30, headers=headers)


@pytest.fixture(scope="module")
def routes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[str, ...]]:
    """The route table, read from the app itself (so a new route is tested too)."""
    from nimbus.api.scopes import route_scopes
    from nimbus.server import Nimbus

    data = tmp_path_factory.mktemp("routes") / "data"
    node = Nimbus(Settings(data_dir=data, insecure_no_sandbox=True, admin_key="x" * 20))
    table = route_scopes(node.api)
    assert len(table) >= 19  # the API, invocations, triggers and keys routers
    return table


def concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "nope", path)


def test_every_route_but_healthz_needs_a_key(
    server: NimbusServer, routes: dict[tuple[str, str], tuple[str, ...]]
) -> None:
    with as_key(server, None) as anonymous, as_key(server, "nmb_wrong") as wrong:
        for (method, path), scopes in routes.items():
            url = concrete(path)
            for client in (anonymous, wrong):
                r = client.request(method, url)
                if path == "/healthz":
                    assert r.status_code == 200 and not scopes
                    continue
                assert r.status_code == 401, (method, path, r.status_code, r.text)
                assert r.json()["error"]["code"] == "Unauthorized"
                assert r.headers["www-authenticate"].startswith("Bearer")
        # Paths no route has are not a way around it either.
        assert anonymous.get("/v2/anything").status_code == 401


def test_each_route_needs_its_scope(
    server: NimbusServer, routes: dict[tuple[str, str], tuple[str, ...]]
) -> None:
    keys = {scope: key_with(server, scope) for scope in ("read", "invoke", "deploy")}
    implied = {"read": {"read"}, "invoke": {"invoke"}, "deploy": {"deploy", "read"}}
    for scope, key in keys.items():
        with as_key(server, key) as client:
            for (method, path), needed in routes.items():
                if path == "/healthz":
                    continue
                r = client.request(method, concrete(path))
                if implied[scope] & set(needed):
                    assert r.status_code not in (401, 403), (scope, method, path, r.text)
                else:
                    assert r.status_code == 403, (scope, method, path, r.status_code, r.text)
                    assert r.json()["error"]["code"] == "AccessDenied"


def test_keys_are_created_used_and_revoked_with_the_cli(server: NimbusServer) -> None:
    out = nimbus_cli(server, "keys", "create", "ci", "--scope", "deploy")
    assert out.returncode == 0, out.stderr
    secret = re.search(r"^  (nmb_\S+)$", out.stdout, re.M)
    key_id = re.search(r"Created key (NIMB\w+)", out.stdout)
    assert secret and key_id, out.stdout
    with as_key(server, secret.group(1)) as client:
        assert client.get("/v1/functions").status_code == 200
    listed = nimbus_cli(server, "keys", "list")
    assert key_id.group(1) in listed.stdout and "active" in listed.stdout
    assert secret.group(1) not in listed.stdout  # never shown again
    assert nimbus_cli(server, "keys", "revoke", key_id.group(1)).returncode == 0
    with as_key(server, secret.group(1)) as client:
        assert client.get("/v1/functions").status_code == 401
    assert "revoked" in nimbus_cli(server, "keys", "list").stdout
    # Without a key the CLI says what to do, in one line.
    env = {**os.environ, "NIMBUS_URL": server.url, "NIMBUS_API_KEY": "nmb_wrong"}
    bad = subprocess.run(
        [sys.executable, "-m", "nimbus", "list"], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: this needs an API key")


def test_keys_are_kept_hashed_and_sealed(server: NimbusServer) -> None:
    secret = key_with(server, "read")
    for name in ("keys.db", "keys.db-wal"):
        path = server.data_dir / name
        if path.exists():
            assert secret.encode() not in path.read_bytes()
            assert server.admin_key.encode() not in path.read_bytes()
    node_key = server.data_dir / "node.key"
    assert stat.S_IMODE(node_key.stat().st_mode) == 0o600 and len(node_key.read_bytes()) == 32


def test_a_function_with_auth_key_needs_an_invoke_key(server: NimbusServer) -> None:
    assert server.deploy("hello", name="sec-private", auth="key").status_code == 201
    assert server.deploy("hello", name="sec-public").status_code == 201
    invoke, read = key_with(server, "invoke"), key_with(server, "read")
    with as_key(server, None) as anonymous:
        assert anonymous.get("/function/sec-public").status_code == 200
        r = anonymous.get("/function/sec-private")
        assert r.status_code == 401 and r.json()["error"]["code"] == "Unauthorized"
        host = {"host": f"sec-private.localhost:{server.port}"}
        assert anonymous.get("/", headers=host).status_code == 401
        assert anonymous.post("/async-function/sec-private", content=b"{}").status_code == 401
    with as_key(server, read) as client:
        assert client.get("/function/sec-private").status_code == 403
    with as_key(server, invoke) as client:
        r = client.get("/function/sec-private")
        assert r.status_code == 200, r.text
        assert client.post("/async-function/sec-private", content=b"{}").status_code == 202


def test_the_admin_key_is_made_once_0600_and_used_by_the_cli(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NIMBUS_ADMIN_KEY"}
    server = NimbusServer(tmp_path / "data")
    server.env = env  # no NIMBUS_ADMIN_KEY: one is made
    try:
        server.start()
        path = server.data_dir / "admin.key"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        key = path.read_text().strip()
        assert len(key) >= 32
        assert f"admin key: {path}" in server.output()
        with as_key(server, key) as client:
            assert client.get("/v1/functions").status_code == 200
        # The CLI on the same machine finds it with the data dir.
        out = subprocess.run(
            [sys.executable, "-m", "nimbus", "list"],
            capture_output=True,
            text=True,
            env={**env, "NIMBUS_URL": server.url, "NIMBUS_DATA_DIR": str(server.data_dir)},
        )
        assert out.returncode == 0, out.stderr
        server.stop()
        server.start()  # a restart keeps the same key
        assert path.read_text().strip() == key
    finally:
        server.close()


def test_an_admin_key_file_and_a_changed_admin_key(tmp_path: Path) -> None:
    key_file = tmp_path / "admin.secret"
    key_file.write_text("nmb_from_a_file_0123456789\n")
    env = {k: v for k, v in os.environ.items() if k != "NIMBUS_ADMIN_KEY"}
    server = NimbusServer(tmp_path / "data", args=["--admin-key-file", str(key_file)])
    server.env = env
    try:
        server.start()
        with as_key(server, "nmb_from_a_file_0123456789") as client:
            assert client.get("/v1/functions").status_code == 200
        server.stop()
        key_file.write_text("nmb_replaced_9876543210\n")
        server.start()
        with as_key(server, "nmb_from_a_file_0123456789") as client:
            assert client.get("/v1/functions").status_code == 401  # the old one is gone
        with as_key(server, "nmb_replaced_9876543210") as client:
            assert client.get("/v1/functions").status_code == 200
    finally:
        server.close()


def test_no_authentication_only_on_loopback(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "nimbus",
            "up",
            "--host",
            "0.0.0.0",
            "--port",
            str(free_port()),
            "--data-dir",
            str(tmp_path / "data"),
            "--insecure-no-auth",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode != 0
    assert "refusing to serve without authentication on 0.0.0.0" in out.stderr
    assert "Traceback" not in out.stderr
    with running(tmp_path / "open", args=["--insecure-no-auth"]) as server:
        with as_key(server, None) as anonymous:
            assert anonymous.get("/v1/functions").status_code == 200
        assert "authentication is off" in server.output()


@pytest.fixture
def certificate(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    yield cert_path, key_path


def test_tls_on_the_listener(tmp_path: Path, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    server = NimbusServer(tmp_path / "data", args=["--tls-cert", str(cert), "--tls-key", str(key)])
    server.url = server.url.replace("http://", "https://")
    server.client = httpx.Client(
        base_url=server.url,
        verify=ssl.create_default_context(cafile=str(cert)),
        timeout=60,
        headers={"authorization": f"Bearer {server.admin_key}"},
    )
    try:
        server.start()
        assert server.client.get("/v1/functions").status_code == 200
        assert "Nimbus is up on https://" in server.output()
        with pytest.raises(httpx.HTTPError):
            httpx.get(server.url.replace("https://", "http://") + "/healthz", timeout=5)
    finally:
        server.close()
