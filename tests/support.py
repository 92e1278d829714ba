"""A real Nimbus server in a subprocess, for end-to-end tests (like uvicorn's run_server)."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from nimbus.executor.sandbox.baseroot import BaseRoot
from nimbus.packaging import package_directory

FIXTURES = Path(__file__).parent / "fixtures" / "functions"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def instance_pids(data_dir: Path) -> list[int]:
    """The node's zygote and instances: the zygote (and its short-lived helpers) carry a
    ``NIMBUS_NODE=<data dir>`` marker in their initial environment; a sandbox's
    processes show no environment at all (they clear it), but every one of them is in
    one of the node's cgroups; exec'd instances run with their working directory
    inside ``data_dir``."""
    found = set()
    root = str(data_dir.resolve())
    marker = f"NIMBUS_NODE={root}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                if marker in f.read().split(b"\0"):
                    found.add(int(entry))
                    continue
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if cwd.startswith(root):
            found.add(int(entry))
    for base in node_cgroups(data_dir):
        if base.endswith("-server"):
            continue  # the server itself, where it had to move (cgroup v2)
        for directory, _, files in os.walk(base):
            if "cgroup.procs" in files:
                with contextlib.suppress(OSError), open(f"{directory}/cgroup.procs") as f:
                    found.update(int(line) for line in f.read().split())
    return sorted(p for p in found if pid_alive(p))


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def node_cgroups(data_dir: Path) -> list[str]:
    """Cgroup directories a server with this data dir made (none once it stopped cleanly)."""
    node_id = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    found = []
    for hierarchy in ("memory", "cpu", "pids", "unified", ""):
        root = Path("/sys/fs/cgroup") / hierarchy
        # os.walk, not rglob: other tests' cgroups come and go while we look.
        for directory, subdirs, _ in os.walk(root):
            found += [
                os.path.join(directory, d) for d in subdirs if d.startswith(f"nimbus-{node_id}")
            ]
    return sorted(set(found))


def remove_cgroups(data_dir: Path) -> None:
    """What a killed server could not clean up: its cgroups (kill, then remove)."""
    if os.geteuid() != 0 or not node_cgroups(data_dir):
        return
    from nimbus.executor.sandbox.cgroups import CgroupUnavailable, detect

    node_id = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:12]
    with contextlib.suppress(CgroupUnavailable, OSError):
        driver = detect(node_id)
        driver.prepare()  # removes a previous run's leftovers
        driver.cleanup()


def processes_with(token: str) -> list[int]:
    """Live processes whose command line contains ``token``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if token.encode() in f.read() and pid_alive(int(entry)):
                    found.append(int(entry))
        except OSError:
            continue
    return found


def build_wheel(directory: Path, name: str = "nimbus_testdep", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel, so dependency installs need no network."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}.py": b"VALUE = 'from a dependency layer'\n",
        f"{dist}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
        ).encode(),
        f"{dist}/WHEEL": (
            b"Wheel-Version: 1.0\nGenerator: nimbus-tests\nRoot-Is-Purelib: true\n"
            b"Tag: py3-none-any\n"
        ),
    }
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{dist}/RECORD,,")
    files[f"{dist}/RECORD"] = ("\n".join(record) + "\n").encode()
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)  # builds run as an unprivileged uid of their own
    wheel = directory / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
    return wheel


def zip_of(fixture: str | Path, *, name: str | None = None) -> tuple[dict[str, Any], bytes]:
    directory = FIXTURES / fixture if isinstance(fixture, str) else fixture
    spec = yaml.safe_load((directory / "nimbus.yaml").read_text())
    if name is not None:
        spec["name"] = name
    return spec, package_directory(directory)


