"""``make bench``: warm and cold invoke of a hello handler, Nimbus vs functions-framework.

One run, loopback only, load generators in other processes (``wrk``, and
bench/seqclient.py for sequential fresh-connection requests). Bounded in time
(about a minute). Every process started here is stopped by pid in a ``finally``,
and the temporary directory is removed. The summary is printed and written to
bench/results/latest.md (plus latest.json and the server logs). See docs/benchmarks.md.

Phases:
1. functions-framework (PyPI) serving the same handler, its default server
   (gunicorn, 1 worker, 4 threads per CPU), then with WORKERS=<cores> (labelled).
2. ``nimbus up`` on a free port: warm throughput through ``/function/hello``.
3. Latency at one connection: the gateway vs the ``/v1/.../invoke`` API path.
4. Cold start: functions with ``keep_warm: 0`` (every request starts an instance),
   N sequential requests, each on a fresh connection, with a pause between them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
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
HOST = "127.0.0.1"
EXPECTED_BODY = '{"hello":"world"}'

WRK_THREADS = 1
WRK_CONNS = 16
WRK_SECONDS = 5
WARMUP_SECONDS = 2
SOLO_SECONDS = 3  # the one-connection latency runs
COLD_N = 50
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
    for pkg in ("functions-framework", "gunicorn", "flask"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = "not installed"
    return {
        "date": dt.date.today().isoformat(),
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": wrk_version.split("[")[0].strip() or "unknown",
        **versions,
    }


class Proc:
    """A child process in its own session, stopped by its pid (then its group) in finally."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.p = subprocess.Popen(
            argv, stdout=self._log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

    def alive(self) -> bool:
        return self.p.poll() is None

    def stop(self, timeout: float = 15) -> None:
        if self.p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.p.kill()
                self.p.wait()
        # Anything left in its process group (gunicorn workers, ...): the group id is its pid.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.p.pid, signal.SIGKILL)
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


def rmtree(path: Path) -> None:
    """Remove a tree that holds read-only directories (Nimbus unpacks code read-only)."""

    def make_writable(func: Any, p: str, _exc: Any) -> None:
        with contextlib.suppress(OSError):
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
        func(p)

    if path.exists():
        shutil.rmtree(path, onerror=make_writable)


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
    requests: int = 0
    non_2xx: int = 0
    socket_errors: dict[str, int] = field(default_factory=dict)
    raw: str = ""

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def wrk(url: str, *, conns: int, seconds: int, script: Path | None = None) -> Wrk:
    argv = ["wrk", f"-t{WRK_THREADS}", f"-c{conns}", f"-d{seconds}s", "--latency"]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    if out.returncode != 0:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stderr}{out.stdout}")
    text = out.stdout
    shown = " ".join(a if a != str(script) else script.name for a in argv) if script else None
    r = Wrk(command=shown or " ".join(argv), raw=text)
    r.rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    r.requests = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    for q in ("50", "90", "99"):
        m = re.search(rf"^\s+{q}%\s+(\S+)", text, re.M)
        setattr(r, f"p{q}_ms", _ms(m.group(1)) if m else float("nan"))
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


# -- the peer -----------------------------------------------------------------------------------
def bench_peer(tmp: Path, label: str, extra_env: dict[str, str]) -> dict[str, Any]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("WORKERS", "THREADS", "DEBUG")}
    env.update(extra_env)
    exe = str(Path(sys.executable).with_name("functions-framework"))
    argv = [exe, "--target", "hello", "--source", str(PEER_SOURCE), "--host", HOST]
    argv += ["--port", str(port)]
    proc = Proc(label, argv, tmp / f"peer-{port}.log", env)
    url = f"http://{HOST}:{port}/function/hello"
    try:
        wait_http(proc, url)
        body = httpx.get(url).text
        if body != EXPECTED_BODY:
            raise RuntimeError(f"{label} answered {body!r}")
        log(f"{label}: warm-up {WARMUP_SECONDS} s, then wrk {WRK_SECONDS} s")
        wrk(url, conns=WRK_CONNS, seconds=WARMUP_SECONDS)
        result = wrk(url, conns=WRK_CONNS, seconds=WRK_SECONDS)
        procs = _group_size(proc.p.pid)
    finally:
        proc.stop()
    shown_env = " ".join(f"{k}={v}" for k, v in extra_env.items())
    command = (
        "functions-framework --target hello --source bench/peer/ff_hello.py "
        f"--host {HOST} --port <free>"
    )
    return {
        "label": label,
        "command": (shown_env + " " if shown_env else "") + command,
        "processes": procs,
        "wrk": result,
        "log_tail": proc.output()[-2000:],
    }


