"""Shared by the message and file trigger tests: reading what the sink function
received, waiting on a trigger's state, and private brokers on free ports.

The sink (tests/fixtures/functions/trigger-sink) prints each record it gets as a
``RECORD <json>`` line; :func:`records` reads them back from its logs, in order.
The Lambda-code fixtures (``sqs-consumer``, ``s3-consumer``, ``iot-consumer``) print
``SQS <json>``, ``S3 <json>`` and ``IOT <json>`` lines: :func:`printed` reads those.

Private brokers are real server binaries from Debian's packages, started on a free
loopback port with their data in a temp dir, so a test can stop and restart its
broker without disturbing the machine's shared one (or other tests). Every one is
stopped by its pid.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import NimbusServer, free_port

SINK = "trigger-sink"


def records(server: NimbusServer, function: str) -> list[dict[str, Any]]:
    """Every record the sink function printed, oldest first."""
    return printed(server, function, "RECORD")


def printed(server: NimbusServer, function: str, tag: str) -> list[dict[str, Any]]:
    """Every ``<tag> <json>`` line ``function`` printed, oldest first."""
    out = []
    for rec in server.logs(function, limit=10000):
        message = rec.get("message", "")
        if message.startswith(f"{tag} "):
            out.append(json.loads(message.removeprefix(f"{tag} ")))
    return out


def wait_printed(
    server: NimbusServer, function: str, tag: str, count: int, timeout: float = 20
) -> list[dict[str, Any]]:
    """At least ``count`` ``<tag>`` lines printed by ``function``."""
    return list(
        wait_for(
            f"{count} {tag} lines from {function}",
            lambda: p if len(p := printed(server, function, tag)) >= count else None,
            timeout=timeout,
            server=server,
        )
    )


def bodies(server: NimbusServer, function: str) -> list[Any]:
    """The JSON bodies of the records the sink received (a body that is not JSON as is)."""
    out = []
    for record in records(server, function):
        try:
            out.append(json.loads(record.get("body") or "null"))
        except ValueError:
            out.append(record.get("body"))
    return out


def wait_for(
    what: str,
    check: Callable[[], Any],
    *,
    timeout: float = 20,
    server: NimbusServer | None = None,
) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            tail = server.output()[-3000:] if server is not None else ""
            pytest.fail(f"timed out after {timeout} s waiting for {what}\n{tail}")
        time.sleep(0.1)


def wait_records(
    server: NimbusServer, function: str, count: int, timeout: float = 20
) -> list[dict[str, Any]]:
    """At least ``count`` records received by ``function``."""
    return list(
        wait_for(
            f"{count} records at {function}",
            lambda: r if len(r := records(server, function)) >= count else None,
            timeout=timeout,
            server=server,
        )
    )


def trigger(server: NimbusServer, function: str, name: str) -> dict[str, Any]:
    """One trigger as ``GET /v1/functions/{function}/triggers`` shows it."""
    r = server.client.get(f"/v1/functions/{function}/triggers")
    assert r.status_code == 200, r.text
    found = [t for t in r.json()["triggers"] if t["name"] == name]
    assert found, r.json()
    return dict(found[0])


def wait_state(
    server: NimbusServer, function: str, name: str, state: str = "connected", timeout: float = 20
) -> dict[str, Any]:
    return dict(
        wait_for(
            f"trigger {name} of {function} to be {state}",
            lambda: (
                t if (t := trigger(server, function, name))["status"]["state"] == state else None
            ),
            timeout=timeout,
            server=server,
        )
    )


def deploy_sink(
    server: NimbusServer,
    name: str,
    *triggers: dict[str, Any],
    fixture: str = SINK,
    **spec: Any,
) -> None:
    """Deploy the sink (or another fixture) as ``name`` with these triggers."""
    r = server.deploy(fixture, name=name, triggers=list(triggers), **spec)
    assert r.status_code == 201, r.text


def wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class PrivateBroker:
    """A broker process of this test's own: ``start()``, ``stop()``, ``url``."""

    def __init__(self, directory: Path, argv: Callable[[int], list[str]], scheme: str) -> None:
        self.directory = directory
        self.port = free_port()
        self._argv = argv
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = directory / "broker.log"

    def start(self) -> PrivateBroker:
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self._argv(self.port), stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
            )
        try:
            wait_port(self.port)
        except RuntimeError as e:
            self.stop()
            raise RuntimeError(
                f"broker did not start: {self.log.read_text(errors='replace')}"
            ) from e
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@contextlib.contextmanager
def private_broker(
    directory: Path, argv: Callable[[int], list[str]], scheme: str
) -> Iterator[PrivateBroker]:
    broker = PrivateBroker(directory, argv, scheme).start()
    try:
        yield broker
    finally:
        broker.stop(signal.SIGKILL)


def env_url(variable: str, default: str) -> str:
    """A shared broker's address: overridable with an environment variable."""
    return os.environ.get(variable, default)
