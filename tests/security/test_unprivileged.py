"""Where it cannot sandbox (here: not root), ``nimbus up`` refuses to start with one
clear line naming ``--insecure-no-sandbox``; with that flag it starts, and warns."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.security.attacks import proc_uid
from tests.support import free_port, zip_of

NOBODY = 65534


@functools.cache
def as_nobody() -> tuple[str, ...]:
    """The command prefix that runs something as ``nobody``, with no capabilities.

    One exception, when needed: if this machine's interpreter lives where ``nobody``
    cannot reach it (e.g. pyenv under /root, mode 0700), CAP_DAC_READ_SEARCH (read and
    search any path, nothing else) lets it start at all. The server is not root either
    way, which is what it checks.
    """
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    plain = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    python = getattr(sys, "_base_executable", sys.executable)
    probe = f"import sys; assert sys.version_info[:3] == {tuple(sys.version_info[:3])!r}"
    for prefix in (
        plain,
        (*plain, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"),
    ):
        ok = subprocess.run(
            [*prefix, "--", python, "-c", probe], capture_output=True, cwd="/", check=False
        )
        if ok.returncode == 0:
            return (*prefix, "--")
    pytest.skip(f"{python} cannot be run as uid {NOBODY} here")


@pytest.fixture
def home() -> Iterator[Path]:
    """A directory the unprivileged user owns (pytest's own tmp dirs are root's, 0700)."""
    path = Path(tempfile.mkdtemp(prefix="nimbus-sec-nobody-", dir="/tmp"))
    os.chown(path, NOBODY, NOBODY)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def up_command(port: int, data: Path, *extra: str) -> list[str]:
    return [
        *as_nobody(),
        sys.executable,
        "-m",
        "nimbus",
        "up",
        "--port",
        str(port),
        "--data-dir",
        str(data),
        *extra,
    ]


ADMIN_KEY = "nmb_unprivileged_test_key_0123"


def environment(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NIMBUS_")}
    return {
        **env,
        "HOME": str(home),
        "XDG_DATA_HOME": str(home / "xdg"),
        "NIMBUS_ADMIN_KEY": ADMIN_KEY,
    }


def test_refuses_to_start_without_root(home: Path) -> None:
    port = free_port()
    proc = subprocess.run(
        up_command(port, home / "data"),
        capture_output=True,
        text=True,
        timeout=60,
        env=environment(home),
        cwd=home,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode != 0, f"nimbus up started as uid {NOBODY}:\n{output}"
    assert "Traceback" not in output, output
    lines = [line for line in proc.stderr.splitlines() if "--insecure-no-sandbox" in line]
    assert len(lines) == 1, f"expected one line naming --insecure-no-sandbox:\n{proc.stderr}"
    assert "root" in lines[0], f"the line does not say why: {lines[0]}"
    # It never listened.
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)


@dataclass
class Unprivileged:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def new_client(self, **kwargs: Any) -> httpx.Client:
        headers = {"authorization": f"Bearer {ADMIN_KEY}"}
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)


@pytest.fixture
def insecure(home: Path) -> Iterator[Unprivileged]:
    """``nimbus up --insecure-no-sandbox`` as ``nobody``, healthy."""
    port = free_port()
    log = home / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            up_command(port, home / "data", "--insecure-no-sandbox"),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=environment(home),
            cwd=home,
        )
    server = Unprivileged(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"exited with {proc.returncode}:\n{server.output()}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline, f"never became healthy:\n{server.output()}"
            time.sleep(0.05)
        yield server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_insecure_no_sandbox_starts_and_warns(insecure: Unprivileged) -> None:
    assert proc_uid(insecure.proc.pid) == NOBODY, "the server is not running unprivileged"
    warnings = [
        line
        for line in insecure.output().splitlines()
        if "WARNING" in line and "--insecure-no-sandbox" in line
    ]
    assert len(warnings) == 1, f"expected one warning line:\n{insecure.output()}"
    insecure.proc.send_signal(signal.SIGTERM)
    assert insecure.proc.wait(30) in (0, -signal.SIGTERM), insecure.output()
    assert "Traceback" not in insecure.output(), insecure.output()


def test_insecure_no_sandbox_runs_functions(insecure: Unprivileged) -> None:
    """Unsandboxed and unprivileged, instances are plain processes of the server's user."""
    spec, code = zip_of("hello", name="sec-insecure")
    with insecure.new_client(timeout=60) as client:
        r = client.post(
            "/v1/functions",
            data={"spec": json.dumps(spec)},
            files={"code": ("code.zip", code, "application/zip")},
        )
        assert r.status_code == 201, r.text
        r = client.post("/v1/functions/sec-insecure/invoke", content=b"{}")
        logs = client.get("/v1/functions/sec-insecure/logs").json()["records"]
    assert r.status_code == 200, r.text
    assert "X-Nimbus-Function-Error" not in r.headers, (
        f"an unprivileged --insecure-no-sandbox node cannot run a function: {r.text}\n"
        + "\n".join(rec["message"] for rec in logs)
    )
    assert r.json() == {"hello": "world"}
