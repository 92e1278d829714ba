"""The fault test: 1,000 async invocations, ``kill -9`` of the server at random points,
restarts on the same data dir; every accepted invocation ends succeeded or
dead-lettered, none is lost. Duplicates (attempts whose lease a killed server held)
are counted and reported, not asserted: at-least-once allows them.

Four submitter threads send ``POST /v1/functions/{name}/invoke`` with
``X-Nimbus-Invocation-Type: Event``, each with its own ``Idempotency-Key``; a
request the kill cut off is sent again with the same key, so a submission the
server stored but could not acknowledge comes back with its first id instead of
a second invocation. Leases are 6 times the function's 1 s timeout + the 1 s
scheduler queue timeout = 7 s, so a killed server's work is redelivered soon.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support import NimbusServer, instance_pids

TOTAL = 1000
THREADS = 4
KILLS_WHILE_SUBMITTING = 3
FUNCTION = "fault-noop"


class Submitter(threading.Thread):
    def __init__(self, url: str, keys: list[str], api_key: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.api_key = api_key
        self.keys = keys
        self.accepted: dict[str, str] = {}  # key -> invocation id
        self.replays = 0
        self.refused = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            headers = {"authorization": f"Bearer {self.api_key}"}
            with httpx.Client(base_url=self.url, timeout=10, headers=headers) as client:
                for key in self.keys:
                    while True:
                        try:
                            r = client.post(
                                f"/v1/functions/{FUNCTION}/invoke",
                                content=json.dumps({"key": key}),
                                headers={
                                    "x-nimbus-invocation-type": "Event",
                                    "idempotency-key": key,
                                },
                            )
                        except httpx.HTTPError:
                            self.refused += 1
                            time.sleep(0.02)
                            continue
                        if r.status_code == 202:
                            self.accepted[key] = r.json()["invocation_id"]
                            self.replays += r.headers.get("x-nimbus-idempotent-replay") == "true"
                            break
                        assert r.status_code >= 500, r.text
                        time.sleep(0.02)
        except BaseException as e:
            self.error = e


def kill_9(server: NimbusServer) -> None:
    assert server.proc is not None
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    server._log.close()


def test_no_accepted_invocation_is_lost_across_kill_9(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], record_property: Any
) -> None:
    seed = int(os.environ.get("NIMBUS_FAULT_SEED", time.time()))
    rng = random.Random(seed)
    server = NimbusServer(tmp_path / "data", args=["--queue-timeout", "1"])
    started = time.monotonic()
    try:
        server.start()
        r = server.deploy("async-noop", name=FUNCTION)
        assert r.status_code == 201, r.text

        keys = [f"k-{i}" for i in range(TOTAL)]
        threads = [
            Submitter(server.url, keys[i::THREADS], server.admin_key) for i in range(THREADS)
        ]
        for t in threads:
            t.start()

        kills = 0
        restarts: list[float] = []
        for _ in range(KILLS_WHILE_SUBMITTING):
            time.sleep(rng.uniform(0.3, 1.5))
            kill_9(server)
            kills += 1
            time.sleep(rng.uniform(0.0, 0.5))  # submitters hammer a dead port meanwhile
            t0 = time.monotonic()
            server.start()
            restarts.append(time.monotonic() - t0)
        for t in threads:
            t.join(timeout=60)
            assert not t.is_alive(), "a submitter is stuck"
            assert t.error is None, t.error
        # One more while the queue drains: leases of this server must be redelivered.
        time.sleep(rng.uniform(0.0, 0.3))
        kill_9(server)
        kills += 1
        server.start()

        accepted = {k: v for t in threads for k, v in t.accepted.items()}
        assert len(accepted) == TOTAL
        assert len(set(accepted.values())) == TOTAL

        deadline = time.monotonic() + 45
        while True:
            r = server.client.get(
                "/v1/invocations", params={"function": FUNCTION, "limit": 10000}, timeout=30
            )
            listing = r.json()["invocations"]
            by_id = {i["id"]: i for i in listing}
            unfinished = [i for i in accepted.values() if by_id[i]["status"] not in FINISHED_OK]
            if not unfinished:
                break
            assert time.monotonic() < deadline, (
                f"{len(unfinished)} accepted invocations never finished, e.g. "
                f"{server.client.get(f'/v1/invocations/{unfinished[0]}').json()}"
            )
            time.sleep(0.2)

        # Nothing lost, and nothing extra: every stored invocation is an accepted one.
        assert set(by_id) == set(accepted.values())
        statuses = {s: sum(1 for i in listing if i["status"] == s) for s in FINISHED_OK}

        # Duplicates: invocations delivered again because a killed server held their
        # lease. "Ran twice" when the lost attempt's START reached the log store.
        redelivered = [i for i in listing if i["attempt_count"] > 1]
        ran_twice = 0
        for entry in redelivered:
            inv = server.client.get(f"/v1/invocations/{entry['id']}").json()
            lost = [a for a in inv["attempts"] if a["outcome"] == "LeaseExpired"]
            if any(r["message"].startswith("START") for a in lost for r in a["logs"]):
                ran_twice += 1
        replays = sum(t.replays for t in threads)
        refused = sum(t.refused for t in threads)
        report = (
            f"fault test (seed {seed}): {TOTAL} accepted, {kills} kill -9s "
            f"(restarts took {', '.join(f'{x:.1f}' for x in restarts)} s), "
            f"{refused} refused requests retried, {replays} idempotent replays "
            f"(stored but unacknowledged before a kill); outcome {statuses}; "
            f"{len(redelivered)} redelivered after a lost lease, {ran_twice} of them "
            f"known to have run twice; {time.monotonic() - started:.0f} s"
        )
        record_property("fault_report", report)
        record_property("duplicates", len(redelivered))
        with capsys.disabled():
            print("\n" + report)
        assert statuses["succeeded"] == TOTAL
    finally:
        server.close()
        assert not instance_pids(server.data_dir)


FINISHED_OK = ("succeeded", "dead-lettered")
