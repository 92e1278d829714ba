"""``make bench``: warm and cold invoke of a hello handler, Nimbus vs its peers.

One run, loopback only, load generators in other processes (``wrk``, and
bench/seqclient.py for sequential fresh-connection requests). Bounded in time
(about two and a half minutes). Every process started here is stopped by pid in a
``finally``, and the temporary directory is removed. The summary is printed and
written to bench/results/latest.md (plus latest.json, wrk-raw.txt and the servers'
logs; the directory is gitignored). See docs/benchmarks.md.

Phases:
1. Start the peers serving the same handler: functions-framework (PyPI) twice, its
   default server (gunicorn, 1 worker, 4 threads per CPU) and with WORKERS=<cores>
   (labelled "tuned"); serverless-offline 13 on serverless 3 (npm, installed by
   ``npm ci`` into .venv/bench-npm/ when missing; run offline: no org/app, telemetry
   and notifications off). Start ``nimbus up`` and, for the HTTP server stack
   comparison, the same Nimbus app under granian (bench/granian_app.py); deploy
   bench/functions to both.
2. Warm throughput: one wrk warm-up each, then ``ROUNDS`` rounds of the same wrk
   command against each server, interleaved, with the CPU each one used.
3. Peers stopped; latency at one connection: the gateway vs the ``/v1/.../invoke`` path,
   and the gateway vs calling a warm instance directly over its own socket with the
   instance protocol (bench/direct_invoke.py, another process).
4. Cold start: functions with ``keep_warm: 0`` (every request starts an instance),
   N sequential requests, each on a fresh connection, with a pause between them;
   the ``REPORT ... Init Duration`` log lines confirm each one was cold. Each new
   instance is a fork of the version's function zygote (init once); then the same
   with ``--no-function-zygotes`` (each instance imports its handler) and with
   ``--insecure-no-sandbox``, each on its own ``nimbus up``.

``python bench/run.py --freeze`` runs only the warm hello on a default node and on a
``--no-freeze-idle`` node side by side (what freezing idle instances costs), and writes
bench/results/freeze.md.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from nimbus.packaging import package_directory

BENCH = Path(__file__).resolve().parent
FUNCTIONS = BENCH / "functions"
RESULTS = BENCH / "results"
PEER_SOURCE = BENCH / "peer" / "ff_hello.py"
SEQCLIENT = BENCH / "seqclient.py"
DIRECT = BENCH / "direct_invoke.py"
#: serverless-offline's sources (package.json, package-lock.json, serverless.yml), committed.
SLS_SOURCE = BENCH / "peer" / "serverless-offline"
#: Where `npm ci` installs them: inside the venv, which is gitignored and `make clean` removes.
SLS_INSTALL = BENCH.parent / ".venv" / "bench-npm" / "serverless-offline"
#: Offline: no telemetry, no notifications (update checks), no dashboard (no org/app).
SLS_ENV = {"SLS_TELEMETRY_DISABLED": "1", "SLS_NOTIFICATIONS_MODE": "off"}
DIRECT_N = 2000  # sequential round trips per layer in bench/direct_invoke.py
#: The node under granian: ASGI, one worker, uvloop, as `nimbus up` runs uvicorn.
GRANIAN_ARGS = ["--interface", "asgi", "--factory", "--loop", "uvloop", "--workers", "1"]
HOST = "127.0.0.1"
#: The nodes' admin key (NIMBUS_ADMIN_KEY), new each run; the control plane needs it.
ADMIN_KEY = "nmb_bench_" + secrets.token_urlsafe(24)
EXPECTED_BODY = '{"hello":"world"}'

WRK_THREADS = 1
WRK_CONNS = 16
WRK_SECONDS = 5
WARMUP_SECONDS = 2
SOLO_SECONDS = 3  # the one-connection latency runs
ROUNDS = 3  # interleaved warm-throughput rounds per server
COLD_N = 50
SPACED_N = 30
SPACED_PAUSE = 0.3
COLD_PAUSE = 0.05


# -- small helpers --------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): with 50 samples, p99 is the largest."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine() -> dict[str, str]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    wrk_version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for pkg in ("functions-framework", "gunicorn", "flask", "granian", "uvicorn"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = "not installed"
    for pkg in ("serverless", "serverless-offline"):
        try:
            manifest = SLS_INSTALL / "node_modules" / pkg / "package.json"
            versions[pkg] = json.loads(manifest.read_text())["version"]
        except (OSError, ValueError, KeyError):
            versions[pkg] = "not installed"
    try:
        node = subprocess.run(["node", "--version"], capture_output=True, text=True)
        versions["node"] = node.stdout.strip() or "unknown"
    except OSError:
        versions["node"] = "not installed"
    import nimbus

    source = Path(nimbus.__file__).resolve().parent.parent
    repo = BENCH.parent
    git = ["git", "-C", str(repo)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run([*git, "status", "--porcelain", "src"], capture_output=True, text=True)
    return {
        "nimbus_source": str(source),
        "commit": commit.stdout.strip() or "unknown",
        "src_dirty": ("yes" if dirty.stdout.strip() else "no")
        if source == repo / "src"
        else "n/a (Nimbus not imported from this repository)",
        "date": dt.date.today().isoformat(),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "loadavg": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "busy_before": f"{busy_over(1.0):.0f}",
        "wrk": wrk_version.split("[")[0].strip() or "unknown",
        **versions,
    }


class Proc:
    """A child process in its own session, stopped by its pid (then its group) in finally."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        env: dict[str, str],
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=cwd,
        )

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 15) -> None:
        # Its process group (gunicorn's workers, ...), noted while the leader still holds the
        # group id, so that nothing else can be hit if the pid is reused afterwards.
        group = group_pids(self.p.pid) if self.p.poll() is None else []
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.p.kill()
                self.p.wait()
        for pid in group:
            if pid != self.p.pid and pgid_of(pid) == self.p.pid:  # still alive, same group
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        if not self._log.closed:
            self._log.close()

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def wait_http(proc: Proc, url: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.p.returncode}:\n{proc.output()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not answer {url} within {timeout} s:\n{proc.output()}")


def instance_pids(data_dir: Path) -> list[int]:
    """Processes whose working directory is inside ``data_dir``: Nimbus's instances."""
    found = []
    root = str(data_dir.resolve())
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/cwd").startswith(root):
                    found.append(int(entry))
    return found


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def descendants(root: int) -> dict[int, str]:
    """Every live descendant of ``root`` (instances, zygotes, ...) with its start time,
    so that a pid reused later is never mistaken for one of them."""
    children: dict[int, list[int]] = {}
    start: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None and fields[0] != "Z":
                children.setdefault(int(fields[1]), []).append(int(entry))
                start[int(entry)] = fields[19]
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = start[pid]
        todo.extend(children.get(pid, []))
    return found


def leader_first(leader: int) -> list[int]:
    """The process group of ``leader``, the leader first (pids wrap, so sorting is not
    enough to put gunicorn's arbiter or serverless-offline's node process first)."""
    return [leader, *(pid for pid in group_pids(leader) if pid != leader)]


def main_first(root: int) -> list[int]:
    """``root``, its direct children (granian's worker), then every other descendant."""
    rest = sorted(descendants(root))
    children = [pid for pid in rest if (_stat(pid) or ["", "0"])[1] == str(root)]
    return [root, *children, *(pid for pid in rest if pid not in children)]


def still_running(procs: dict[int, str]) -> list[int]:
    alive = []
    for pid, started in procs.items():
        fields = _stat(pid)
        if fields is not None and fields[0] != "Z" and fields[19] == started:
            alive.append(pid)
    return alive


def instance_memory(root: int) -> dict[str, float]:
    """Private memory (KiB, from smaps_rollup) of the warm instances (processes running
    as a function's uid, >= 200000) and of their inits (uid 0, pid 1 of each sandbox)."""
    private: list[float] = []
    for pid in descendants(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            status = Path(f"/proc/{pid}/status").read_text()
            uid = int(next(x for x in status.splitlines() if x.startswith("Uid:")).split()[1])
            if uid < 200_000:
                continue
            kib = 0
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                if line.startswith(("Private_Clean:", "Private_Dirty:")):
                    kib += int(line.split()[1])
            private.append(kib)
    return {
        "instances": len(private),
        "p50_kib": pct(private, 50) if private else float("nan"),
        "max_kib": max(private) if private else float("nan"),
    }


def rmtree(path: Path) -> None:
    """Remove a tree that holds read-only directories (Nimbus unpacks code read-only)."""

    def make_writable(func: Any, p: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
        func(p)

    if path.exists():
        shutil.rmtree(path, onerror=make_writable)


# -- CPU accounting ---------------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int, int]:
    """(busy, total, steal) jiffies over all CPUs, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    return total - idle, total, fields[7]


def busy_over(seconds: float) -> float:
    """How busy all CPUs were (%) over the next ``seconds``."""
    b0, t0, _ = machine_ticks()
    time.sleep(seconds)
    b1, t1, _ = machine_ticks()
    return 100 * (b1 - b0) / max(1, t1 - t0)


def proc_ticks(pids: list[int]) -> dict[int, int]:
    """utime + stime (jiffies) of each pid still alive."""
    out = {}
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = int(fields[11]) + int(fields[12])
    return out


def pgid_of(pid: int) -> int:
    """The process group of ``pid``, or -1 if it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[2])
    except (OSError, IndexError, ValueError):
        return -1


def group_pids(pgid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:
                    found.append(int(entry))
    return sorted(found)


# -- wrk --------------------------------------------------------------------------------------
_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"not a wrk duration: {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


@dataclass
class Wrk:
    command: str
    rps: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    max_ms: float = 0.0
    requests: int = 0
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""
    #: During the run: all CPUs busy (%), steal (%), wrk's own CPU seconds, and the CPU
    #: seconds of each server process (pid order as given by the caller's ``pids``).
    busy_pct: float = float("nan")
    steal_pct: float = float("nan")
    wrk_cpu_s: float = float("nan")
    server_cpu_s: list[float] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def wrk(
    url: str,
    *,
    conns: int,
    seconds: int,
    script: Path | None = None,
    pids: Callable[[], list[int]] | None = None,
) -> Wrk:
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    watched = pids() if pids is not None else []
    before = proc_ticks(watched)
    m0, ru0 = machine_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    m1, ru1 = machine_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    after = proc_ticks(watched)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr}{out.stdout}")
    text = out.stdout
    shown = " ".join(a if a != str(script) else script.name for a in argv) if script else None
    r = Wrk(command=shown or " ".join(argv), raw=text)
    total = max(1, m1[1] - m0[1])
    r.busy_pct = 100 * (m1[0] - m0[0]) / total
    r.steal_pct = 100 * (m1[2] - m0[2]) / total
    r.wrk_cpu_s = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    r.server_cpu_s = [(after.get(p, 0) - before.get(p, 0)) / CLK_TCK for p in watched]
    r.rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    r.requests = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", text, re.M)
        setattr(r, f"p{q}_ms", _ms(m.group(1)) if m else float("nan"))
    m = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", text, re.M)
    r.max_ms = _ms(m.group(1)) if m else float("nan")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    r.non_2xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    if m:
        r.socket_errors = dict(
            zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True)
        )
    return r


# -- sequential client --------------------------------------------------------------------------
@dataclass
class Seq:
    command: str
    latencies: list[float]
    statuses: list[int]
    unexpected: int

    def p(self, q: float) -> float:
        return pct(self.latencies, q)

    @property
    def ok(self) -> int:
        return sum(1 for s in self.statuses if 200 <= s < 300)


def seqclient(url: str, n: int, pause: float, expect: str = EXPECTED_BODY) -> Seq:
    argv = [sys.executable, str(SEQCLIENT), "--url", url, "-n", str(n), "--pause", str(pause)]
    argv += ["--expect", expect]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"seqclient failed: {out.stderr}")
    data = json.loads(out.stdout)
    shown = f"python bench/seqclient.py --url {url} -n {n} --pause {pause}"
    return Seq(shown, data["latencies_ms"], data["statuses"], data["unexpected"])


