"""Gateway overhead over calling a warm instance directly: run by bench/run.py as its own process.

Prints one JSON object with per-request latencies (µs) of N sequential round trips at each
layer of the invoke path, for the bench's hello handler, one request in flight at a time:

``gateway_http``
    ``GET <--gateway-url>`` (``/function/hello`` on the ``nimbus up`` that bench/run.py
    started) on one keep-alive TCP connection, from a minimal blocking raw-socket HTTP/1.1
    client in this process (it reads the status line, headers and Content-Length body).
``direct``
    One INVOKE frame to a warm instance and its RESULT frame, on the instance's own socket
    (the instance protocol, ``nimbus/runtimes/python/bootstrap.py``), with a blocking socket
    from this process. The instance is started here exactly as the executor starts one
    (``Executor.start``): the node's own launcher (sandboxed, forked from the zygote, as
    under ``nimbus up``), a SPEC frame with its environment, then READY. The event is the
    one the gateway builds for a ``GET /function/hello`` with only a Host header (wrk's).
``executor``
    ``Instance.invoke()`` on a warm instance from ``Executor.start``: the channel (asyncio,
    uvloop), START/END/REPORT lines to the node's log store, the output pipe's bookkeeping.
``invoker``
    ``Invoker.invoke("hello", event)``: adds the scheduler (acquire/release) and metrics:
    everything the gateway does but HTTP and building the event.

The last three run against a second node started in this process (``nimbus.server.Nimbus``
with its own data directory; sandboxed unless ``--insecure-no-sandbox``), after the
gateway_http run, so the two never compete for the CPU. Both clients are blocking Python
clients in this process, so client-side overhead is comparable on both sides.

    python bench/direct_invoke.py --gateway-url http://127.0.0.1:8080/function/hello \
        --data-dir /tmp/x -n 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import uvloop

from nimbus.config import Settings
from nimbus.executor.protocol import HEADER, INVOKE, QUIET, READY, RESULT, encode_frame
from nimbus.gateway.events import build_event
from nimbus.models import Version
from nimbus.server import Nimbus

BENCH = Path(__file__).resolve().parent
HELLO = BENCH / "functions" / "hello"
#: What the shim sends back for hello: the handler's return value, compact JSON.
EXPECTED = json.dumps(
    {
        "statusCode": 200,
        "headers": {"content-type": "application/json"},
        "body": '{"hello":"world"}',
    },
    separators=(",", ":"),
).encode()
EXPECTED_HTTP = b'{"hello":"world"}'


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("socket closed")
        buf += chunk
    return bytes(buf)


# -- HTTP, keep-alive, against nimbus up ------------------------------------------------------
def http_round_trips(url: str, n: int, warmup: int) -> tuple[list[float], int]:
    """(latencies µs, unexpected bodies) of n sequential GETs on one keep-alive connection."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    sock = socket.create_connection((host, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = bytearray()
    latencies: list[float] = []
    unexpected = 0

    def fill(upto: int) -> None:
        """Read until ``buf`` holds at least ``upto`` bytes."""
        while len(buf) < upto:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("server closed the connection")
            buf.extend(chunk)

    def find(sep: bytes, start: int) -> int:
        """Read until ``sep`` is in ``buf`` at or after ``start``; its offset."""
        while (at := buf.find(sep, start)) < 0:
            fill(len(buf) + 1)
        return at

    def one() -> bytes:
        """One request; the body (Content-Length or chunked), or b"" for a non-200 status."""
        sock.sendall(request)
        end = find(b"\r\n\r\n", 0)
        head = bytes(buf[:end]).lower()
        at = head.find(b"content-length:")
        if at >= 0:
            eol = head.find(b"\r\n", at)
            length = int(head[at + 15 : eol if eol >= 0 else len(head)])
            fill(end + 4 + length)
            body = bytes(buf[end + 4 : end + 4 + length])
            del buf[: end + 4 + length]
        elif b"transfer-encoding: chunked" in head:
            pos, parts = end + 4, []
            while True:
                eol = find(b"\r\n", pos)
                size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
                fill(eol + 2 + size + 2)
                parts.append(bytes(buf[eol + 2 : eol + 2 + size]))
                pos = eol + 2 + size + 2
                if size == 0:
                    break
            body = b"".join(parts)
            del buf[:pos]
        else:
            raise RuntimeError(f"neither content-length nor chunked: {head!r}")
        return body if head.startswith(b"http/1.1 200") else b""

    try:
        for _ in range(warmup):
            one()
        for _ in range(n):
            t0 = time.perf_counter_ns()
            body = one()
            latencies.append((time.perf_counter_ns() - t0) / 1000)
            unexpected += body != EXPECTED_HTTP
    finally:
        sock.close()
    return latencies, unexpected


