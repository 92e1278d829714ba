"""What checking an API key costs on the warm invoke path.

One sandboxed node, the bench's hello handler deployed twice: ``hello-open``
(``auth: none``: the function URL anyone may call, what run.py measures) and
``hello-key`` (``auth: key``: every request's bearer key is hashed and looked up,
and its scope checked, before the invocation). wrk (another process) alternates
between the two, ``--rounds`` times each, so both see the same machine; the figure is
the median of each side, and the cost is ``1 - key/open`` in req/s.

    python bench/auth_bench.py [--seconds 10] [--rounds 3] [--conns 16]

Results: bench/results/auth.md and .json. Loopback only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

from run import ADMIN_KEY, FUNCTIONS, RESULTS, Nimbus, Wrk, check_body, machine, wrk


def invoke_key(nimbus: Nimbus) -> str:
    """A key of the invoke scope only: what a caller of an ``auth: key`` function has."""
    r = nimbus.client.post("/v1/keys", json={"name": "bench", "scopes": ["invoke"]})
    r.raise_for_status()
    return str(r.json()["secret"])


def run(seconds: int, rounds: int, conns: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="nimbus-auth-bench-") as tmp:
        nimbus = Nimbus(Path(tmp))
        try:
            nimbus.wait()
            nimbus.deploy(FUNCTIONS / "hello", name="hello-open")
            nimbus.deploy(FUNCTIONS / "hello", name="hello-key", auth="key")
            key = invoke_key(nimbus)
            script = Path(tmp) / "key.lua"
            script.write_text(f'wrk.headers["Authorization"] = "Bearer {key}"\n')
            open_url = f"{nimbus.url}/function/hello-open"
            key_url = f"{nimbus.url}/function/hello-key"
            check_body("auth: none", open_url)
            probe = nimbus.client.get(key_url, headers={"authorization": f"Bearer {key}"})
            if probe.status_code != 200:
                raise RuntimeError(f"hello-key answered {probe.status_code}: {probe.text}")
            if nimbus.client.get(key_url, headers={"authorization": ""}).status_code != 401:
                raise RuntimeError("hello-key answered without a key")
            wrk(open_url, conns=conns, seconds=2)  # warm both (instances, connections)
            wrk(key_url, conns=conns, seconds=2, script=script)
            sides: dict[str, list[Wrk]] = {"open": [], "key": []}
            for _ in range(rounds):
                sides["open"].append(wrk(open_url, conns=conns, seconds=seconds))
                sides["key"].append(wrk(key_url, conns=conns, seconds=seconds, script=script))
        finally:
            left = nimbus.stop()
    out: dict[str, Any] = {"seconds": seconds, "rounds": rounds, "conns": conns, "left": left}
    for side, runs in sides.items():
        if any(r.errors for r in runs):
            raise RuntimeError(f"{side}: errors in {[r.raw for r in runs if r.errors]}")
        out[side] = {
            "rps": [r.rps for r in runs],
            "rps_median": statistics.median(r.rps for r in runs),
            "p50_ms": statistics.median(r.p50_ms for r in runs),
            "p99_ms": statistics.median(r.p99_ms for r in runs),
            "command": runs[0].command.replace(ADMIN_KEY, "<admin key>"),
        }
    out["cost_pct"] = 100 * (1 - out["key"]["rps_median"] / out["open"]["rps_median"])
    return out


def report(info: dict[str, str], r: dict[str, Any]) -> str:
    rows = [
        f"Machine: {info.get('cpu', '?')}, {info.get('nproc', '?')} cores, commit "
        f"{info.get('commit', '?')}; sandboxed; "
        f"wrk -t1 -c{r['conns']} -d{r['seconds']}s, {r['rounds']} alternating rounds each "
        "(medians).",
        "",
        "| function | req/s (median) | per round | p50 ms | p99 ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for side, label in (("open", "`auth: none`"), ("key", "`auth: key` (bearer key checked)")):
        s = r[side]
        rounds = ", ".join(f"{x:,.0f}" for x in s["rps"])
        rows.append(
            f"| {label} | {s['rps_median']:,.0f} | {rounds} | {s['p50_ms']:.2f} | "
            f"{s['p99_ms']:.2f} |"
        )
    rows += ["", f"Cost of the key check: {r['cost_pct']:.1f} % of warm req/s."]
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--conns", type=int, default=16)
    args = parser.parse_args()
    result = run(args.seconds, args.rounds, args.conns)
    info = machine()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "auth.json").write_text(json.dumps({"machine": info, **result}, indent=2))
    text = report(info, result)
    (RESULTS / "auth.md").write_text(text)
    sys.stdout.write(text)


if __name__ == "__main__":
    main()