def _group_size(pgid: int) -> int:
    n = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) == pgid:
                    n += 1
    return n


# -- Nimbus -------------------------------------------------------------------------------------
class Nimbus:
    def __init__(self, tmp: Path) -> None:
        self.data_dir = tmp / "nimbus-data"
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = tmp / "nimbus-server.log"
        argv = [sys.executable, "-m", "nimbus", "up", "--host", HOST, "--port", str(self.port)]
        argv += ["--data-dir", str(self.data_dir)]
        self.proc = Proc("nimbus up", argv, self.log_path, dict(os.environ))
        self.client = httpx.Client(base_url=self.url, timeout=60)

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

    def reports(self, name: str) -> list[str]:
        r = self.client.get(f"/v1/functions/{name}/logs", params={"limit": 10000})
        messages = [rec["message"] for rec in r.raise_for_status().json()["records"]]
        return [m for m in messages if m.startswith("REPORT ")]

    def stop(self) -> None:
        self.client.close()
        self.proc.stop(timeout=30)
        for pid in instance_pids(self.data_dir):  # never leave an instance behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def init_durations(reports: list[str]) -> list[float]:
    out = []
    for line in reports:
        m = re.search(r"Init Duration: ([\d.]+) ms", line)
        if m:
            out.append(float(m.group(1)))
    return out


def wait_instances(nimbus: Nimbus, name: str, total: int, timeout: float = 5) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = int(nimbus.describe(name)["instances"]["total"])
        if n == total or time.monotonic() > deadline:
            return n
        time.sleep(0.05)


def bench_nimbus(tmp: Path) -> dict[str, Any]:
    nimbus = Nimbus(tmp)
    out: dict[str, Any] = {}
    try:
        t0 = time.monotonic()
        nimbus.wait()
        out["startup_s"] = time.monotonic() - t0
        hello_dir, heavy_dir = FUNCTIONS / "hello", FUNCTIONS / "heavy"
        nimbus.deploy(hello_dir)
        cold_scaling = {"min": 0, "max": 16, "keep_warm": 0}
        nimbus.deploy(hello_dir, name="hello-cold", scaling=cold_scaling)
        nimbus.deploy(heavy_dir, name="heavy", scaling=cold_scaling)
        out["specs"] = {n: nimbus.describe(n)["spec"] for n in ("hello", "hello-cold", "heavy")}

        # -- warm throughput ------------------------------------------------------------------
        url = f"{nimbus.url}/function/hello"
        body = httpx.get(url).text
        if body != EXPECTED_BODY:
            raise RuntimeError(f"nimbus /function/hello answered {body!r}")
        log(f"nimbus: warm-up {WARMUP_SECONDS} s, then wrk {WRK_SECONDS} s")
        out["warmup"] = wrk(url, conns=WRK_CONNS, seconds=WARMUP_SECONDS)
        out["instances_before"] = nimbus.describe("hello")["instances"]
        out["warm"] = wrk(url, conns=WRK_CONNS, seconds=WRK_SECONDS)
        out["instances_after"] = nimbus.describe("hello")["instances"]

        # -- one connection: gateway vs API invoke -------------------------------------------
        log(f"nimbus: one-connection latency, gateway and API, {SOLO_SECONDS} s each")
        script = tmp / "invoke.lua"
        script.write_text('wrk.method = "POST"\nwrk.body = "{}"\n')
        out["solo_gateway"] = wrk(url, conns=1, seconds=SOLO_SECONDS)
        invoke_url = f"{nimbus.url}/v1/functions/hello/invoke"
        out["solo_api"] = wrk(invoke_url, conns=1, seconds=SOLO_SECONDS, script=script)

        # -- sequential, fresh connection per request: warm baseline, then cold ---------------
        log(f"nimbus: {COLD_N} sequential requests each to hello (warm), hello-cold, heavy")
        out["seq_warm"] = seqclient(url, COLD_N, COLD_PAUSE)
        reports_before = len(nimbus.reports("hello"))
        for name in ("hello-cold", "heavy"):
            out[f"cold_{name}"] = seqclient(f"{nimbus.url}/function/{name}", COLD_N, COLD_PAUSE)
            out[f"instances_left_{name}"] = wait_instances(nimbus, name, 0)
            reports = nimbus.reports(name)
            out[f"reports_{name}"] = len(reports)
            out[f"inits_{name}"] = init_durations(reports)
        warm_reports = nimbus.reports("hello")
        out["seq_warm_inits"] = len(init_durations(warm_reports[reports_before:]))
        out["healthz"] = nimbus.client.get("/healthz").json()
    finally:
        nimbus.stop()
        out["server_log"] = nimbus.proc.output()
        out["server_exit"] = nimbus.proc.p.returncode
        out["leftover_instances"] = len(instance_pids(nimbus.data_dir))
    return out


