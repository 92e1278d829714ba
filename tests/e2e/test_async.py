"""Asynchronous invocations against a real server, real sandboxed instances, and HTTP
receivers on 127.0.0.1: 202 only once stored, retries with backoff, dead-letter,
destinations, callbacks, cancel, idempotency, per-function caps, the CLI.

``max_event_age`` is at least 60 s: its end-to-end test is test_async_age.py (a
minute long); the age decisions themselves (dead-lettering when leased, giving
up a retry that would come too late) are unit-tested with a synthetic clock in
tests/unit/test_asyncinvoke.py.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.support import NimbusServer
from tests.support import nimbus_cli as nimbus

EVENT = {"x-nimbus-invocation-type": "Event"}
FINISHED = ("succeeded", "failed", "dead-lettered", "cancelled")


class Receiver:
    """An HTTP server on 127.0.0.1 that records every POST (path, headers, JSON body)."""

    def __init__(self) -> None:
        self.posts: queue.Queue[tuple[str, dict[str, str], Any]] = queue.Queue()
        posts = self.posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                try:
                    value = json.loads(body)
                except ValueError:
                    value = body.decode(errors="replace")
                posts.put((self.path, {k.lower(): v for k, v in self.headers.items()}, value))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def wait(self, path: str, timeout: float = 15) -> tuple[dict[str, str], Any]:
        """The next POST to ``path`` (others that arrive meanwhile are kept for later)."""
        deadline = time.monotonic() + timeout
        later = []
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no POST to {path} within {timeout} s")
                try:
                    got = self.posts.get(timeout=remaining)
                except queue.Empty:
                    continue
                if got[0] == path:
                    return got[1], got[2]
                later.append(got)
        finally:
            for item in later:
                self.posts.put(item)

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def deploy(server: NimbusServer, name: str, fixture: str = "async-work", **spec: Any) -> None:
    r = server.deploy(fixture, name=name, **spec)
    assert r.status_code == 201, r.text


def submit(server: NimbusServer, name: str, event: Any = None, **headers: str) -> str:
    r = server.client.post(
        f"/v1/functions/{name}/invoke",
        content=json.dumps(event if event is not None else {}),
        headers={**EVENT, **headers},
    )
    assert r.status_code == 202, r.text
    assert r.headers["x-nimbus-invocation-id"] == r.json()["invocation_id"]
    return str(r.json()["invocation_id"])


def get(server: NimbusServer, invocation_id: str) -> dict[str, Any]:
    r = server.client.get(f"/v1/invocations/{invocation_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def wait(
    server: NimbusServer,
    invocation_id: str,
    statuses: tuple[str, ...] = FINISHED,
    timeout: float = 20,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        inv = get(server, invocation_id)
        if inv["status"] in statuses:
            return inv
        if time.monotonic() > deadline:
            raise AssertionError(f"still {inv['status']} after {timeout} s: {inv}")
        time.sleep(0.05)


def listed(server: NimbusServer, **params: Any) -> list[dict[str, Any]]:
    r = server.client.get("/v1/invocations", params={"limit": 10000, **params})
    assert r.status_code == 200, r.text
    return list(r.json()["invocations"])


def ts(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def outcomes(inv: dict[str, Any]) -> list[str]:
    return [a["outcome"] for a in inv["attempts"]]


# ------------------------------------------------------------------------------ tests


def test_event_invoke_is_accepted_then_runs_with_its_logs(server: NimbusServer) -> None:
    deploy(server, "async-basic")
    invocation_id = submit(server, "async-basic", {"n": 1})
    inv = wait(server, invocation_id)
    assert inv["status"] == "succeeded" and inv["function"] == "async-basic"
    assert inv["source"] == "api" and inv["error"] is None
    assert inv["result"] == {"ok": True, "event": {"n": 1}}
    [attempt] = inv["attempts"]
    assert attempt["outcome"] == "succeeded" and attempt["number"] == 1
    messages = [r["message"] for r in attempt["logs"]]
    assert messages[0] == f"START RequestId: {attempt['request_id']} Version: 1"
    assert f"attempt {attempt['request_id']}" in messages
    assert messages[-1].startswith(f"REPORT RequestId: {attempt['request_id']}")
    assert ts(inv["created_at"]) <= ts(attempt["started_at"]) <= ts(attempt["ended_at"])

    # Lambda's header works too, and the list has both, newest first.
    r = server.client.post(
        "/v1/functions/async-basic/invoke",
        content=b"",
        headers={"X-Amz-Invocation-Type": "Event"},
    )
    assert r.status_code == 202
    second = r.json()["invocation_id"]
    assert [i["id"] for i in listed(server, function="async-basic")] == [second, invocation_id]
    assert wait(server, second)["result"]["event"] == {}


def test_refused_before_anything_is_queued(server: NimbusServer) -> None:
    deploy(server, "async-refuse")
    before = listed(server, function="async-refuse")
    r = server.client.post("/v1/functions/async-nope/invoke", content=b"{}", headers=EVENT)
    assert r.status_code == 404 and r.json()["error"]["code"] == "ResourceNotFound"
    big = json.dumps({"pad": "x" * (1024 * 1024)})
    r = server.client.post("/v1/functions/async-refuse/invoke", content=big, headers=EVENT)
    assert r.status_code == 413 and r.json()["error"]["code"] == "RequestTooLarge"
    r = server.client.post("/async-function/async-refuse", content=big)
    assert r.status_code == 413
    r = server.client.post("/async-function/async-nope", content=b"{}")
    assert r.status_code == 404
    r = server.client.post("/v1/functions/async-refuse/invoke", content=b"{nope", headers=EVENT)
    assert r.status_code == 400
    r = server.client.post(
        "/v1/functions/async-refuse/invoke",
        content=b"{}",
        headers={"x-nimbus-invocation-type": "Later"},
    )
    assert r.status_code == 400
    r = server.client.post(
        "/async-function/async-refuse", content=b"{}", headers={"x-callback-url": "ftp://x"}
    )
    assert r.status_code == 400
    assert listed(server, function="async-refuse") == before
    r = server.client.get("/v1/invocations/not-an-id")
    assert r.status_code == 404 and r.json()["error"]["code"] == "ResourceNotFound"
    r = server.client.get("/v1/invocations", params={"status": "sleeping"})
    assert r.status_code == 400
    # DryRun checks only.
    r = server.client.post(
        "/v1/functions/async-refuse/invoke",
        content=b"{}",
        headers={"x-nimbus-invocation-type": "DryRun"},
    )
    assert r.status_code == 204


def test_function_errors_are_retried_with_backoff(server: NimbusServer) -> None:
    deploy(
        server,
        "async-flaky",
        **{"async": {"max_retries": 2, "backoff_base": 1.0, "backoff_factor": 2.0}},
    )
    # Attempts come at about 0 s, 1 s (±10 %) and 3 s: the first two fail.
    invocation_id = submit(server, "async-flaky", {"fail_until": time.time() + 2.0})
    inv = wait(server, invocation_id, timeout=20)
    assert inv["status"] == "succeeded", inv
    assert outcomes(inv) == ["Unhandled", "Unhandled", "succeeded"], inv["attempts"]
    assert inv["function_errors"] == 2 and inv["error"] is None
    a1, a2, a3 = inv["attempts"]
    first_gap = ts(a2["started_at"]) - ts(a1["ended_at"])
    second_gap = ts(a3["started_at"]) - ts(a2["ended_at"])
    assert 0.85 <= first_gap <= 1.6, first_gap
    assert 1.75 <= second_gap <= 2.8, second_gap
    assert a1["error"]["errorMessage"].startswith("not yet")
    assert len({a1["request_id"], a2["request_id"], a3["request_id"]}) == 3
    for attempt in (a1, a2):  # each attempt's own logs, the traceback included
        text = "\n".join(r["message"] for r in attempt["logs"])
        assert f"attempt {attempt['request_id']}" in text and "not yet" in text
        assert all(r["request_id"] == attempt["request_id"] for r in attempt["logs"])


def test_dead_letter_to_a_function_and_an_http_receiver(
    server: NimbusServer, receiver: Receiver
) -> None:
    deploy(server, "async-dlq-sink", fixture="async-sink")
    deploy(
        server,
        "async-doomed",
        **{
            "async": {
                "max_retries": 1,
                "backoff_base": 0.05,
                "on_failure": "function:async-dlq-sink",
                "dead_letter": receiver.url + "/dlq",
            }
        },
    )
    event = {"fail": True, "order": 7}
    invocation_id = submit(server, "async-doomed", event)
    inv = wait(server, invocation_id)
    assert inv["status"] == "dead-lettered"
    assert outcomes(inv) == ["Unhandled", "Unhandled"] and inv["function_errors"] == 2
    assert inv["error"]["errorMessage"] == "this event always fails"

    _, record = receiver.wait("/dlq")
    assert record["version"] == "1.0"
    assert record["requestContext"] == {
        "requestId": invocation_id,
        "functionArn": "arn:aws:lambda:us-east-1:000000000000:function:async-doomed",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 2,
    }
    assert record["requestPayload"] == event
    assert record["responseContext"] == {
        "statusCode": 200,
        "executedVersion": "1",
        "functionError": "Unhandled",
    }
    assert record["responsePayload"]["errorType"] == "RuntimeError"

    deadline = time.monotonic() + 15
    while not (sunk := listed(server, function="async-dlq-sink", status="succeeded")):
        assert time.monotonic() < deadline, "the on_failure destination never ran"
        time.sleep(0.05)
    [entry] = sunk
    assert entry["source"] == "destination:async-doomed"
    assert get(server, entry["id"])["result"] == record


def test_on_success_destination_and_openfaas_callback(
    server: NimbusServer, receiver: Receiver
) -> None:
    deploy(server, "async-happy", **{"async": {"on_success": receiver.url + "/ok"}})
    r = server.client.post(
        "/async-function/async-happy/orders/7?expand=1",
        content=b"hello",
        headers={"x-callback-url": receiver.url + "/cb", "content-type": "text/plain"},
    )
    assert r.status_code == 202, r.text
    invocation_id = r.headers["x-nimbus-invocation-id"]
    assert r.headers["x-call-id"] == invocation_id == r.json()["invocation_id"]

    headers, body = receiver.wait("/cb")
    assert headers["x-function-status"] == "200"
    assert headers["x-call-id"] == headers["x-nimbus-invocation-id"] == invocation_id
    event = body["event"]  # the payload 2.0 event the sync gateway would build
    assert event["version"] == "2.0" and event["rawPath"] == "/orders/7"
    assert event["rawQueryString"] == "expand=1" and event["body"] == "hello"
    assert event["requestContext"]["http"]["method"] == "POST"
    assert event["headers"]["x-callback-url"] == receiver.url + "/cb"

    _, record = receiver.wait("/ok")
    assert record["requestContext"]["condition"] == "Success"
    assert record["requestContext"]["requestId"] == invocation_id
    assert record["requestContext"]["approximateInvokeCount"] == 1
    assert record["requestPayload"] == event
    assert record["responsePayload"] == body
    inv = get(server, invocation_id)
    assert inv["status"] == "succeeded" and inv["source"] == "gateway"


def test_failure_callback(server: NimbusServer, receiver: Receiver) -> None:
    deploy(server, "async-cb-fail", **{"async": {"max_retries": 0}})
    r = server.client.post(
        "/async-function/async-cb-fail?fail=1",
        headers={"x-callback-url": receiver.url + "/cb-fail"},
    )
    assert r.status_code == 202
    headers, body = receiver.wait("/cb-fail")
    assert headers["x-function-status"] == "500"
    assert headers["x-call-id"] == r.headers["x-call-id"]
    assert body["errorMessage"] == "this event always fails"
    assert get(server, r.headers["x-call-id"])["status"] == "dead-lettered"
    # The direct route takes an X-Callback-Url as well.
    invocation_id = submit(
        server, "async-cb-fail", {"fail": True}, **{"x-callback-url": receiver.url + "/cb-dead"}
    )
    headers, body = receiver.wait("/cb-dead")
    assert headers["x-function-status"] == "500" and headers["x-call-id"] == invocation_id
    assert body["errorType"] == "RuntimeError"


def test_cancel_a_queued_invocation(server: NimbusServer) -> None:
    deploy(
        server,
        "async-one",
        scaling={"max": 1},
        **{"async": {"max_concurrency": 1}},
    )
    first = submit(server, "async-one", {"sleep": 2})
    wait(server, first, statuses=("running",))
    second = submit(server, "async-one", {})
    assert get(server, second)["status"] == "queued"

    r = server.client.delete(f"/v1/invocations/{second}")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled" and r.json()["id"] == second
    r = server.client.delete(f"/v1/invocations/{second}")
    assert r.status_code == 409 and r.json()["error"]["code"] == "ResourceConflict"
    r = server.client.delete(f"/v1/invocations/{first}")
    assert r.status_code == 409 and "running" in r.json()["error"]["message"]
    r = server.client.delete("/v1/invocations/00000000-0000-0000-0000-000000000000")
    assert r.status_code == 404

    assert wait(server, first)["status"] == "succeeded"
    time.sleep(0.3)
    cancelled = get(server, second)
    assert cancelled["status"] == "cancelled" and cancelled["attempts"] == []


def test_idempotency_key(server: NimbusServer) -> None:
    deploy(server, "async-idem")
    r1 = server.client.post(
        "/v1/functions/async-idem/invoke",
        content=b'{"n": 1}',
        headers={**EVENT, "idempotency-key": "order-1"},
    )
    assert r1.status_code == 202 and "x-nimbus-idempotent-replay" not in r1.headers
    invocation_id = r1.json()["invocation_id"]
    wait(server, invocation_id)
    r2 = server.client.post(
        "/v1/functions/async-idem/invoke",
        content=b'{"n": 2}',
        headers={**EVENT, "idempotency-key": "order-1"},
    )
    assert r2.status_code == 202 and r2.headers["x-nimbus-idempotent-replay"] == "true"
    assert r2.json()["invocation_id"] == r2.headers["x-nimbus-invocation-id"] == invocation_id
    r3 = server.client.post("/async-function/async-idem", headers={"idempotency-key": "order-1"})
    assert r3.status_code == 202 and r3.headers["x-call-id"] == invocation_id
    other = submit(server, "async-idem", {}, **{"idempotency-key": "order-2"})
    assert other != invocation_id
    wait(server, other)
    time.sleep(0.3)
    inv = get(server, invocation_id)
    assert inv["idempotency_key"] == "order-1" and len(inv["attempts"]) == 1
    assert inv["result"]["event"] == {"n": 1}
    starts = [r for r in server.logs("async-idem") if r["message"].startswith("START")]
    assert len(starts) == 2  # order-1 once, order-2 once
    assert len(listed(server, function="async-idem")) == 2


def test_a_burst_of_events_does_not_starve_sync_callers(server: NimbusServer) -> None:
    # scaling.max 4: async may use half (2); synchronous calls keep the other two.
    deploy(server, "async-burst", scaling={"max": 4})
    ids = [submit(server, "async-burst", {"sleep": 0.5}) for _ in range(50)]
    deadline = time.monotonic() + 10
    while len(listed(server, function="async-burst", status="running")) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    for _ in range(10):
        started = time.monotonic()
        r = server.client.post("/v1/functions/async-burst/invoke", content=b"{}")
        elapsed = time.monotonic() - started
        assert r.status_code == 200, r.text
        assert "x-nimbus-function-error" not in r.headers
        assert elapsed < 1.5, elapsed
        running = listed(server, function="async-burst", status="running")
        assert len(running) <= 2
        r = server.client.get("/function/async-burst")
        assert r.status_code == 200
    assert len(listed(server, function="async-burst", status="queued")) > 20

    # Deleting the function drops its invocations, queued or not.
    assert server.client.delete("/v1/functions/async-burst").status_code == 204
    assert listed(server, function="async-burst") == []
    assert server.client.get(f"/v1/invocations/{ids[-1]}").status_code == 404


def test_cli(server: NimbusServer) -> None:
    deploy(server, "async-cli")
    out = nimbus(server, "invoke", "async-cli", "--async", "--data", '{"hi": 1}')
    assert out.returncode == 0, out.stderr
    invocation_id = out.stdout.strip()
    assert len(invocation_id) == 36
    wait(server, invocation_id)

    out = nimbus(server, "invocations", "get", invocation_id)
    assert out.returncode == 0, out.stderr
    assert "succeeded" in out.stdout and '"hi": 1' in out.stdout
    assert "START RequestId" in out.stdout

    out = nimbus(server, "invocations", "get", invocation_id, "--json")
    assert json.loads(out.stdout)["id"] == invocation_id

    key_args = ("invoke", "async-cli", "--async", "--idempotency-key", "k-1")
    first = nimbus(server, *key_args)
    again = nimbus(server, *key_args)
    assert first.returncode == again.returncode == 0
    assert first.stdout == again.stdout and "used before" in again.stderr

    out = nimbus(server, "invocations", "list", "--function", "async-cli")
    assert out.returncode == 0 and invocation_id in out.stdout
    out = nimbus(server, "invocations", "list", "--function", "async-cli", "--json")
    assert invocation_id in {i["id"] for i in json.loads(out.stdout)["invocations"]}

    out = nimbus(server, "invocations", "cancel", invocation_id)
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and len(out.stderr.strip().splitlines()) == 1
    assert "only queued invocations can be cancelled" in out.stderr
    out = nimbus(server, "invocations", "list", "--status", "sleeping")
    assert out.returncode == 1 and "--status must be one of" in out.stderr
    out = nimbus(server, "invoke", "async-nope", "--async")
    assert out.returncode == 1 and "does not exist" in out.stderr
    out = nimbus(server, "invoke", "async-cli", "--idempotency-key", "x")
    assert out.returncode == 1 and "--async" in out.stderr


def test_status_survives_in_flight_http_clients(server: NimbusServer) -> None:
    """Many concurrent submissions each get their own durable id."""
    deploy(server, "async-many", fixture="async-noop")
    with server.new_client(timeout=30) as client:
        ids: list[str] = []
        lock = threading.Lock()

        def worker() -> None:
            for _ in range(25):
                r = client.post("/v1/functions/async-many/invoke", content=b"{}", headers=EVENT)
                assert r.status_code == 202
                with lock:
                    ids.append(r.json()["invocation_id"])

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(set(ids)) == 100
    for invocation_id in ids:
        assert wait(server, invocation_id)["status"] == "succeeded"
