"""Asynchronous invocations: durable enqueue rate and end-to-end throughput (issue 5).

Starts ``nimbus up`` on a free port with a temporary data dir and drives it with
``wrk`` (another process, loopback):

1. **Durable enqueue**: ``POST /v1/functions/parked/invoke`` with
   ``X-Nimbus-Invocation-Type: Event`` (and OpenFaaS's ``POST /async-function/parked``),
   WRK_CONNS connections for ENQUEUE_SECONDS. ``parked`` has
   ``async.max_concurrency: 1`` and sleeps, so the workers stay out of the way
   and what is measured is accept → commit (fsync) → 202. Afterwards the server is
   stopped and the queue database is counted: every 2xx wrk saw must be a row.
2. **End to end**: the same load against ``noop`` (returns ``{}``; scaling.max 16,
   async.max_concurrency 16) for E2E_SECONDS while the workers drain it; then we
   wait until nothing is queued or running. Throughput = succeeded / (last
   finish - first submit); the drain rate after the load stopped is shown too.

    python bench/async_bench.py [--conns 64] [--seconds 5]

Prints a markdown summary and writes bench/results/async.{md,json}. Every process
it starts is stopped by pid; the temporary directory is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from nimbus.packaging import package_directory

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
HOST = "127.0.0.1"
#: The node's admin key (NIMBUS_ADMIN_KEY), new each run.
ADMIN_KEY = "nmb_bench_" + secrets.token_urlsafe(24)

PARKED = """import time

def handler(event, context):
    time.sleep(30)
    return {}
"""
NOOP = """def handler(event, context):
    return {}
