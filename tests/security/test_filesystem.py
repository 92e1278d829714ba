"""Writes: only a function's private, size-capped /tmp is writable; its code and
everything else is read-only, and filling /tmp never reaches the host's disk."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import pytest

from tests.security.attacks import (
    PeakRss,
    assert_denied,
    assert_unharmed,
    attack,
    deploy,
    function_error,
    invoke,
)
from tests.support import FIXTURES, NimbusServer


def test_only_tmp_is_writable(server: NimbusServer) -> None:
    deploy(server, "sec-writable")
    result = attack(server, "sec-writable", {"attack": "writable_mounts"})
    assert result["writable"] == ["/tmp"], f"writable mount points: {result['tried']}"
    assert "/" in result["tried"] and "/var/task" in result["tried"], result["tried"]
    assert_unharmed(server)


@pytest.mark.parametrize(
    "path",
    ["/x", "/etc/passwd", "/etc/x", "/var/task/x", "/opt/python/x", "/dev/x", "/usr/x", "/proc/x"],
)
def test_writes_outside_tmp_fail(server: NimbusServer, path: str) -> None:
    name = "sec-write-outside"
    if server.client.get(f"/v1/functions/{name}").status_code == 404:
        deploy(server, name)
    result = attack(server, name, {"attack": "write", "paths": [path]})["results"]
    assert_denied(result[path], {"EROFS", "EACCES", "EPERM", "ENOENT"}, f"writing {path}")
    assert_denied(result["mkdir /pwned"], {"EROFS"}, "mkdir /pwned")
    assert not os.path.exists("/pwned")
    assert_unharmed(server)


def test_code_directory_is_read_only(server: NimbusServer) -> None:
    deploy(server, "sec-code-write")
    result = attack(server, "sec-code-write", {"attack": "code_write"})
    for what, outcome in result["results"].items():
        assert_denied(outcome, {"EROFS", "EACCES", "EPERM"}, f"{what} in /var/task")
    expected = hashlib.sha256((FIXTURES / "attack-probe" / "app.py").read_bytes()).hexdigest()
    assert result["sha256_before"] == result["sha256_after"] == expected
    # And on the host: the stored code is untouched.
    sha = server.client.get("/v1/functions/sec-code-write").json()["code_sha256"]
    stored = server.data_dir / "code" / sha
    assert hashlib.sha256((stored / "app.py").read_bytes()).hexdigest() == expected
    assert sorted(p.name for p in stored.iterdir()) == sorted(
        ["app.py", "nimbus.yaml", *(["__pycache__"] if (stored / "__pycache__").exists() else [])]
    )
    # A new instance still runs the same code.
    assert attack(server, "sec-code-write", {"attack": "hello"})["hello"] == "from the attacker"
    assert_unharmed(server)


@pytest.mark.parametrize(
    ("memory", "storage"),
    [
        pytest.param(128, None, id="defaults"),
        pytest.param(1024, None, id="memory-1024"),
        pytest.param(1024, 640, id="storage-640"),
    ],
)
def test_filling_tmp_stops_at_its_size(
    server: NimbusServer, memory: int, storage: int | None
) -> None:
    """/tmp is ``ephemeral_storage`` MB (512 by default). It is a tmpfs, so its pages count
    against the function's ``memory`` (documented in docs/architecture.md): with enough
    memory, writing past its size is ENOSPC; with less (the 128 MB default), the instance
    hits its memory limit first and dies with Runtime.OutOfMemory. Either way the host's
    disk never sees a byte and the function keeps working."""
    size_mb = storage or 512
    name = f"sec-fill-tmp-{memory}-{size_mb}"
    overrides: dict[str, Any] = {"memory": memory, "timeout": 60}
    if storage is not None:
        overrides["ephemeral_storage"] = storage
    deploy(server, name, **overrides)
    before = os.statvfs(server.data_dir)
    r = invoke(server, name, {"attack": "fill_tmp", "limit_mb": 4 * size_mb})
    after = os.statvfs(server.data_dir)
    error, body = function_error(r)
    if memory < size_mb:
        assert error == "OutOfMemory", f"{error}: {body}"
    else:
        assert error is None, f"filling a {size_mb} MB /tmp in a {memory} MB function: {error}"
        assert body["tmp_size_mb"] == size_mb, body
        assert body["failure"] is not None, f"wrote {body['written_mb']} MB without an error"
        assert body["failure"]["errno"] == "ENOSPC", body
        assert size_mb - 16 <= body["written_mb"] <= size_mb, body
    freed = (before.f_bavail - after.f_bavail) * before.f_frsize
    assert abs(freed) < 50 << 20, f"the host's disk changed by {freed >> 20} MB"
    # The function (a new or the same instance) keeps working.
    assert attack(server, name, {"attack": "hello"})["hello"] == "from the attacker"
    assert_unharmed(server)


def _disk_usage(path: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


@pytest.mark.parametrize("background", [False, True], ids=["in-the-handler", "after-answering"])
def test_output_cannot_fill_the_hosts_disk(server: NimbusServer, background: bool) -> None:
    """A function's output is stored on the host (its logs): 200 MB of it, written in the
    handler (capped at 10 MB an invocation) or by a thread after the handler answered,
    must not become 200 MB on the host's disk, nor in the server's memory."""
    assert server.proc is not None
    name = f"sec-log-flood-{'bg' if background else 'fg'}"
    deploy(server, name, timeout=30)
    before = _disk_usage(server.data_dir)
    with PeakRss(server.proc.pid) as rss:
        r = invoke(server, name, {"attack": "log_flood", "mb": 200, "background": background})
        assert function_error(r)[0] is None, r.text
        # A thread writes 200 MB in about a second; the logs are written every 50 ms.
        time.sleep(3 if background else 0.5)
    grown = (_disk_usage(server.data_dir) - before) >> 20
    assert grown < 50, f"200 MB of output became {grown} MB on the host's disk"
    assert rss.growth < 100, (
        f"the server's memory grew by {rss.growth} MB ({rss.start} -> {rss.peak} MB)"
    )
    assert attack(server, name, {"attack": "hello"})["hello"] == "from the attacker"
    assert_unharmed(server)
