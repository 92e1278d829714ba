"""Message triggers: messages/s from NATS (JetStream) and Redis Streams through a no-op
function, and trigger-to-function latency (issue 6).

Starts ``nimbus up`` (sandboxed) on a free port with a temporary data dir; this
process is the publisher (the load generator, in another process than Nimbus) and
talks to the machine's brokers on loopback (``NIMBUS_TEST_NATS_URL``,
``NIMBUS_TEST_REDIS_URL`` override them).

1. **Throughput**: MESSAGES messages are published as fast as the client can
   (JetStream publishes are acknowledged by the server: they are durable), to a
   ``noop`` function's trigger (``max_concurrency`` = 4, ``scaling.max`` = 4);
   rate = messages / (time from the first publish until the trigger's
   ``succeeded`` counter reaches MESSAGES). With ``batch_size`` 1 and 10.
2. **Latency**: LATENCY_MESSAGES messages, one every 10 ms (the pipeline idle
   between them); each carries its publish time, the function prints
   ``now - sent`` (same clock: one machine); p50/p99 of those.

    python bench/trigger_bench.py [--messages 3000]

Prints markdown and writes bench/results/triggers.{md,json}. Every process it starts
is stopped by pid; the temporary directory, streams and consumers are removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from async_bench import Server, log

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
NATS_URL = os.environ.get("NIMBUS_TEST_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("NIMBUS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
LATENCY_MESSAGES = 300

NOOP = """def handler(event, context):
    return {}
"""
STAMP = """import json, time

def handler(event, context):
    now = time.time()
    for record in event["Records"]:
        sent = json.loads(record["body"])["sent"]
        print(f"LATENCY {(now - sent) * 1000:.3f}")
    return {}
"""


def succeeded(server: Server, function: str, trigger: str) -> int:
    r = server.client.get(f"/v1/functions/{function}/triggers")
    r.raise_for_status()
    for t in r.json()["triggers"]:
        if t["name"] == trigger:
            return int(t["status"]["succeeded"])
    return 0


def wait_connected(server: Server, function: str, trigger: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = server.client.get(f"/v1/functions/{function}/triggers")
        states = {t["name"]: t["status"]["state"] for t in r.json()["triggers"]}
        if states.get(trigger) == "connected":
            return
        time.sleep(0.05)
    raise RuntimeError(f"trigger {trigger} of {function} never connected")


def wait_succeeded(server: Server, function: str, trigger: str, count: int) -> float:
    """Block until ``count`` messages succeeded; the time it was seen (monotonic)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if succeeded(server, function, trigger) >= count:
            return time.monotonic()
        time.sleep(0.02)
    raise RuntimeError(f"{function}: only {succeeded(server, function, trigger)} of {count}")


def latencies(server: Server, function: str) -> list[float]:
    r = server.client.get(f"/v1/functions/{function}/logs", params={"limit": 10000})
    r.raise_for_status()
    out = []
    for rec in r.json()["records"]:
        m = re.match(r"LATENCY ([0-9.]+)", rec.get("message", ""))
        if m:
            out.append(float(m.group(1)))
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


# -- publishers ----------------------------------------------------------------------


async def nats_publish(subject: str, count: int, spacing: float = 0.0) -> float:
    import nats

    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    start = time.monotonic()
    pending = []
    for _ in range(count):
        body = json.dumps({"sent": time.time()}).encode()
        if spacing:
            await js.publish(subject, body)
            await asyncio.sleep(spacing)
        else:
            pending.append(asyncio.ensure_future(js.publish(subject, body)))
            if len(pending) >= 256:
                await asyncio.gather(*pending)
                pending.clear()
    await asyncio.gather(*pending)
    await nc.close()
    return start


async def nats_cleanup(stream: str) -> None:
    import nats

    nc = await nats.connect(NATS_URL)
    try:
        await nc.jetstream().delete_stream(stream)
    except Exception as e:  # already gone
        log(f"  (stream {stream}: {e})")
    await nc.close()


