"""A dependency's build script is untrusted code: it runs in the build sandbox, never on the
host as root with the server's environment.

The attacker is an sdist in the operator's local package directory with an in-tree
PEP 517 build backend: pip runs its ``build_wheel`` during the deploy. It looks
around (who am I, what can I read, what is in my environment, whom can I reach),
then builds a wheel whose module holds what it saw; the function imports it and
returns that.
"""

from __future__ import annotations

import io
import json
import os
import socket
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.attacks import ENV_MARKER, ENV_MARKER_NAME
from tests.support import NimbusServer, make_zip

BACKEND = r"""
import base64, hashlib, json, os, socket, zipfile

def _try(fn):
    try:
        return {"ok": True, "value": fn()}
    except Exception as e:
        return {"ok": False, "error": type(e).__name__, "errno": getattr(e, "errno", None)}

def _connect(port):
    def go():
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return "connected"
    return go

def _status(key):
    return [line for line in open("/proc/self/status") if line.startswith(key)][0].split()[1]

def _observe():
    ports = json.loads(open(os.path.join(os.path.dirname(__file__), "ports.json")).read())
    return {
        "ids": [os.getuid(), os.geteuid(), os.getgid()],
        "shadow": _try(lambda: open("/etc/shadow").read()[:20]),
        "host_passwd": _try(lambda: open("/etc/passwd").read()),
        "root_home": _try(lambda: os.listdir("/root")),
        "data_dir": _try(lambda: os.listdir(ports["data_dir"])),
        "environ": dict(os.environ),
        "server": _try(_connect(ports["server"])),
        "host_listener": _try(_connect(ports["listener"])),
        "write_root": _try(lambda: open("/usr/bin/evil", "w").write("x")),
        "cap_eff": _status("CapEff"),
        "no_new_privs": _status("NoNewPrivs"),
        "seccomp": _status("Seccomp:"),
        "pid1": _try(lambda: open("/proc/1/cmdline", "rb").read().decode(errors="replace")),
    }

def get_requires_for_build_wheel(config_settings=None):
    return []

def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    module = "OBSERVED = " + repr(json.dumps(_observe())) + "\n"
    dist = "evildep-0.1.dist-info"
    files = {
        "evildep.py": module.encode(),
        dist + "/METADATA": b"Metadata-Version: 2.1\nName: evildep\nVersion: 0.1\n",
        dist + "/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: evil\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(dist + "/RECORD,,")
    files[dist + "/RECORD"] = ("\n".join(record) + "\n").encode()
    name = "evildep-0.1-py3-none-any.whl"
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return name
"""

PYPROJECT = b"""[build-system]
requires = []
build-backend = "backend"
backend-path = ["."]

[project]
name = "evildep"
version = "0.1"
"""


def sdist(directory: Path, ports: dict[str, object]) -> None:
    """``evildep-0.1.tar.gz``: an sdist whose build backend is the attacker."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    members = {
        "evildep-0.1/pyproject.toml": PYPROJECT,
        "evildep-0.1/backend.py": BACKEND.encode(),
        "evildep-0.1/ports.json": json.dumps(ports).encode(),
        "evildep-0.1/PKG-INFO": b"Metadata-Version: 2.1\nName: evildep\nVersion: 0.1\n",
    }
    with tarfile.open(directory / "evildep-0.1.tar.gz", "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (directory / "evildep-0.1.tar.gz").chmod(0o644)


@pytest.fixture(scope="module")
def listener() -> Iterator[int]:
    """A TCP listener on the host's loopback: the build must not reach it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.fixture(scope="module")
def builder(tmp_path_factory: pytest.TempPathFactory, listener: int) -> Iterator[NimbusServer]:
    base = tmp_path_factory.mktemp("builds")
    links = base / "links"
    data = base / "data"
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(links), ENV_MARKER_NAME: ENV_MARKER}
    server = NimbusServer(data, env=env)
    sdist(links, {"server": server.port, "listener": listener, "data_dir": str(data)})
    try:
        yield server.start()
    finally:
        server.close()


def test_a_build_script_runs_sandboxed_and_sees_nothing_of_the_host(
    builder: NimbusServer,
) -> None:
    code = make_zip(
        {
            "app.py": b"import json, evildep\n\ndef handler(e, c):\n"
            b"    return json.loads(evildep.OBSERVED)\n",
            "requirements.txt": b"evildep==0.1\n",
        }
    )
    r = builder.create({"name": "sec-build", "handler": "app.handler"}, code)
    assert r.status_code == 201, r.text
    seen = builder.invoke("sec-build").json()
    # An unprivileged uid of its own (no function's, not root), no capabilities, the
    # instance seccomp filter, no_new_privs.
    uid = seen["ids"][0]
    assert seen["ids"] == [uid, uid, uid] and 0 < uid < 200000, seen["ids"]
    assert int(seen["cap_eff"], 16) == 0
    assert seen["no_new_privs"] == "1" and seen["seccomp"] == "2"
    # Nothing of the host to read, nowhere to write.
    assert not seen["shadow"]["ok"]
    assert seen["host_passwd"]["ok"] and "root:x:0:0" in seen["host_passwd"]["value"]
    assert len(seen["host_passwd"]["value"].splitlines()) == 2  # the sandbox's, not the host's
    assert not seen["data_dir"]["ok"]
    assert not seen["write_root"]["ok"]
    assert not seen["pid1"]["ok"], seen["pid1"]  # pid 1 (root) is not even visible
    # The server's environment stays the server's; only the operator's pip settings pass.
    environ = seen["environ"]
    assert ENV_MARKER not in json.dumps(environ)
    assert not [k for k in environ if k.startswith("NIMBUS_")]
    assert environ.get("PIP_NO_INDEX") == "1"
    assert os.environ.get("HOME", "/root") != environ.get("HOME")
    # No network to the host: not the server, not another listener on loopback.
    assert not seen["server"]["ok"] and not seen["host_listener"]["ok"], seen
