"""The execution environment: the base root filesystem, and a heavy third-party init.

Measures, on this machine, sandboxed:

1. the base root filesystem: a fresh build (debootstrap into a temporary cache: what a
   new machine pays once), its size and package count;
2. a FastAPI + pydantic app behind Mangum (bench/functions/fastapi), through the
   gateway, client-side (bench/seqclient.py, another process, fresh connection each):
   - the first request after each deploy (the deploy returns once the new version's
     init ran in its function zygote; the request is the first fork of it);
   - the first request to a function with no instance (``keep_warm: 0``; its zygote
     up): the pre-provisioned start, as Lambda SnapStart restores;
   - the same with the init on the request's path (``zygote_keep_warm: 0``: the zygote
     stops with its instance, so every request starts one and runs the init);
   - the same without function zygotes (``--no-function-zygotes``);
3. the bare import of fastapi, pydantic and mangum in a fresh interpreter on this
   machine (the init's own cost, outside any sandbox), for comparison.

    python bench/environment_bench.py [--requests 30] [--deploys 10] [--no-rebuild]

Results: bench/results/environment.md and .json. Loopback only; the dependency install
reaches PyPI through the build sandbox's egress.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from async_bench import Server
from nimbus.executor.sandbox.baseroot import Recipe, default_suite, ensure_base_root

BENCH = Path(__file__).resolve().parent
FASTAPI = BENCH / "functions" / "fastapi"
SEQCLIENT = BENCH / "seqclient.py"
RESULTS = BENCH / "results"
EXPECT = '{"hello":"world"}'
IMPORT = "import time; t = time.perf_counter(); import fastapi, pydantic, mangum; " + (
    "print((time.perf_counter() - t) * 1000)"
)


def log(msg: str) -> None:
    print(f"[environment-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def seq(url: str, n: int, pause: float) -> dict[str, Any]:
    argv = [sys.executable, str(SEQCLIENT), "--url", url, "-n", str(n), "--pause", str(pause)]
    out = subprocess.run([*argv, "--expect", EXPECT], capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"seqclient failed: {out.stderr}")
    data: dict[str, Any] = json.loads(out.stdout)
    return data


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))]


def summary(latencies: list[float], ok: int) -> dict[str, Any]:
    return {
        "n": len(latencies),
        "ok": ok,
        "p50": round(pct(latencies, 50), 2),
        "p90": round(pct(latencies, 90), 2),
        "p99": round(pct(latencies, 99), 2),
        "max": round(max(latencies), 2),
    }


def fresh_root_build() -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nimbus-root-bench-") as cache:
        started = time.monotonic()
        base = ensure_base_root(Path(cache), Recipe(suite=default_suite()), progress=log)
        return {
            "seconds": round(time.monotonic() - started, 1),
            "size_mib": round(base.size_bytes / 2**20, 1),
            "packages": base.packages,
            "suite": base.suite,
        }


def deploy(server: Server, **spec: Any) -> float:
    """Deploy bench/functions/fastapi with ``spec`` over its nimbus.yaml; seconds it took."""
    import yaml

    from nimbus.packaging import package_directory

    full = {**yaml.safe_load((FASTAPI / "nimbus.yaml").read_text()), **spec}
    started = time.monotonic()
    r = server.client.post(
        "/v1/functions",
        data={"spec": json.dumps(full)},
        files={"code": ("code.zip", package_directory(FASTAPI), "application/zip")},
        timeout=900,
    )
    if r.status_code != 201:
        raise RuntimeError(f"deploy failed: {r.status_code} {r.text}")
    return time.monotonic() - started


def update(server: Server, name: str, round_: int) -> float:
    started = time.monotonic()
    r = server.client.put(
        f"/v1/functions/{name}",
        data={"spec": json.dumps({"environment": {"ROUND": str(round_)}})},
        timeout=900,
    )
    if r.status_code != 200:
        raise RuntimeError(f"update failed: {r.status_code} {r.text}")
    return time.monotonic() - started


def inits(server: Server, name: str, key: str) -> list[float]:
    r = server.client.get(f"/v1/functions/{name}/logs", params={"limit": 10000})
    found = []
    for record in r.json()["records"]:
        message = record["message"]
        if message.startswith(("REPORT ", "INIT_REPORT ")) and f"{key}: " in message:
            found.append(float(message.split(f"{key}: ")[1].split(" ms")[0]))
    return found


def measure(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    server = Server(tmp / "data")
    server.start()
    try:
        log("deploying fastapi (installs fastapi + mangum into a layer, sandboxed)")
        out["first_deploy_s"] = round(deploy(server), 2)
        url = f"{server.url}/function/fastapi"
        log(f"{args.deploys} deploys, each followed by its first request")
        after, deploy_s = [], []
        for i in range(args.deploys):
            deploy_s.append(update(server, "fastapi", i))
            first = seq(url, 1, 0)
            after += first["latencies_ms"]
        out["after_deploy"] = summary(after, len(after))
        out["deploy_s"] = round(statistics.median(deploy_s), 3)
        out["zygote_init_ms"] = inits(server, "fastapi", "Init Duration")
        log(f"{args.requests} requests to fastapi with no instance (zygote up)")
        data = seq(url, args.requests, 0.2)
        out["no_instance"] = summary(data["latencies_ms"], data["statuses"].count(200))
        out["restore_ms"] = inits(server, "fastapi", "Restore Duration")
        deploy(server, name="fastapi-init", scaling={"keep_warm": 0, "zygote_keep_warm": 0})
        log(f"{args.requests} requests to fastapi-init (the init on each request's path)")
        data = seq(f"{server.url}/function/fastapi-init", args.requests, 0.2)
        out["init_on_path"] = summary(data["latencies_ms"], data["statuses"].count(200))
        layer = next((tmp / "data" / "layers").iterdir())
    finally:
        server.stop()
    other = Server(tmp / "data-nozygote", "--no-function-zygotes")
    other.start()
    try:
        deploy(other, name="fastapi-nozygote")
        log(f"{args.requests} requests to fastapi, --no-function-zygotes (each imports itself)")
        data = seq(f"{other.url}/function/fastapi-nozygote", args.requests, 0.2)
        out["no_zygotes"] = summary(data["latencies_ms"], data["statuses"].count(200))
        out["no_zygotes_init_ms"] = inits(other, "fastapi-nozygote", "Init Duration")
    finally:
        other.stop()
    log("bare import of fastapi, pydantic, mangum in a fresh interpreter (host, the layer)")
    python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    bare = []
    for _ in range(10):
        code = f"import sys; sys.path.insert(0, {str(layer)!r}); {IMPORT}"
        run = subprocess.run([python, "-I", "-S", "-c", code], capture_output=True, text=True)
        bare.append(float(run.stdout.strip()))
    out["bare_import_ms"] = round(statistics.median(bare), 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--deploys", type=int, default=10)
    parser.add_argument("--no-rebuild", action="store_true", help="skip the fresh root build")
    args = parser.parse_args()
    results: dict[str, Any] = {"loadavg": os.getloadavg()[0]}
    if not args.no_rebuild:
        log("building a base root filesystem from scratch (a temporary cache)")
        results["root"] = fresh_root_build()
    with tempfile.TemporaryDirectory(prefix="nimbus-env-bench-") as tmp:
        results.update(measure(args, Path(tmp)))
    print(json.dumps(results, indent=2))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "environment.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