def make_zip(entries: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for path, data in entries.items():
            z.writestr(path, data)
    return buf.getvalue()


class NimbusServer:
    """``python -m nimbus up`` on a free port with its own data dir."""

    def __init__(
        self, data_dir: Path, *, env: dict[str, str] | None = None, args: list[str] | None = None
    ) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        #: The bootstrap admin key: the client sends it, the CLI gets it (NIMBUS_API_KEY).
        self.admin_key = "nmb_test_" + secrets.token_urlsafe(24)
        self.env = {**os.environ, "NIMBUS_ADMIN_KEY": self.admin_key, **(env or {})}
        self.admin_key = self.env["NIMBUS_ADMIN_KEY"]
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"server-{self.port}.log"
        self.client = httpx.Client(
            base_url=self.url,
            timeout=60,
            headers={"authorization": f"Bearer {self.admin_key}"},
        )

    def new_client(self, **kwargs: Any) -> httpx.Client:
        """Another client of this server, with its admin key (for other threads)."""
        headers = {"authorization": f"Bearer {self.admin_key}", **kwargs.pop("headers", {})}
        return httpx.Client(base_url=self.url, headers=headers, **kwargs)

    def start(self) -> NimbusServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nimbus",
                "up",
                "--port",
                str(self.port),
                "--data-dir",
                str(self.data_dir),
                *self.args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.close()
                raise RuntimeError(
                    f"nimbus up exited with {self.proc.returncode}:\n{self.output()}"
                )
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/healthz", timeout=1).status_code == 200:
                    return self
            time.sleep(0.05)
        raise RuntimeError(f"nimbus up did not become healthy:\n{self.output()}")

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.stop()
        if hasattr(self, "_log") and not self._log.closed:
            self._log.close()
        for pid in instance_pids(self.data_dir):  # never leave anything behind, even on failure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        remove_cgroups(self.data_dir)
        self.client.close()

    # -- API helpers ---------------------------------------------------------------------
    def deploy(
        self, fixture: str | Path, *, name: str | None = None, force: bool = False, **overrides: Any
    ) -> httpx.Response:
        spec, code = zip_of(fixture, name=name)
        spec.update(overrides)
        return self.create(spec, code, force=force)

    def create(self, spec: dict[str, Any], code: bytes, *, force: bool = False) -> httpx.Response:
        """``force``: publish even if the init fails (to test what such a version does)."""
        data = {"spec": json.dumps(spec)}
        if force:
            data["force"] = "true"
        return self.client.post(
            "/v1/functions", data=data, files={"code": ("code.zip", code, "application/zip")}
        )

    def update(
        self, name: str, spec: dict[str, Any] | None = None, code: bytes | None = None
    ) -> httpx.Response:
        data = {"spec": json.dumps(spec)} if spec is not None else {}
        files = {"code": ("code.zip", code, "application/zip")} if code is not None else None
        return self.client.put(f"/v1/functions/{name}", data=data, files=files)

    def invoke(self, name: str, event: Any = None, **kw: Any) -> httpx.Response:
        return self.client.post(
            f"/v1/functions/{name}/invoke", content=json.dumps(event or {}), **kw
        )

    def logs(self, name: str, **params: Any) -> list[dict[str, Any]]:
        r = self.client.get(f"/v1/functions/{name}/logs", params=params)
        r.raise_for_status()
        return list(r.json()["records"])

    def wait_logs(self, name: str, predicate: Any, timeout: float = 10) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while True:
            records = self.logs(name)
            if predicate(records) or time.monotonic() > deadline:
                return records
            time.sleep(0.05)


def nimbus_cli(
    server: NimbusServer, *args: str, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """The real ``nimbus`` command, pointed at ``server``, with its admin key."""
    env = {**os.environ, "NIMBUS_URL": server.url, "NIMBUS_API_KEY": server.admin_key}
    return subprocess.run(
        [sys.executable, "-m", "nimbus", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


@contextlib.contextmanager
def running(data_dir: Path, **kw: Any) -> Iterator[NimbusServer]:
    server = NimbusServer(data_dir, **kw)
    try:
        yield server.start()
    finally:
        server.close()


def base_root() -> BaseRoot:
    """The base root filesystem a server started by these tests runs on (built if needed)."""
    from nimbus.config import Settings
    from nimbus.server import ensure_base

    return ensure_base(Settings.from_env(os.environ))


PYPI = Path(__file__).parent / "fixtures" / "pypi"


def pypi_wheels() -> Path:
    """A local cache of the wheels the ``pkg-*`` fixtures need (tests/fixtures/pypi),
    downloaded from PyPI once per machine and shared by every test run and worker (a
    file lock); servers install from it offline (``PIP_NO_INDEX``/``PIP_FIND_LINKS``)."""
    import fcntl

    pins = hashlib.sha256(
        (PYPI / "requirements.txt").read_bytes() + (PYPI / "constraints.txt").read_bytes()
    ).hexdigest()[:12]
    base = Path("/var/cache/nimbus-tests") if os.geteuid() == 0 else Path.home() / ".cache"
    cache = base / f"pypi-{pins}"
    done = cache / ".complete"
    if done.exists():
        return cache
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f".pypi-{pins}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--quiet",
                    "--disable-pip-version-check",
                    "--only-binary=:all:",
                    "--dest",
                    str(cache),
                    "-r",
                    str(PYPI / "requirements.txt"),
                ],
                check=True,
                timeout=900,
            )
            for path in [cache, *cache.iterdir()]:
                path.chmod(0o755 if path.is_dir() else 0o644)  # builds run unprivileged
            done.touch()
    return cache
