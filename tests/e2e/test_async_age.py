"""max_event_age end to end (it is at least 60 s, so this test takes about a minute):
an event that keeps being throttled is given up once it is too old, and dead-lettered
with the condition EventAgeExceeded; throttling never counts against max_retries."""

from __future__ import annotations

import threading
import time

from tests.e2e.test_async import EVENT, Receiver, get, outcomes, receiver, wait  # noqa: F401
from tests.support import NimbusServer


def test_a_throttled_event_is_dead_lettered_when_too_old(
    server: NimbusServer,
    receiver: Receiver,  # noqa: F811
) -> None:
    r = server.deploy(
        "async-work",
        name="async-aged",
        timeout=90,
        scaling={"max": 1},
        **{
            "async": {
                "max_retries": 0,
                "max_event_age": 60,
                "backoff_base": 2,
                "backoff_max": 10,
                "dead_letter": receiver.url + "/aged",
            }
        },
    )
    assert r.status_code == 201, r.text
    # Hold the function's only instance with a synchronous call longer than the event age.
    blocker = threading.Thread(
        target=lambda: server.new_client(timeout=120).post(
            "/v1/functions/async-aged/invoke", json={"sleep": 75}
        ),
        daemon=True,
    )
    blocker.start()
    time.sleep(1.0)
    started = time.monotonic()
    r = server.client.post("/v1/functions/async-aged/invoke", json={"n": 1}, headers=EVENT)
    assert r.status_code == 202, r.text
    invocation_id = r.headers["x-nimbus-invocation-id"]
    inv = wait(server, invocation_id, timeout=80)
    elapsed = time.monotonic() - started
    assert inv["status"] == "dead-lettered", inv
    assert set(outcomes(inv)) == {"Throttled"} and inv["function_errors"] == 0
    assert 40 <= elapsed <= 75, elapsed  # given up near the 60 s age, not after 0 retries
    _, record = receiver.wait("/aged", timeout=20)
    assert record["requestContext"]["condition"] == "EventAgeExceeded"
    assert record["requestPayload"] == {"n": 1}
    assert get(server, invocation_id)["status"] == "dead-lettered"