# -- report -------------------------------------------------------------------------------------
def f1(x: float) -> str:
    return f"{x:,.1f}" if x == x else "n/a"


def f2(x: float) -> str:
    return f"{x:.2f}" if x == x else "n/a"


def errs(w: Wrk) -> str:
    se = ", ".join(f"{k} {v}" for k, v in w.socket_errors.items() if v) or "0"
    return f"{w.non_2xx} / {se}"


def server_problems(text: str) -> list[str]:
    keep = re.compile(r"Traceback|ERROR|CRITICAL|Exception|WARNING", re.I)
    return [line for line in text.splitlines() if keep.search(line)]


def report(info: dict[str, str], peers: list[dict[str, Any]], nb: dict[str, Any]) -> str:
    warm: Wrk = nb["warm"]
    lines = [
        f"# Nimbus benchmark, {info['date']}",
        "",
        f"Machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']}, "
        f"Python {info['python']}, {info['wrk']}, functions-framework "
        f"{info['functions-framework']} (gunicorn {info['gunicorn']}, Flask {info['flask']}). "
        "Loopback only.",
        "",
        f"## Warm throughput: `wrk -t{WRK_THREADS} -c{WRK_CONNS} -d{WRK_SECONDS}s --latency`",
        "",
        "| server | req/s | p50 ms | p90 ms | p99 ms | requests | non-2xx / socket errors |"
        " Nimbus ÷ this |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
        f"| Nimbus `/function/hello` ({nb['instances_before']['total']} warm instances) "
        f"| {f1(warm.rps)} | {f2(warm.p50_ms)} | {f2(warm.p90_ms)} | {f2(warm.p99_ms)} "
        f"| {warm.requests:,} | {errs(warm)} | - |",
    ]
    for peer in peers:
        w: Wrk = peer["wrk"]
        ratio = warm.rps / w.rps if w.rps else float("nan")
        lines.append(
            f"| {peer['label']} | {f1(w.rps)} | {f2(w.p50_ms)} | {f2(w.p90_ms)} | {f2(w.p99_ms)} "
            f"| {w.requests:,} | {errs(w)} | **{f2(ratio)}** |"
        )
    lines += [
        "",
        "Each server got a "
        f"{WARMUP_SECONDS} s wrk warm-up (same command) before the measured run; "
        "functions-framework ran alone, before Nimbus was started.",
        "",
        f"## Cold start: {COLD_N} sequential requests, fresh connection each, "
        f"{int(COLD_PAUSE * 1000)} ms apart",
        "",
        "Latency is client-side, connect to last byte, through the gateway. `keep_warm: 0`: "
        "the instance stops when its invocation ends, so each request starts a process.",
        "",
        "| function | ok | p50 ms | p90 ms | p99 ms | min ms | max ms "
        "| REPORTs with Init Duration | Init Duration p50 ms (server) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [("hello (warm, keep_warm 300)", nb["seq_warm"], None)]
    rows += [("hello-cold (hello, keep_warm 0)", nb["cold_hello-cold"], "hello-cold")]
    rows += [("heavy (stdlib imports, keep_warm 0)", nb["cold_heavy"], "heavy")]
    for label, s, name in rows:
        if name is None:
            cold_col, init_col = f"{nb['seq_warm_inits']} of {len(s.latencies)}", "-"
        else:
            inits = nb[f"inits_{name}"]
            cold_col = f"{len(inits)} of {nb[f'reports_{name}']}"
            init_col = f2(pct(inits, 50)) if inits else "n/a"
        lines.append(
            f"| {label} | {s.ok}/{len(s.latencies)} | {f2(s.p(50))} | {f2(s.p(90))} "
            f"| {f2(s.p(99))} | {f2(min(s.latencies))} | {f2(max(s.latencies))} "
            f"| {cold_col} | {init_col} |"
        )
    lines += [
        "",
        f"Percentiles are nearest-rank: with {COLD_N} samples p99 is the slowest request.",
        "",
        f"## One connection: gateway vs API invoke path (`wrk -t1 -c1 -d{SOLO_SECONDS}s`)",
        "",
        "| path | req/s | p50 ms | p99 ms | non-2xx / socket errors |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for label, key in (
        ("GET /function/hello (gateway)", "solo_gateway"),
        ("POST /v1/functions/hello/invoke (API)", "solo_api"),
    ):
        w = nb[key]
        lines.append(f"| {label} | {f1(w.rps)} | {f2(w.p50_ms)} | {f2(w.p99_ms)} | {errs(w)} |")
    diff = nb["solo_gateway"].p50_ms - nb["solo_api"].p50_ms
    problems = server_problems(nb["server_log"])
    lines += [
        "",
        f"Gateway p50 minus API p50: {diff * 1000:+.0f} µs (both call the same invoker).",
        "",
        "## Checks",
        "",
        f"- `nimbus up` healthy after {nb['startup_s']:.2f} s; after SIGTERM: exit status "
        f"{nb['server_exit']} (uvicorn re-raises the signal once shut down), graceful "
        f"shutdown logged: {'Application shutdown complete' in nb['server_log']}; "
        f"instance processes left afterwards: {nb['leftover_instances']}.",
        f"- hello instances before/after the measured run: {nb['instances_before']} / "
        f"{nb['instances_after']}.",
        f"- instances left after the cold runs: hello-cold "
        f"{nb['instances_left_hello-cold']}, heavy {nb['instances_left_heavy']}.",
        f"- unexpected bodies (sequential runs): warm {nb['seq_warm'].unexpected}, "
        f"hello-cold {nb['cold_hello-cold'].unexpected}, heavy {nb['cold_heavy'].unexpected}.",
        "- functions-framework processes (pgid) while serving: "
        + ", ".join(f"{p['label']}: {p['processes']}" for p in peers)
        + ".",
        f"- server log lines matching error/warning/traceback: {len(problems)}",
    ]
    lines += [f"  - `{p[:200]}`" for p in problems[:10]]
    lines += ["", "## Commands", ""]
    lines.append(f"- Nimbus: `python -m nimbus up --host {HOST} --port <free> --data-dir <tmp>`")
    for peer in peers:
        lines.append(f"- {peer['label']}: `{peer['command']}`")
    lines.append(f"- warm: `{warm.command}`")
    lines.append(f"- one connection: `{nb['solo_gateway'].command}` and `{nb['solo_api'].command}`")
    lines.append(f"- sequential: `{nb['cold_heavy'].command}` (per function)")
    return "\n".join(lines) + "\n"


def to_json(obj: Any) -> Any:
    if isinstance(obj, Wrk | Seq):
        d = dict(obj.__dict__)
        d.pop("raw", None)
        return d
    if isinstance(obj, dict):
        return {k: to_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [to_json(v) for v in obj]
    return obj


def main() -> int:
    if shutil.which("wrk") is None:
        print(
            "wrk is not installed: apt-get install -y wrk (make bench does this)", file=sys.stderr
        )
        return 2
    started = time.monotonic()
    info = machine()
    tmp = Path(tempfile.mkdtemp(prefix="nimbus-bench-"))
    RESULTS.mkdir(exist_ok=True)
    try:
        cores = str(os.cpu_count() or 1)
        peers = [
            bench_peer(
                tmp, "functions-framework, default (gunicorn, 1 worker, 4 threads per CPU)", {}
            ),
            bench_peer(
                tmp, f"functions-framework, gunicorn WORKERS={cores} (tuned)", {"WORKERS": cores}
            ),
        ]
        nb = bench_nimbus(tmp)
        text = report(info, peers, nb)
        text += f"\nWhole run: {time.monotonic() - started:.0f} s.\n"
        (RESULTS / "latest.md").write_text(text)
        raw = {"machine": info, "peers": peers, "nimbus": {**nb, "server_log": None}}
        (RESULTS / "latest.json").write_text(json.dumps(to_json(raw), indent=2, default=str))
        (RESULTS / "nimbus-server.log").write_text(nb["server_log"])
        wrk_raw = [f"## {p['label']}\n{p['wrk'].raw}" for p in peers]
        wrk_raw += [f"## nimbus {k}\n{nb[k].raw}" for k in ("warm", "solo_gateway", "solo_api")]
        (RESULTS / "wrk-raw.txt").write_text("\n".join(wrk_raw))
        print(text)
    finally:
        rmtree(tmp)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