# -- the instance protocol, directly ----------------------------------------------------------
class RawInstance:
    """One instance started like ``Executor.start`` does, whose socket stays ours (blocking)."""

    def __init__(self, sock: socket.socket, process: Any, read_fd: int) -> None:
        self.sock = sock
        self.process = process
        self._read_fd = read_fd
        # The instance's stdout/stderr pipe: drained so it can never fill up (hello prints
        # nothing, so the shim replies QUIET and writes no sentinel on the hot path).
        self.output = bytearray()
        self._drain = threading.Thread(target=self._drain_output, daemon=True)
        self._drain.start()

    def _drain_output(self) -> None:
        with contextlib.suppress(OSError):
            while chunk := os.read(self._read_fd, 65536):
                self.output += chunk
        with contextlib.suppress(OSError):
            os.close(self._read_fd)

    def frame(self) -> tuple[int, float, int, bytes]:
        length, kind, _, seconds, number = HEADER.unpack(recv_exactly(self.sock, HEADER.size))
        return kind & ~QUIET, seconds, number, recv_exactly(self.sock, length) if length else b""

    def invoke(self, rid: bytes, event: bytes) -> bytes:
        self.sock.sendall(encode_frame(INVOKE, rid, time.time() + 10, 0, event))
        kind, _, _, body = self.frame()
        if kind != RESULT:
            raise RuntimeError(f"instance replied kind {kind}: {body[:300]!r}")
        return body

    async def stop(self) -> None:
        self.sock.close()  # the shim returns when its socket closes
        self.process.kill()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.process.wait(), 5)
        await self.process.cleanup()


async def start_raw(node: Nimbus, version: Version) -> RawInstance:
    """``Executor.start`` without the asyncio channel: the executor's own launch, then the
    READY frame read with a blocking socket."""
    launched = await node.executor.launch(version)
    raw = RawInstance(launched.sock, launched.process, launched.output_fd)
    launched.sock.setblocking(True)
    launched.sock.settimeout(30)
    kind, _, _, body = raw.frame()
    if kind != READY:
        await raw.stop()
        raise RuntimeError(f"instance init failed: kind {kind}: {body[:300]!r}")
    return raw


def stats(us: list[float]) -> dict[str, float]:
    s = sorted(us)

    def q(p: float) -> float:  # nearest rank
        return s[max(1, math.ceil(p / 100 * len(s))) - 1]

    return {"p50": q(50), "p90": q(90), "p99": q(99), "mean": sum(s) / len(s), "min": s[0]}


async def in_process(args: argparse.Namespace, out: dict[str, Any]) -> None:
    settings = Settings(
        data_dir=Path(args.data_dir).resolve(), insecure_no_sandbox=args.insecure_no_sandbox
    )
    node = Nimbus(settings)
    await node.start()
    raw: RawInstance | None = None
    inst = None
    try:
        name, _, _ = await node.deploy_directory(HELLO)
        version = node.functions.current(name)
        host = urlsplit(args.gateway_url).netloc
        scope = {"type": "http", "headers": [(b"host", host.encode())], "query_string": b""}
        rid = uuid.uuid4()
        event = build_event(scope, b"", "/", str(rid), time.time())
        out["event_bytes"] = len(event)
        n, warmup = args.n, args.warmup

        # Direct: INVOKE/RESULT frames on the instance's own socket, blocking client.
        raw = await start_raw(node, version)
        for _ in range(warmup):
            raw.invoke(rid.bytes, event)
        lat, bad = [], 0
        for _ in range(n):
            t0 = time.perf_counter_ns()
            body = raw.invoke(rid.bytes, event)
            lat.append((time.perf_counter_ns() - t0) / 1000)
            bad += body != EXPECTED
        out["direct"] = {"us": lat, "unexpected": bad}
        out["direct_output_bytes"] = len(raw.output)
        await raw.stop()
        raw = None

        # The executor's Instance.invoke on a warm instance (channel, logs, output pipe).
        inst = await node.executor.start(version)
        for _ in range(warmup):
            await inst.invoke(str(rid), rid.bytes, event)
        lat, bad = [], 0
        for _ in range(n):
            r = uuid.uuid4()
            t0 = time.perf_counter_ns()
            result = await inst.invoke(str(r), r.bytes, event)
            lat.append((time.perf_counter_ns() - t0) / 1000)
            bad += result.error is not None or result.body != EXPECTED
        out["executor"] = {"us": lat, "unexpected": bad}
        await inst.stop()
        inst = None

        # The invoker: scheduler + metrics + executor (an instance from the scheduler).
        for _ in range(warmup):
            await node.invoker.invoke(name, event)
        lat, bad = [], 0
        for _ in range(n):
            t0 = time.perf_counter_ns()
            result = await node.invoker.invoke(name, event)
            lat.append((time.perf_counter_ns() - t0) / 1000)
            bad += result.error is not None or result.body != EXPECTED
        out["invoker"] = {"us": lat, "unexpected": bad}
    finally:
        if raw is not None:
            await raw.stop()
        if inst is not None:
            await inst.stop()
        await node.stop()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--gateway-url", required=True, help="…/function/hello on a running node")
    p.add_argument("--data-dir", required=True, help="for this process's own node")
    p.add_argument("-n", type=int, default=2000)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--insecure-no-sandbox", action="store_true")
    args = p.parse_args(argv)
    out: dict[str, Any] = {"n": args.n}
    lat, bad = http_round_trips(args.gateway_url, args.n, args.warmup)
    out["gateway_http"] = {"us": lat, "unexpected": bad}
    uvloop.run(in_process(args, out))
    for key in ("gateway_http", "direct", "executor", "invoker"):
        out[key].update(stats(out[key]["us"]))
    json.dump(out, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