"""

LUA = """wrk.method = "POST"
wrk.body = '{"source": "bench", "detail": {"n": 1, "text": "hello world"}}'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["X-Nimbus-Invocation-Type"] = "Event"
wrk.headers["Authorization"] = "Bearer %s"
"""


def log(msg: str) -> None:
    print(f"[async-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def wrk(url: str, script: Path, conns: int, seconds: int) -> dict[str, Any]:
    out = subprocess.run(
        ["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s", str(script), url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)

    def ms(label: str) -> float:
        m = re.search(rf"\s{label}%\s+([\d.]+)(us|ms|s)\b", out)
        if m is None:
            return float("nan")
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    return {
        "requests": requests,
        "rate": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else "none",
        "p50_ms": ms("50"),
        "p99_ms": ms("99"),
        "raw": out,
    }


class Server:
    def __init__(self, data: Path, *args: str) -> None:
        self.data = data
        self.args = args
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = data.parent / "nimbus-async-bench.log"
        self.proc: subprocess.Popen[bytes] | None = None
        auth = {"authorization": f"Bearer {ADMIN_KEY}"}
        self.client = httpx.Client(base_url=self.url, timeout=60, headers=auth)

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "nimbus", "up"),
                *("--host", HOST, "--port", str(self.port), "--data-dir", str(self.data)),
                *self.args,
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, NIMBUS_ADMIN_KEY=ADMIN_KEY),
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nimbus up exited:\n{self.log_path.read_text()}")
            with contextlib.suppress(httpx.HTTPError):
                if self.client.get("/healthz", timeout=1).status_code == 200:
                    return
            time.sleep(0.05)
        raise RuntimeError("nimbus up did not become healthy")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def deploy(self, tmp: Path, name: str, code: str, spec: dict[str, Any]) -> None:
        directory = tmp / name
        directory.mkdir()
        (directory / "app.py").write_text(code)
        r = self.client.post(
            "/v1/functions",
            data={"spec": json.dumps({"name": name, "handler": "app.handler", **spec})},
            files={"code": ("code.zip", package_directory(directory), "application/zip")},
        )
        r.raise_for_status()

    def counts(self, function: str) -> dict[str, int]:
        """Invocations of ``function`` by status, read from the queue database directly
        (read-only, from this process): asking the server to list them would load its
        queue thread with the very work being measured."""
        db = sqlite3.connect(f"file:{self.data / 'queue.db'}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT status, COUNT(*) FROM invocations WHERE function = ? GROUP BY status",
                (function,),
            ).fetchall()
        finally:
            db.close()
        return {status: n for status, n in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conns", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    report: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "nproc": os.cpu_count(),
        "loadavg_before": loadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="nimbus-async-bench-") as tmp_name:
        tmp = Path(tmp_name)
        script = tmp / "event.lua"
        script.write_text(LUA % ADMIN_KEY)
        server = Server(tmp / "data")
        server.start()
        try:
            server.deploy(
                tmp,
                "parked",
                PARKED,
                {"timeout": 60, "scaling": {"max": 1}, "async": {"max_concurrency": 1}},
            )
            server.deploy(
                tmp,
                "noop",
                NOOP,
                {"timeout": 5, "scaling": {"max": 16}, "async": {"max_concurrency": 16}},
            )
            log("warm-up (1 s, not measured)")
            wrk(server.url + "/v1/functions/parked/invoke", script, args.conns, 1)

            log(f"durable enqueue: wrk -c{args.conns} -d{args.seconds}s, API route")
            api = wrk(server.url + "/v1/functions/parked/invoke", script, args.conns, args.seconds)
            log(f"  {api['rate']:,.0f}/s")
            log(f"durable enqueue: wrk -c{args.conns} -d{args.seconds}s, /async-function/")
            gw = wrk(server.url + "/async-function/parked", script, args.conns, args.seconds)
            log(f"  {gw['rate']:,.0f}/s")
            report["enqueue_api"] = api
            report["enqueue_gateway"] = gw

            log(f"end to end: wrk -c{args.conns // 2} -d{args.seconds}s against noop")
            t0 = time.time()
            e2e = wrk(
                server.url + "/v1/functions/noop/invoke", script, args.conns // 2, args.seconds
            )
            t1 = time.time()
            done_at_t1 = server.counts("noop").get("succeeded", 0)
            while True:
                counts = server.counts("noop")
                if not counts.get("queued") and not counts.get("running"):
                    break
                time.sleep(0.05)
            t2 = time.time()
            succeeded = counts.get("succeeded", 0)
            failed = sum(n for status, n in counts.items() if status != "succeeded")
            report["e2e"] = {
                "submitted_2xx": e2e["requests"] - e2e["non_2xx"],
                "submit_rate": e2e["rate"],
                "succeeded": succeeded,
                "not_succeeded": failed,
                "seconds_total": t2 - t0,
                "throughput": succeeded / (t2 - t0),
                "done_when_load_stopped": done_at_t1,
                "drain_rate_after_load": (succeeded - done_at_t1) / max(t2 - t1, 1e-9),
                "submit_p50_ms": e2e["p50_ms"],
                "submit_p99_ms": e2e["p99_ms"],
            }
            log(f"  {report['e2e']['throughput']:,.0f}/s end to end")
        finally:
            server.client.close()
            server.stop()
        report["loadavg_after"] = loadavg()

        db = sqlite3.connect(tmp / "data" / "queue.db")
        try:
            stored = dict(db.execute("SELECT function, COUNT(*) FROM invocations GROUP BY 1"))
        finally:
            db.close()
        acked = {
            "parked": sum(
                report[k]["requests"] - report[k]["non_2xx"]
                for k in ("enqueue_api", "enqueue_gateway")
            ),
            "noop": report["e2e"]["submitted_2xx"],
        }
        report["stored"] = stored
        report["acknowledged"] = acked
        # The warm-up's requests are stored too: stored >= acknowledged.
        report["none_lost"] = all(stored.get(f, 0) >= n for f, n in acked.items())

    md = render(report, args)
    print(md)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "async.md").write_text(md)
    for key in ("enqueue_api", "enqueue_gateway"):
        report[key].pop("raw", None)
    (RESULTS / "async.json").write_text(json.dumps(report, indent=2))


def render(r: dict[str, Any], args: argparse.Namespace) -> str:
    e = r["e2e"]
    lines = [
        f"# Async invocations, {r['date']} ({r['nproc']} CPUs, "
        f"load {r['loadavg_before']} before, {r['loadavg_after']} after)",
        "",
        "| route | enqueued/s | p50 ms | p99 ms | non-2xx | socket errors |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for label, key in (
        ("`POST /v1/functions/{name}/invoke` (Event)", "enqueue_api"),
        ("`POST /async-function/{name}`", "enqueue_gateway"),
    ):
        x = r[key]
        lines.append(
            f"| {label} | {x['rate']:,.0f} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} "
            f"| {x['non_2xx']} | {x['socket_errors']} |"
        )
    lines += [
        "",
        f"wrk -t1 -c{args.conns} -d{args.seconds}s; every acknowledged one stored: "
        f"{'yes' if r['none_lost'] else 'NO'} (stored {r['stored']}, acknowledged "
        f"{r['acknowledged']}, the 1 s warm-up included in stored).",
        "",
        f"End to end, no-op function (scaling.max 16, async.max_concurrency 16), "
        f"wrk -c{args.conns // 2} -d{args.seconds}s submitting while the workers drain:",
        "",
        f"- submitted {e['submitted_2xx']:,} at {e['submit_rate']:,.0f}/s "
        f"(p50 {e['submit_p50_ms']:.2f} ms, p99 {e['submit_p99_ms']:.2f} ms)",
        f"- all {e['succeeded']:,} succeeded {e['seconds_total']:.2f} s after the first submit "
        f"({e['not_succeeded']} did not): **{e['throughput']:,.0f} invocations/s end to end**",
        f"- {e['done_when_load_stopped']:,} were done when the load stopped; the rest drained "
        f"at {e['drain_rate_after_load']:,.0f}/s",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