async def redis_publish(stream: str, count: int, spacing: float = 0.0) -> float:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    start = time.monotonic()
    pipe = client.pipeline(transaction=False)
    for i in range(count):
        body = json.dumps({"sent": time.time()})
        if spacing:
            await client.xadd(stream, {"body": body})
            await asyncio.sleep(spacing)
        else:
            pipe.xadd(stream, {"body": body})
            if i % 256 == 255:
                await pipe.execute()
    await pipe.execute()
    await client.aclose()
    return start


async def redis_cleanup(stream: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    await client.delete(stream)
    await client.aclose()


# -- one broker ----------------------------------------------------------------------


def trigger_for(broker: str, key: str, **fields: Any) -> dict[str, Any]:
    if broker == "nats":
        return {"type": "nats", "name": "t", "subject": f"{key}.in", "stream": key, **fields}
    return {"type": "redis", "name": "t", "stream": key, **fields}


def publish(broker: str, key: str, count: int, spacing: float = 0.0) -> float:
    if broker == "nats":
        return asyncio.run(nats_publish(f"{key}.in", count, spacing))
    return asyncio.run(redis_publish(key, count, spacing))


def cleanup(broker: str, key: str) -> None:
    asyncio.run(nats_cleanup(key) if broker == "nats" else redis_cleanup(key))


def measure(server: Server, tmp: Path, broker: str, messages: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for batch in (1, 10):
        key = f"bench{broker}{batch}{uuid.uuid4().hex[:6]}"
        name = f"noop-{broker}-{batch}"
        spec = {
            "scaling": {"max": 4, "min": 4},
            "triggers": [trigger_for(broker, key, batch_size=batch, max_concurrency=4)],
        }
        if batch > 1:
            spec["triggers"][0]["batch_window"] = 0.005
        server.deploy(tmp, name, NOOP, spec)
        wait_connected(server, name, "t")
        try:
            start = publish(broker, key, messages)
            end = wait_succeeded(server, name, "t", messages)
        finally:
            cleanup(broker, key)
        rate = messages / (end - start)
        out[f"batch{batch}_msgs_per_s"] = round(rate)
        log(f"  {broker} batch_size {batch}: {rate:,.0f} messages/s")
    key = f"benchlat{broker}{uuid.uuid4().hex[:6]}"
    name = f"stamp-{broker}"
    spec = {"scaling": {"min": 1, "max": 2}, "triggers": [trigger_for(broker, key)]}
    server.deploy(tmp, name, STAMP, spec)
    wait_connected(server, name, "t")
    try:
        publish(broker, key, LATENCY_MESSAGES, spacing=0.01)
        wait_succeeded(server, name, "t", LATENCY_MESSAGES)
    finally:
        cleanup(broker, key)
    lat = latencies(server, name)
    out["latency_p50_ms"] = round(statistics.median(lat), 2)
    out["latency_p99_ms"] = round(pct(lat, 99), 2)
    log(f"  {broker} latency p50 {out['latency_p50_ms']} ms, p99 {out['latency_p99_ms']} ms")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    args = parser.parse_args()
    results: dict[str, Any] = {"messages": args.messages, "loadavg": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory(prefix="nimbus-trigger-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        server = Server(tmp / "data")
        server.start()
        try:
            for broker in ("nats", "redis"):
                log(f"{broker}:")
                results[broker] = measure(server, tmp, broker, args.messages)
        finally:
            server.stop()
    lines = [
        "| broker | msgs/s, batch 1 | msgs/s, batch 10 | latency p50 | latency p99 |",
        "|---|---|---|---|---|",
    ]
    for broker in ("nats", "redis"):
        r = results[broker]
        lines.append(
            f"| {broker} | {r['batch1_msgs_per_s']:,} | {r['batch10_msgs_per_s']:,} "
            f"| {r['latency_p50_ms']} ms | {r['latency_p99_ms']} ms |"
        )
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "triggers.md").write_text(table + "\n")
    (RESULTS / "triggers.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