# -- servers under load -------------------------------------------------------------------------
@dataclass
class Target:
    """One server measured with the same wrk command, ``ROUNDS`` times, interleaved."""

    label: str
    url: str
    command: str
    pids: Callable[[], list[int]]
    runs: list[Wrk] = field(default_factory=list)
    processes: int = 0
    warmup_requests: int = 0
    #: nimbus (uvicorn), granian (the same node under granian), ff, sls: how its CPU is shown.
    kind: str = "ff"

    def median(self) -> Wrk:
        return sorted(self.runs, key=lambda w: w.rps)[len(self.runs) // 2]


def start_peer(tmp: Path, label: str, extra_env: dict[str, str]) -> tuple[Proc, Target]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WORKERS", "THREADS", "DEBUG")}
    env.update(extra_env)
    exe = str(Path(sys.executable).with_name("functions-framework"))
    argv = [exe, "--target", "hello", "--source", str(PEER_SOURCE), "--host", HOST]
    argv += ["--port", str(port)]
    proc = Proc(label, argv, tmp / f"peer-{port}.log", env)
    shown_env = " ".join(f"{k}={v}" for k, v in extra_env.items())
    command = (
        "functions-framework --target hello --source bench/peer/ff_hello.py "
        f"--host {HOST} --port <free>"
    )
    target = Target(
        label=label,
        url=f"http://{HOST}:{port}/function/hello",
        command=(shown_env + " " if shown_env else "") + command,
        pids=lambda: leader_first(proc.p.pid),
    )
    return proc, target


def ensure_sls() -> str | None:
    """Install serverless + serverless-offline (``npm ci``) when missing or when the lock
    changed. None when ready, else why the peer cannot run (the report says so)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        return "node/npm not installed"
    lock = (SLS_SOURCE / "package-lock.json").read_bytes()
    installed = SLS_INSTALL / "package-lock.json"
    binary = SLS_INSTALL / "node_modules" / ".bin" / "serverless"
    if binary.exists() and installed.exists() and installed.read_bytes() == lock:
        return None
    log(f"npm ci: serverless + serverless-offline into {SLS_INSTALL}")
    SLS_INSTALL.mkdir(parents=True, exist_ok=True)
    for name in ("package.json", "package-lock.json"):
        shutil.copyfile(SLS_SOURCE / name, SLS_INSTALL / name)
    # --ignore-scripts: serverless's postinstall only prints; nothing is fetched at run time.
    argv = ["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--loglevel=error"]
    out = subprocess.run(argv, cwd=SLS_INSTALL, capture_output=True, text=True, timeout=600)
    if out.returncode != 0 or not binary.exists():
        installed.unlink(missing_ok=True)
        return f"npm ci failed ({out.returncode}): {(out.stderr or out.stdout)[-500:]}"
    return None


def start_sls(tmp: Path) -> tuple[Proc, Target]:
    """``serverless offline start`` on a service directory made of bench/peer/
    serverless-offline/serverless.yml and the very handler file Nimbus serves."""
    service = tmp / "sls-service"
    service.mkdir()
    shutil.copyfile(SLS_SOURCE / "serverless.yml", service / "serverless.yml")
    shutil.copyfile(FUNCTIONS / "hello" / "app.py", service / "app.py")
    (service / "node_modules").symlink_to(SLS_INSTALL / "node_modules")
    port, lambda_port = free_port(), free_port()
    env = dict(os.environ)
    env.update(SLS_ENV)
    # serverless-offline spawns `python3` (from `runtime: python3.11`) through a shell: this
    # venv's interpreter (3.11), first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    argv = [str(SLS_INSTALL / "node_modules" / ".bin" / "serverless"), "offline", "start"]
    argv += ["--host", HOST, "--httpPort", str(port), "--lambdaPort", str(lambda_port)]
    argv += ["--noPrependStageInUrl"]
    proc = Proc("serverless-offline", argv, tmp / "sls.log", env, cwd=service)
    target = Target(
        label="serverless-offline (serverless 3, Node + 1 Python worker per concurrent request)",
        url=f"http://{HOST}:{port}/hello",
        command=" ".join(f"{k}={v}" for k, v in SLS_ENV.items())
        + " serverless offline start --host 127.0.0.1 --httpPort <free> --lambdaPort <free> "
        "--noPrependStageInUrl (service: bench/peer/serverless-offline/serverless.yml + "
        "bench/functions/hello/app.py)",
        pids=lambda: leader_first(proc.p.pid),
        kind="sls",
    )
    return proc, target


def sls_workers(proc: Proc) -> int:
    """serverless-offline's Python worker processes (not the shells that start them)."""
    n = 0
    for pid in group_pids(proc.p.pid):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"invoke.py" in b" ".join(argv) and not argv[0].endswith(b"sh"):
                n += 1
    return n


def granian_missing() -> str | None:
    exe = Path(sys.executable).with_name("granian")
    if not exe.exists():
        return "granian is not installed (the `bench` extra: granian==2.8.7)"
    return None


# -- Nimbus -------------------------------------------------------------------------------------
class Nimbus:
    """A Nimbus node: ``nimbus up`` (uvicorn), or with ``server="granian"`` the same
    ``nimbus.server.Nimbus`` ASGI app under granian (bench/granian_app.py)."""

    def __init__(self, tmp: Path, *extra: str, server: str = "uvicorn") -> None:
        suffix = "".join(extra).replace("-", "_") + ("_granian" if server == "granian" else "")
        self.data_dir = tmp / ("nimbus-data" + suffix)
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        # Kept in bench/results/ (gitignored) so a failed run can be looked at.
        RESULTS.mkdir(exist_ok=True)
        if server == "granian":
            name = "nimbus-granian.log"
        else:
            name = "nimbus-server.log" if not extra else "nimbus-server-2.log"
        self.log_path = RESULTS / name
        self.log_path.unlink(missing_ok=True)
        env = dict(os.environ, NIMBUS_ADMIN_KEY=ADMIN_KEY)
        if server == "granian":
            env["NIMBUS_DATA_DIR"] = str(self.data_dir)
            argv = [str(Path(sys.executable).with_name("granian")), *GRANIAN_ARGS]
            argv += ["--host", HOST, "--port", str(self.port), "--working-dir", str(BENCH)]
            argv += ["granian_app:app"]
        else:
            argv = [sys.executable, "-m", "nimbus", "up", "--host", HOST]
            argv += ["--port", str(self.port), "--data-dir", str(self.data_dir), *extra]
        self.proc = Proc(f"nimbus ({server})", argv, self.log_path, env)
        auth = {"authorization": f"Bearer {ADMIN_KEY}"}
        self.client = httpx.Client(base_url=self.url, timeout=60, headers=auth)

    def wait(self) -> None:
        wait_http(self.proc, f"{self.url}/healthz")

    def deploy(self, directory: Path, name: str | None = None, **overrides: Any) -> dict[str, Any]:
        spec = yaml.safe_load((directory / "nimbus.yaml").read_text())
        if name is not None:
            spec["name"] = name
        spec.update(overrides)
        r = self.client.post(
            "/v1/functions",
            data={"spec": json.dumps(spec)},
            files={"code": ("code.zip", package_directory(directory), "application/zip")},
        )
        if r.status_code != 201:
            raise RuntimeError(f"deploy {spec['name']} failed: {r.status_code} {r.text}")
        return dict(r.json())

    def describe(self, name: str) -> dict[str, Any]:
        return dict(self.client.get(f"/v1/functions/{name}").raise_for_status().json())

    def last_seq(self, name: str) -> int:
        r = self.client.get(f"/v1/functions/{name}/logs", params={"limit": 1})
        return int(r.raise_for_status().json()["next"])

    def records(self, name: str, after: int = 0, limit: int = 10000) -> list[dict[str, Any]]:
        """The latest ``limit`` log records of ``name`` after record ``after``, oldest first."""
        params = {"limit": limit, "after": after}
        r = self.client.get(f"/v1/functions/{name}/logs", params=params)
        return list(r.raise_for_status().json()["records"])

    def reports(self, name: str, after: int = 0) -> list[str]:
        """The REPORT lines of ``name`` logged after record ``after``."""
        params = {"limit": 10000, "after": after}
        r = self.client.get(f"/v1/functions/{name}/logs", params=params)
        messages = [rec["message"] for rec in r.raise_for_status().json()["records"]]
        return [m for m in messages if m.startswith("REPORT ")]

    def stop(self) -> int:
        """Stop the server (SIGTERM); return how many of its descendants it left running
        (those are then killed: never leave an instance behind)."""
        self.client.close()
        before = descendants(self.proc.p.pid) if self.proc.alive() else {}
        self.proc.stop(timeout=30)
        time.sleep(0.2)
        left = set(still_running(before)) | set(instance_pids(self.data_dir))
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return len(left)


def init_durations(reports: list[str]) -> list[float]:
    """The start of each cold REPORT: its ``Init Duration`` (an instance that ran its own
    init), or its ``Restore Duration`` (a fork of an initialised function zygote)."""
    out = []
    for line in reports:
        m = re.search(r"(?:Init|Restore) Duration: ([\d.]+) ms", line)
        if m:
            out.append(float(m.group(1)))
    return out


def lagging_instances(records: list[dict[str, Any]]) -> tuple[int, set[str]]:
    """(instances seen, instances that began an invocation before the previous one's
    REPORT): the trailer of an invocation is logged before it returns unless its output
    sentinel is late or lost, so a lagging instance has stalled for the 1 s wait."""
    awaiting: dict[str, str] = {}
    seen: set[str] = set()
    lagging: set[str] = set()
    for rec in records:
        inst, msg = rec["instance"], rec["message"]
        if not inst:
            continue
        seen.add(inst)
        if msg.startswith("START RequestId: "):
            if inst in awaiting:
                lagging.add(inst)
            awaiting[inst] = rec["request_id"]
        elif msg.startswith("REPORT RequestId: ") and awaiting.get(inst) == rec["request_id"]:
            del awaiting[inst]
    return len(seen), lagging


def wait_instances(nimbus: Nimbus, name: str, total: int, timeout: float = 5) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = int(nimbus.describe(name)["instances"]["total"])
        if n == total or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def direct_invoke(gateway_url: str, data_dir: Path) -> dict[str, Any]:
    """bench/direct_invoke.py in its own process: sequential latencies of the HTTP gateway
    (keep-alive) and of the instance protocol called directly (see that file)."""
    argv = [sys.executable, str(DIRECT), "--gateway-url", gateway_url]
    argv += ["--data-dir", str(data_dir), "-n", str(DIRECT_N)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=180)
    if out.returncode != 0:
        raise RuntimeError(f"direct_invoke failed ({out.returncode}): {out.stderr[-3000:]}")
    data: dict[str, Any] = json.loads(out.stdout)
    data["command"] = (
        f"python bench/direct_invoke.py --gateway-url {HOST}:<port>/function/hello "
        f"--data-dir <tmp> -n {DIRECT_N}"
    )
    return data


def check_body(label: str, url: str) -> None:
    body = httpx.get(url, timeout=30).text
    if body != EXPECTED_BODY:
        raise RuntimeError(f"{label} answered {body!r} at {url}")


def run_all(tmp: Path) -> dict[str, Any]:
    cores = str(os.cpu_count() or 1)
    peers: list[tuple[Proc, Target]] = []
    nimbus: Nimbus | None = None
    granian: Nimbus | None = None
    sls: tuple[Proc, Target] | None = None
    out: dict[str, Any] = {"skipped": {}}
    try:
        # -- start everything ------------------------------------------------------------------
        peers.append(start_peer(tmp, "functions-framework, default (gunicorn, 1 worker)", {}))
        peers.append(
            start_peer(tmp, f"functions-framework, WORKERS={cores} (tuned)", {"WORKERS": cores})
        )
        why = ensure_sls()
        if why is None:
            sls = start_sls(tmp)
            peers.append(sls)
        else:
            out["skipped"]["serverless-offline"] = why
            log(f"serverless-offline not measured: {why}")
        for proc, t in peers:
            try:
                wait_http(proc, t.url, timeout=60)
                check_body(t.label, t.url)
            except RuntimeError as e:
                if t.kind != "sls":
                    raise
                # The npm peer is optional: its failure is reported, the rest still runs.
                out["skipped"]["serverless-offline"] = f"it did not serve: {str(e)[-800:]}"
                log(f"serverless-offline not measured: {e}")
                proc.stop()
                sls = None
        peers = [(proc, t) for proc, t in peers if t.kind != "sls" or sls is not None]
        nimbus = Nimbus(tmp)
        t0 = time.monotonic()
        nimbus.wait()
        out["startup_s"] = time.monotonic() - t0
        hello_dir, heavy_dir = FUNCTIONS / "hello", FUNCTIONS / "heavy"
        nimbus.deploy(hello_dir)
        cold_scaling = {"min": 0, "max": 16, "keep_warm": 0}
        nimbus.deploy(hello_dir, name="hello-cold", scaling=cold_scaling)
        nimbus.deploy(heavy_dir, name="heavy", scaling=cold_scaling)
        out["specs"] = {n: nimbus.describe(n)["spec"] for n in ("hello", "hello-cold", "heavy")}
        url = f"{nimbus.url}/function/hello"
        check_body("nimbus", url)
        nb = nimbus  # for the lambda below (mypy: not Optional)
        nimbus_target = Target(
            label="Nimbus `/function/hello`",
            url=url,
            command=f"python -m nimbus up --host {HOST} --port <free> --data-dir <tmp>",
            pids=lambda: [nb.proc.p.pid, *sorted(descendants(nb.proc.p.pid))],
            kind="nimbus",
        )
        granian_target: Target | None = None
        why = granian_missing()
        if why is None:
            granian = Nimbus(tmp, server="granian")
            granian.wait()
            granian.deploy(hello_dir)
            g_url = f"{granian.url}/function/hello"
            check_body("nimbus under granian", g_url)
            gr = granian
            granian_target = Target(
                label="Nimbus under granian (ASGI, 1 worker, uvloop)",
                url=g_url,
                command=f"NIMBUS_DATA_DIR=<tmp> granian {' '.join(GRANIAN_ARGS)} --host {HOST} "
                "--port <free> --working-dir bench granian_app:app",
                pids=lambda: main_first(gr.proc.p.pid),
                kind="granian",
            )
        else:
            out["skipped"]["granian"] = why
            log(f"granian not measured: {why}")
        targets = [nimbus_target]
        targets += [granian_target] if granian_target is not None else []
        targets += [t for _, t in peers]

        # -- warm throughput: warm-up, then ROUNDS interleaved rounds -----------------------------
        for t in targets:
            log(f"warm-up {WARMUP_SECONDS} s: {t.label}")
            t.warmup_requests = wrk(t.url, conns=WRK_CONNS, seconds=WARMUP_SECONDS).requests
        out["instances_before"] = nimbus.describe("hello")["instances"]
        for r in range(ROUNDS):
            order = targets[r % len(targets) :] + targets[: r % len(targets)]
            for t in order:
                log(f"round {r + 1}/{ROUNDS}, wrk {WRK_SECONDS} s: {t.label}")
                t.runs.append(wrk(t.url, conns=WRK_CONNS, seconds=WRK_SECONDS, pids=t.pids))
        out["instances_after"] = nimbus.describe("hello")["instances"]
        out["memory"] = instance_memory(nimbus.proc.p.pid)
        for proc, t in peers:
            t.processes = len(group_pids(proc.p.pid))
            if t.kind == "sls":
                out["sls_workers"] = sls_workers(proc)
            proc.stop()
        if sls is not None:
            # serverless-offline logs "(λ: hello) RequestId: ..." for every invocation of the
            # Python handler: proof that each response came from it.
            text = sls[0].output()
            out["sls_invocations"] = text.count("(λ: hello) RequestId:")
            out["sls_log_tail"] = text[-1500:]
            t = sls[1]
            out["sls_responses"] = 1 + sum(w.requests for w in t.runs) + t.warmup_requests
        if granian is not None:
            out["granian_instances"] = granian.describe("hello")["instances"]
            out["granian_leftover"] = granian.stop()
            out["granian_log"] = granian.proc.output()
            out["granian_exit"] = granian.proc.p.returncode
            granian = None
        out["targets"] = targets

        # -- one connection: gateway vs API invoke (peers stopped) -------------------------------
        log(f"nimbus: one-connection latency, gateway and API, {SOLO_SECONDS} s each")
        script = tmp / "invoke.lua"
        script.write_text(
            f'wrk.method = "POST"\nwrk.body = "{{}}"\n'
            f'wrk.headers["Authorization"] = "Bearer {ADMIN_KEY}"\n'
        )
        out["solo_gateway"] = wrk(url, conns=1, seconds=SOLO_SECONDS)
        invoke_url = f"{nimbus.url}/v1/functions/hello/invoke"
        out["solo_api"] = wrk(invoke_url, conns=1, seconds=SOLO_SECONDS, script=script)

        # -- gateway overhead over calling a warm instance directly (another process) ----------
        log(f"gateway vs the instance protocol directly, {DIRECT_N} sequential calls per layer")
        out["direct"] = direct_invoke(url, tmp / "direct-data")

        # -- sequential, fresh connection per request: warm baseline, then cold ---------------
        log(f"nimbus: {COLD_N} sequential requests each to hello (warm), hello-cold, heavy")
        seq_before = nimbus.last_seq("hello")
        out["seq_warm"] = seqclient(url, COLD_N, COLD_PAUSE)
        for name in ("hello-cold", "heavy"):
            out[f"cold_{name}"] = seqclient(f"{nimbus.url}/function/{name}", COLD_N, COLD_PAUSE)
        # Spaced out, so the previous instance's teardown (its namespaces, its cgroup) is
        # over before the next cold start: the sandbox's own set-up cost, alone.
        out["spaced_hello-cold"] = seqclient(
            f"{nimbus.url}/function/hello-cold", SPACED_N, SPACED_PAUSE
        )
        for name in ("hello-cold", "heavy"):
            out[f"instances_left_{name}"] = wait_instances(nimbus, name, 0)
            reports = nimbus.reports(name)
            out[f"reports_{name}"] = len(reports)
            out[f"inits_{name}"] = init_durations(reports)
        time.sleep(0.2)  # a trailer can follow its response if the output sentinel is late
        warm_reports = nimbus.reports("hello", after=seq_before)
        out["lag_seq"] = lagging_instances(nimbus.records("hello", after=seq_before))
        out["seq_warm_reports"] = len(warm_reports)
        out["seq_warm_inits"] = len(init_durations(warm_reports))
        out["healthz"] = nimbus.client.get("/healthz").json()

        # -- the same cold starts without the sandbox: what the sandbox costs ------------------
        out["leftover_instances"] = nimbus.stop()
        out["server_log"] = nimbus.proc.output()
        out["server_exit"] = nimbus.proc.p.returncode
        nimbus = None
        log("nimbus --no-function-zygotes: the same cold starts, each instance importing itself")
        out.update(cold_elsewhere(tmp, "--no-function-zygotes", "nozygote", cold_scaling))
        log("nimbus --insecure-no-sandbox: the same cold starts, unsandboxed")
        out.update(cold_elsewhere(tmp, "--insecure-no-sandbox", "plain", cold_scaling, spaced=True))
    finally:
        for proc, _ in peers:
            proc.stop()
        if granian is not None:  # only when something failed before the normal stop
            granian.stop()
        if nimbus is not None:  # only when something failed before the normal stop
            out["leftover_instances"] = nimbus.stop()
            out["server_log"] = nimbus.proc.output()
            out["server_exit"] = nimbus.proc.p.returncode
    return out


def cold_elsewhere(
    tmp: Path, flag: str, prefix: str, scaling: dict[str, Any], *, spaced: bool = False
) -> dict[str, Any]:
    """The cold starts again on a ``nimbus up <flag>`` of their own; keys ``<prefix>_…``."""
    out: dict[str, Any] = {}
    other = Nimbus(tmp, flag)
    try:
        other.wait()
        for name, directory in (
            ("hello-cold", FUNCTIONS / "hello"),
            ("heavy", FUNCTIONS / "heavy"),
        ):
            other.deploy(directory, name=name, scaling=scaling)
            out[f"{prefix}_cold_{name}"] = seqclient(
                f"{other.url}/function/{name}", COLD_N, COLD_PAUSE
            )
        if spaced:
            out[f"{prefix}_spaced_hello-cold"] = seqclient(
                f"{other.url}/function/hello-cold", SPACED_N, SPACED_PAUSE
            )
        for name in ("hello-cold", "heavy"):
            out[f"{prefix}_inits_{name}"] = init_durations(other.reports(name))
    finally:
        out[f"{prefix}_leftover"] = other.stop()
    return out


# -- report -------------------------------------------------------------------------------------
def f1(x: float) -> str:
    return f"{x:,.1f}" if x == x else "n/a"


def f2(x: float) -> str:
    return f"{x:.2f}" if x == x else "n/a"


def errors_of(runs: list[Wrk]) -> str:
    non_2xx = sum(w.non_2xx for w in runs)
    sock: dict[str, int] = {}
    for w in runs:
        for k, v in w.socket_errors.items():
            sock[k] = sock.get(k, 0) + v
    shown = ", ".join(f"{k} {v}" for k, v in sock.items() if v) or "0"
    return f"{non_2xx} / {shown}"


def cpu_of(w: Wrk, kind: str) -> str:
    if not w.server_cpu_s:
        return "n/a"
    first, *rest = w.server_cpu_s
    if kind == "nimbus":
        return f"nimbus up {first:.2f} + {len(rest)} child processes {sum(rest):.2f} in all"
    if kind == "granian" and rest:
        worker, *others = rest
        return (
            f"granian main {first:.2f} + worker {worker:.2f} + {len(others)} other processes "
            f"{sum(others):.2f} in all"
        )
    if kind == "sls":
        return (
            f"node {first:.2f} + {len(rest)} processes (Python workers and their shells) "
            f"{sum(rest):.2f} in all"
        )
    # The group leader (lowest pid) is gunicorn's arbiter; the others are its workers.
    return f"arbiter {first:.2f} + workers " + ", ".join(f"{x:.2f}" for x in rest)


def unattributed(w: Wrk, nproc: int) -> float:
    """Busy CPU time that was neither the server's nor wrk's: the kernel's loopback work,
    steal, and any other process on the machine (another test run would show here)."""
    busy = w.busy_pct / 100 * nproc * WRK_SECONDS
    return busy - sum(w.server_cpu_s) - w.wrk_cpu_s


def server_problems(text: str) -> list[str]:
    keep = re.compile(r"Traceback|ERROR|CRITICAL|Exception|WARNING", re.I)
    return [line for line in text.splitlines() if keep.search(line)]


def stack_section(nb: dict[str, Any], nimbus_t: Target, targets: list[Target]) -> list[str]:
    """uvicorn vs granian serving the same Nimbus app."""
    g = next((t for t in targets if t.kind == "granian"), None)
    if g is None:
        return []
    u_med, g_med = nimbus_t.median(), g.median()
    return [
        "",
        "## HTTP server stack: the same Nimbus app under uvicorn and granian",
        "",
        "`nimbus up` serves `nimbus.server.Nimbus` with uvicorn (uvloop + httptools, one "
        "process); the granian row serves the same ASGI app (with its lifespan: zygote, "
        "sandbox, stores) with granian's ASGI interface, one worker, uvloop. Both sandboxed, "
        f"same hello code, in the rounds above. Median req/s: uvicorn {f1(u_med.rps)}, granian "
        f"{f1(g_med.rps)}: granian ÷ uvicorn = **{f2(g_med.rps / u_med.rps)}** "
        "(per round: "
        + ", ".join(
            f2(b.rps / a.rps) if a.rps else "n/a"
            for a, b in zip(nimbus_t.runs, g.runs, strict=True)
        )
        + f"); p50 {f2(u_med.p50_ms)} vs {f2(g_med.p50_ms)} ms.",
    ]


def sls_section(nb: dict[str, Any], targets: list[Target]) -> list[str]:
    t = next((t for t in targets if t.kind == "sls"), None)
    if t is None:
        return []
    return [
        "",
        "## serverless-offline: was the Python handler called?",
        "",
        f"Its log has {nb['sls_invocations']:,} `(λ: hello) RequestId` lines (one per "
        f"invocation of the Python handler) for {nb['sls_responses']:,} responses that wrk and "
        "the body check counted (wrk does not count responses still in flight when it stops, "
        'so the log can have a few more). The body was checked to be `{"hello":"world"}` '
        f"before the load. Python worker processes (invoke.py) after the rounds: "
        f"{nb.get('sls_workers', 'n/a')}.",
    ]


def direct_section(nb: dict[str, Any]) -> list[str]:
    d = nb["direct"]
    gw, direct = d["gateway_http"], d["direct"]
    wrk_p50_us = nb["solo_gateway"].p50_ms * 1000
    rows = [
        ("HTTP `GET /function/hello` on `nimbus up`, keep-alive, raw-socket client", gw),
        ("`Invoker.invoke()` in-process (scheduler + executor + logs + metrics)", d["invoker"]),
        (
            "`Instance.invoke()` in-process (channel + START/END/REPORT + output pipe)",
            d["executor"],
        ),
        ("INVOKE → RESULT frames on the instance's own socket (blocking client)", direct),
    ]
    lines = [
        "",
        f"## Gateway overhead over calling the instance directly ({d['n']} sequential calls each)",
        "",
        "bench/direct_invoke.py, its own process. The HTTP row runs first, against the "
        "`nimbus up` above (peers stopped, instances warm). Then that process starts a second "
        "node in-process (sandboxed, same launcher and zygote as `nimbus up`), starts one hello "
        "instance itself the way `Executor.start` does (SPEC frame, READY) and sends it INVOKE "
        f"frames carrying the event the gateway builds for this request ({d['event_bytes']} "
        "bytes). One call in flight at a time; latencies in µs.",
        "",
        "| layer | p50 µs | p90 µs | p99 µs | mean µs | min µs | unexpected bodies |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, r in rows:
        lines.append(
            f"| {label} | {r['p50']:.0f} | {r['p90']:.0f} | {r['p99']:.0f} | {r['mean']:.0f} "
            f"| {r['min']:.0f} | {r['unexpected']} |"
        )
    overhead = gw["p50"] - direct["p50"]
    lines += [
        "",
        f"**Gateway overhead, p50: {gw['p50']:.0f} - {direct['p50']:.0f} = {overhead:+.0f} µs** "
        f"({'within' if overhead <= 500 else 'over'} the 0.5 ms budget). With wrk -c1 as the "
        f"HTTP client instead (the one-connection table, p50 {wrk_p50_us:.0f} µs): "
        f"{wrk_p50_us - direct['p50']:+.0f} µs. Where it goes, p50 to p50: HTTP server and "
        f"gateway {gw['p50'] - d['invoker']['p50']:+.0f} µs, scheduler and metrics "
        f"{d['invoker']['p50'] - d['executor']['p50']:+.0f} µs, the executor's instance "
        f"bookkeeping and asyncio channel {d['executor']['p50'] - direct['p50']:+.0f} µs.",
    ]
    return lines


def report(info: dict[str, str], nb: dict[str, Any]) -> str:
    targets: list[Target] = nb["targets"]
    nimbus_t, peers = targets[0], targets[1:]
    warm = nimbus_t.median()
    cmd = f"wrk -t{WRK_THREADS} -c{WRK_CONNS} -d{WRK_SECONDS}s --latency"
    lines = [
        f"# Nimbus benchmark, {info['date']}",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"Python {info['python']}, {info['wrk']}, functions-framework "
        f"{info['functions-framework']} (gunicorn {info['gunicorn']}, Flask {info['flask']}), "
        f"uvicorn {info['uvicorn']}, granian {info['granian']}, serverless "
        f"{info['serverless']} + serverless-offline {info['serverless-offline']} on Node.js "
        f"{info['node']}. Loopback only. Load average at start: {info['loadavg']}; CPU busy "
        f"in the second before the run: {info['busy_before']} %.",
        "",
        f"Nimbus imported from `{info['nimbus_source']}`; repository HEAD {info['commit']}, "
        f"uncommitted changes under src/: {info['src_dirty']}.",
        "",
        f"## Warm throughput: `{cmd}`",
        "",
        f"{ROUNDS} rounds, servers interleaved (order rotated each round); the median round "
        "by req/s is shown, with every round's req/s. Nimbus ÷ peer uses the medians; "
        "'same round' divides the runs of each round.",
        "",
        "| server | req/s (median) | req/s per round | p50 ms | p90 ms | p99 ms | max ms "
        "| non-2xx / socket errors (all rounds) | Nimbus ÷ this | same round |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |",
    ]
    for t in targets:
        w = t.median()
        per_round = ", ".join(f"{x.rps:,.0f}" for x in t.runs)
        if t is nimbus_t:
            label = f"{t.label} ({nb['instances_before']['total']} warm instances)"
            ratio, same = "-", "-"
        else:
            label = t.label
            if t.kind == "granian":
                label += f" ({nb['granian_instances']['total']} warm instances)"
            ratio = f"**{f2(warm.rps / w.rps)}**" if w.rps else "n/a"
            same = ", ".join(
                f2(a.rps / b.rps) if b.rps else "n/a"
                for a, b in zip(nimbus_t.runs, t.runs, strict=True)
            )
        lines.append(
            f"| {label} | {f1(w.rps)} | {per_round} | {f2(w.p50_ms)} | {f2(w.p90_ms)} "
            f"| {f2(w.p99_ms)} | {f2(w.max_ms)} | {errors_of(t.runs)} | {ratio} | {same} |"
        )
    lines += [
        "",
        f"Each server got one {WARMUP_SECONDS} s run of the same wrk command first (not counted). "
        f"All {len(targets)} servers were up during these rounds; those not under load were "
        "idle.",
    ]
    for what, why in nb["skipped"].items():
        lines.append(f"**{what} not measured**: {why}.")
    lines += [
        "",
        f"CPU during each server's median run ({info['nproc']} CPUs x {WRK_SECONDS} s = "
        f"{int(info['nproc']) * WRK_SECONDS} CPU-s available):",
        "",
        "| server | machine busy % | of which steal % | wrk CPU-s | server CPU-s "
        "| unattributed CPU-s |",
        "| --- | ---: | ---: | ---: | --- | ---: |",
    ]
    for t in targets:
        w = t.median()
        lines.append(
            f"| {t.label} | {f1(w.busy_pct)} | {f1(w.steal_pct)} | {f2(w.wrk_cpu_s)} "
            f"| {cpu_of(w, t.kind)} | {f2(unattributed(w, int(info['nproc'])))} |"
        )
    lines += stack_section(nb, nimbus_t, targets)
    lines += sls_section(nb, targets)
    lines += [
        "",
        f"## Cold start: {COLD_N} sequential requests, fresh connection each, "
        f"{int(COLD_PAUSE * 1000)} ms apart",
        "",
        "Latency is client-side (bench/seqclient.py, another process), connect to last byte, "
        "through the gateway. With `keep_warm: 0` the instance stops when its invocation "
        "ends, so every request starts an instance process; the REPORT column checks that "
        "(a fork of the function zygote reports a `Restore Duration`, an instance that "
        "imports its handler itself an `Init Duration`).",
        "",
        "| function | ok | p50 ms | p90 ms | p99 ms | min ms | max ms "
        "| REPORTs of a cold start | Init or Restore Duration p50 ms (server) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows: list[tuple[str, Seq, str | None]] = [
        ("hello (warm baseline, keep_warm 300)", nb["seq_warm"], None),
        ("hello-cold (hello, keep_warm 0), sandboxed", nb["cold_hello-cold"], "hello-cold"),
        ("heavy (stdlib imports, keep_warm 0), sandboxed", nb["cold_heavy"], "heavy"),
        (
            "hello-cold, sandboxed, `--no-function-zygotes`",
            nb["nozygote_cold_hello-cold"],
            "nozygote-hello-cold",
        ),
        ("heavy, sandboxed, `--no-function-zygotes`", nb["nozygote_cold_heavy"], "nozygote-heavy"),
        ("hello-cold, `--insecure-no-sandbox`", nb["plain_cold_hello-cold"], "plain-hello-cold"),
        ("heavy, `--insecure-no-sandbox`", nb["plain_cold_heavy"], "plain-heavy"),
    ]
    for label, sq, name in rows:
        if name is None:
            cold_col = f"{nb['seq_warm_inits']} of {nb['seq_warm_reports']}"
            init_col = "-"
        elif name.startswith(("plain-", "nozygote-")):
            prefix, _, base = name.partition("-")
            inits = nb[f"{prefix}_inits_{base}"]
            cold_col = f"{len(inits)} of {len(inits)}"
            init_col = f2(pct(inits, 50)) if inits else "n/a"
        else:
            inits = nb[f"inits_{name}"]
            cold_col = f"{len(inits)} of {nb[f'reports_{name}']}"
            init_col = f2(pct(inits, 50)) if inits else "n/a"
        lines.append(
            f"| {label} | {sq.ok}/{len(sq.latencies)} | {f2(sq.p(50))} | {f2(sq.p(90))} "
            f"| {f2(sq.p(99))} | {f2(min(sq.latencies))} | {f2(max(sq.latencies))} "
            f"| {cold_col} | {init_col} |"
        )
    lines += [
        "",
        f"Percentiles are nearest-rank: with {COLD_N} samples p99 is the slowest request.",
        "",
        "What function zygotes save on a cold start (sandboxed p50 minus the same with "
        "`--no-function-zygotes`, each on its own `nimbus up` in this run): "
        f"hello {nb['cold_hello-cold'].p(50) - nb['nozygote_cold_hello-cold'].p(50):+.2f} ms, "
        f"heavy {nb['cold_heavy'].p(50) - nb['nozygote_cold_heavy'].p(50):+.2f} ms. "
        "What the sandbox itself adds (both without function zygotes, which need the "
        "sandbox: `--no-function-zygotes` p50 minus `--insecure-no-sandbox` p50): "
        f"hello {nb['nozygote_cold_hello-cold'].p(50) - nb['plain_cold_hello-cold'].p(50):+.2f}"
        f" ms, heavy {nb['nozygote_cold_heavy'].p(50) - nb['plain_cold_heavy'].p(50):+.2f} ms. "
        "At that spacing each cold start overlaps the teardown of the previous instance "
        "(its namespaces and cgroup, which the kernel frees in the background). "
        f"Spaced {int(SPACED_PAUSE * 1000)} ms apart ({SPACED_N} requests to hello-cold), so "
        "that teardown is over: sandboxed (function zygotes) p50 "
        f"{f2(nb['spaced_hello-cold'].p(50))} ms, unsandboxed "
        f"{f2(nb['plain_spaced_hello-cold'].p(50))} ms.",
        "",
        f"## One connection: gateway vs API invoke path (`wrk -t1 -c1 -d{SOLO_SECONDS}s`)",
        "",
        "| path | req/s | p50 ms | p99 ms | max ms | non-2xx / socket errors |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, key in (
        ("GET /function/hello (gateway)", "solo_gateway"),
        ("POST /v1/functions/hello/invoke (API, body `{}`)", "solo_api"),
    ):
        w = nb[key]
        lines.append(
            f"| {label} | {f1(w.rps)} | {f2(w.p50_ms)} | {f2(w.p99_ms)} | {f2(w.max_ms)} "
            f"| {errors_of([w])} |"
        )
    diff = nb["solo_gateway"].p50_ms - nb["solo_api"].p50_ms
    lines += [
        "",
        f"Gateway p50 minus API p50: {diff * 1000:+.0f} µs. Both call the same invoker.",
    ]
    lines += direct_section(nb)
    problems = server_problems(nb["server_log"])
    graceful = "Application shutdown complete" in nb["server_log"]
    lines += [
        "",
        "## Checks",
        "",
        f"- `nimbus up` healthy after {nb['startup_s']:.2f} s; after SIGTERM: exit status "
        f"{nb['server_exit']} (uvicorn re-raises the signal once shut down), graceful "
        f"shutdown logged: {graceful}; server's processes left running afterwards: "
        f"{nb['leftover_instances']}.",
        f"- hello instances before/after the warm rounds: {nb['instances_before']} / "
        f"{nb['instances_after']}.",
        f"- private memory of a warm hello instance after the warm rounds (smaps_rollup, "
        f"{nb['memory']['instances']} instances): p50 {nb['memory']['p50_kib'] / 1024:.2f} MiB, "
        f"max {nb['memory']['max_kib'] / 1024:.2f} MiB (each also has an init process, pid 1 "
        "of its sandbox).",
        f"- instances left after the cold runs: hello-cold "
        f"{nb['instances_left_hello-cold']}, heavy {nb['instances_left_heavy']}.",
        f"- unexpected bodies (sequential runs): warm {nb['seq_warm'].unexpected}, "
        f"hello-cold {nb['cold_hello-cold'].unexpected}, heavy {nb['cold_heavy'].unexpected}.",
        "- peer processes while serving (process group): "
        + "; ".join(f"{t.label}: {t.processes}" for t in peers if t.kind in ("ff", "sls"))
        + ".",
        f"- server log lines matching error/warning/traceback: {len(problems)}",
        "- instances that began an invocation before the previous one's REPORT was logged "
        "(a lost or late output sentinel), in the sequential warm run: "
        f"{len(nb['lag_seq'][1])} of {nb['lag_seq'][0]}.",
        "- slowest Nimbus request per warm round (wrk max): "
        + ", ".join(f"{w.max_ms:,.0f} ms" for w in nimbus_t.runs)
        + (
            " — **some warm requests took about a second** (see docs/benchmarks.md, "
            "'Known problem')"
            if any(w.max_ms >= 900 for w in nimbus_t.runs)
            or nb["solo_gateway"].p50_ms >= 900
            or nb["seq_warm"].p(50) >= 900
            else ""
        )
        + ".",
    ]
    lines += [f"  - `{p[:200]}`" for p in problems[:10]]
    if "granian_log" in nb:
        g_problems = server_problems(nb["granian_log"])
        lines.append(
            "- Nimbus under granian: after SIGTERM, exit status "
            f"{nb['granian_exit']}, graceful shutdown logged: "
            f"{'Granian shutdown completed' in nb['granian_log']}; processes left running "
            f"afterwards: {nb['granian_leftover']}; log lines matching error/warning/traceback: "
            f"{len(g_problems)}."
        )
        lines += [f"  - `{p[:200]}`" for p in g_problems[:10]]
    lines += ["", "## Commands", ""]
    for t in targets:
        lines.append(f"- {t.label}: `{t.command}`")
    lines.append(f"- warm: `{cmd} <url>/function/hello`")
    lines.append(f"- one connection: `{nb['solo_gateway'].command}` and `{nb['solo_api'].command}`")
    lines.append(f"- sequential: `{nb['cold_heavy'].command}` (per function)")
    lines.append(f"- gateway vs instance directly: `{nb['direct']['command']}`")
    return "\n".join(lines) + "\n"


def to_json(obj: Any) -> Any:
    if isinstance(obj, Target):
        return {
            "label": obj.label,
            "command": obj.command,
            "processes": obj.processes,
            "runs": to_json(obj.runs),
        }
    if isinstance(obj, Wrk | Seq):
        d = dict(obj.__dict__)
        d.pop("raw", None)
        return d
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    return obj


# -- freeze_idle on vs off (python bench/run.py --freeze) ------------------------------------------
def freezer_write_cost(n: int = 2000) -> dict[str, float] | None:
    """µs per write of FROZEN/THAWED to an empty cgroup v1 freezer.state: alone, and while
    another cgroup stays frozen (what CgroupV1 holds); None without a v1 freezer here."""
    root = Path("/sys/fs/cgroup/freezer")
    if not (root / "cgroup.procs").exists() or os.geteuid() != 0:
        return None
    scratch, held = root / f"bench-{secrets.token_hex(4)}", root / f"bench-{secrets.token_hex(4)}"
    out: dict[str, float] = {}
    scratch.mkdir()
    try:
        held.mkdir()
        fd = os.open(scratch / "freezer.state", os.O_WRONLY)
        try:
            for label, hold in (("alone", False), ("another_held", True)):
                (held / "freezer.state").write_text("FROZEN" if hold else "THAWED")
                t0 = time.perf_counter()
                for _ in range(n):
                    os.write(fd, b"FROZEN")
                    os.write(fd, b"THAWED")
                out[label] = (time.perf_counter() - t0) / (2 * n) * 1e6
        finally:
            os.close(fd)
            (held / "freezer.state").write_text("THAWED")
    finally:
        for d in (scratch, held):
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()
    return out


def run_freeze(tmp: Path) -> dict[str, Any]:
    """The warm hello on two nodes side by side, freeze_idle on (the default) and
    ``--no-freeze-idle``: a warm-up each, then ``ROUNDS`` interleaved rounds at 16
    connections and at one connection."""
    nodes: dict[str, Nimbus] = {}
    out: dict[str, Any] = {"runs": {}}
    try:
        for label, flags in (("freeze", ()), ("no-freeze", ("--no-freeze-idle",))):
            node = nodes[label] = Nimbus(tmp, *flags)
            node.wait()
            node.deploy(FUNCTIONS / "hello")
            check_body(f"nimbus {label}", f"{node.url}/function/hello")
        for label, node in nodes.items():
            log(f"warm-up {WARMUP_SECONDS} s: {label}")
            wrk(f"{node.url}/function/hello", conns=WRK_CONNS, seconds=WARMUP_SECONDS)
        labels = list(nodes)
        for r in range(ROUNDS):
            order = labels if r % 2 == 0 else labels[::-1]
            for conns in (WRK_CONNS, 1):
                for label in order:
                    log(f"round {r + 1}/{ROUNDS}, wrk -c{conns} {WRK_SECONDS} s: {label}")
                    url = f"{nodes[label].url}/function/hello"
                    w = wrk(url, conns=conns, seconds=WRK_SECONDS)
                    out["runs"].setdefault(f"{label}, c{conns}", []).append(w)
        for label, node in nodes.items():
            out[f"instances {label}"] = node.describe("hello")["instances"]
    finally:
        for label, node in nodes.items():
            out[f"leftover {label}"] = node.stop()
    out["freezer_write_us"] = freezer_write_cost()
    return out


def freeze_report(info: dict[str, str], nb: dict[str, Any]) -> str:
    cmd = f"wrk -t{WRK_THREADS} -c<16|1> -d{WRK_SECONDS}s --latency <node>/function/hello"
    lines = [
        f"# freeze_idle on vs off, {info['date']}",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"{info['wrk']}; load average at start {info['loadavg']}, CPU busy in the second "
        f"before {info['busy_before']} %. Nimbus HEAD {info['commit']} (uncommitted under "
        f"src/: {info['src_dirty']}).",
        "",
        "Two sandboxed nodes up for the whole run, `nimbus up` and `nimbus up "
        f"--no-freeze-idle`, the same hello; `{cmd}`, {ROUNDS} rounds, the nodes' order "
        "alternating. Median round by req/s; p50/p99 of that round.",
        "",
        "| node, connections | req/s (median) | req/s per round | p50 ms | p99 ms | errors |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for key, runs in nb["runs"].items():
        med = sorted(runs, key=lambda w: w.rps)[len(runs) // 2]
        per = ", ".join(f"{w.rps:,.0f}" for w in runs)
        errs = sum(w.errors for w in runs)
        lines.append(
            f"| {key} | {med.rps:,.0f} | {per} | {med.p50_ms:.3f} | {med.p99_ms:.3f} | {errs} |"
        )
    cost = nb.get("freezer_write_us")
    lines.append("")
    if cost is not None:
        lines.append(
            f"cgroup v1 `freezer.state` write (one FROZEN or THAWED, empty cgroup): "
            f"{cost['alone']:.1f} µs alone, {cost['another_held']:.2f} µs while another "
            "cgroup is held frozen."
        )
        lines.append("")
    for label in ("freeze", "no-freeze"):
        lines.append(
            f"- {label}: instances at the end {nb[f'instances {label}']}, processes left "
            f"after its SIGTERM: {nb[f'leftover {label}']}"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    if shutil.which("wrk") is None:
        print(
            "wrk is not installed: apt-get install -y wrk (make bench does this)", file=sys.stderr
        )
        return 2
    # SIGTERM (a CI timeout, kill) unwinds like Ctrl-C, so the finally blocks stop everything.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.monotonic()
    info = machine()
    tmp = Path(tempfile.mkdtemp(prefix="nimbus-bench-"))
    RESULTS.mkdir(exist_ok=True)
    if "--freeze" in sys.argv[1:]:
        try:
            text = freeze_report(info, run_freeze(tmp))
            text += f"\nWhole run: {time.monotonic() - started:.0f} s.\n"
            (RESULTS / "freeze.md").write_text(text)
            print(text)
        finally:
            rmtree(tmp)
        return 0
    try:
        nb = run_all(tmp)
        text = report(info, nb)
        text += f"\nWhole run: {time.monotonic() - started:.0f} s.\n"
        (RESULTS / "latest.md").write_text(text)
        raw = {"machine": info, "nimbus": {**nb, "server_log": None, "granian_log": None}}
        (RESULTS / "latest.json").write_text(json.dumps(to_json(raw), indent=2, default=str))
        wrk_raw = [
            f"## {t.label}, round {i + 1}\n{w.raw}"
            for t in nb["targets"]
            for i, w in enumerate(t.runs)
        ]
        wrk_raw += [f"## nimbus {k}\n{nb[k].raw}" for k in ("solo_gateway", "solo_api")]
        (RESULTS / "wrk-raw.txt").write_text("\n".join(wrk_raw))
        print(text)
    finally:
        rmtree(tmp)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started has been stopped", file=sys.stderr)
        raise SystemExit(130) from None
