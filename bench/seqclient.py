"""Sequential latency client, run by bench/run.py as its own process.

Sends N requests one after another, each on a fresh TCP connection (``http.client``),
with a pause between them, and prints one JSON object: per-request latency (connect to
last body byte, ms), status codes and how many bodies were not the expected one.

    python bench/seqclient.py --url http://127.0.0.1:8080/function/hello-cold -n 50 --pause 0.05
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import time
from urllib.parse import urlsplit


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("-n", type=int, default=50)
    p.add_argument("--pause", type=float, default=0.05, help="seconds between requests")
    p.add_argument("--method", default="GET")
    p.add_argument("--data", default=None, help="request body")
    p.add_argument("--expect", default='{"hello":"world"}', help="expected response body")
    p.add_argument("--timeout", type=float, default=30)
    args = p.parse_args(argv)

    url = urlsplit(args.url)
    target = url.path + (f"?{url.query}" if url.query else "")
    body = args.data.encode() if args.data is not None else None
    latencies: list[float] = []
    statuses: list[int] = []
    unexpected = 0
    for i in range(args.n):
        if i and args.pause > 0:
            time.sleep(args.pause)
        t0 = time.perf_counter()
        conn = http.client.HTTPConnection(
            url.hostname or "127.0.0.1", url.port, timeout=args.timeout
        )
        try:
            conn.request(args.method, target, body=body)
            resp = conn.getresponse()
            data = resp.read()
            elapsed = (time.perf_counter() - t0) * 1000
            status = resp.status
        except OSError as e:
            elapsed = (time.perf_counter() - t0) * 1000
            status, data = 0, repr(e).encode()
        finally:
            conn.close()
        latencies.append(elapsed)
        statuses.append(status)
        if data.decode(errors="replace") != args.expect:
            unexpected += 1
    json.dump(
        {"latencies_ms": latencies, "statuses": statuses, "unexpected": unexpected}, sys.stdout
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
