"""Schedule triggers against a real ``nimbus up``: firing through the async path, the
triggers API and CLI, rejection of bad schedules at deploy, and restarts (clean
and kill -9) that neither double-fire nor drop a scheduled time.

Policies that need a controllable clock (overlap, catch-up, time zones, DST) are
tested in tests/unit/test_runner.py.
"""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.support import FIXTURES, NimbusServer, running
from tests.support import nimbus_cli as nimbus


def invocations(server: NimbusServer, function: str) -> list[dict[str, Any]]:
    r = server.client.get("/v1/invocations", params={"function": function, "limit": 1000})
    assert r.status_code == 200, r.text
    return list(r.json()["invocations"])


def event_of(server: NimbusServer, invocation: dict[str, Any]) -> dict[str, Any]:
    """The scheduled event a succeeded run received (the function echoes it back)."""
    r = server.client.get(f"/v1/invocations/{invocation['id']}")
    assert r.status_code == 200, r.text
    result = r.json()["result"]
    result = json.loads(result) if isinstance(result, str) else result
    return dict(result["event"])


def scheduled(server: NimbusServer, function: str) -> list[dict[str, Any]]:
    return [i for i in invocations(server, function) if i["source"].startswith("schedule:")]


def wait_succeeded(
    server: NimbusServer, function: str, count: int, timeout: float = 20
) -> list[dict[str, Any]]:
    """At least ``count`` succeeded scheduled invocations (all of them, once there)."""
    deadline = time.monotonic() + timeout
    while True:
        done = [i for i in scheduled(server, function) if i["status"] == "succeeded"]
        if len(done) >= count:
            return done
        if time.monotonic() > deadline:
            pytest.fail(
                f"{len(done)} succeeded scheduled invocations of {function} after {timeout} s; "
                f"all: {scheduled(server, function)!r:.2000}\n{server.output()[-3000:]}"
            )
        time.sleep(0.2)


# -- deploy-time validation ------------------------------------------------------------


def test_a_bad_cron_is_rejected_at_deploy_with_the_reason(server: NimbusServer) -> None:
    r = server.deploy("sched-badcron")
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["code"] == "InvalidParameterValue"
    assert "triggers[0].schedule" in error["message"] and "'61 * * * *'" in error["message"]
    assert "minute" in error["message"]
    assert server.client.get("/v1/functions/sched-badcron").status_code == 404

    # The CLI says the same before uploading anything: one line, exit 1.
    out = nimbus(server, "deploy", str(FIXTURES / "sched-badcron"))
    assert out.returncode == 1
    assert out.stderr.startswith("error: ") and out.stderr.strip().count("\n") == 0
    assert "triggers[0].schedule" in out.stderr

    # An update with a bad trigger changes nothing.
    assert server.deploy("echo", name="sched-update").status_code == 201
    r = server.update(
        "sched-update", {"triggers": [{"type": "schedule", "schedule": "rate(0 days)"}]}
    )
    assert r.status_code == 400 and "triggers[0].schedule" in r.json()["error"]["message"]
    r = server.update("sched-update", {"triggers": [{"type": "cron", "schedule": "* * * * *"}]})
    assert r.status_code == 400 and "unknown trigger type 'cron'" in r.json()["error"]["message"]
    assert server.client.get("/v1/functions/sched-update").json()["version"] == 1
    server.client.delete("/v1/functions/sched-update")


# -- the triggers API and CLI ------------------------------------------------------------


def test_triggers_api(server: NimbusServer) -> None:
    assert server.deploy("echo", name="sched-api").status_code == 201
    base = "/v1/functions/sched-api/triggers"
    assert server.client.get(base).json() == {"triggers": []}

    r = server.client.post(
        base, json={"schedule": "rate(5 minutes)", "payload": {"k": "v"}, "overlap": "forbid"}
    )
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["version"] == 2
    added = body["trigger"]
    assert added["name"] == "schedule-0" and added["type"] == "schedule"
    assert (added["schedule"], added["timezone"], added["payload"]) == (
        "rate(5 minutes)",
        "UTC",
        {"k": "v"},
    )
    assert (added["overlap"], added["catch_up"], added["last_fire"]) == ("forbid", "none", None)
    assert added["next_fire"].endswith("Z")

    r = server.client.post(
        base,
        json={
            "type": "schedule",
            "schedule": "0 9 * * MON-FRI",
            "timezone": "Europe/Paris",
            "name": "weekday",
        },
    )
    assert r.status_code == 201 and r.json()["version"] == 3

    listed = server.client.get(base).json()["triggers"]
    assert [t["name"] for t in listed] == ["schedule-0", "weekday"]
    assert listed[1]["timezone"] == "Europe/Paris" and listed[1]["last_fire"] is None
    spec = server.client.get("/v1/functions/sched-api").json()["spec"]
    assert [t["name"] for t in spec["triggers"]] == ["schedule-0", "weekday"]

    # Errors: a taken name, a bad trigger, an unknown function or trigger.
    r = server.client.post(base, json={"schedule": "rate(1 hour)", "name": "weekday"})
    assert r.status_code == 409 and r.json()["error"]["code"] == "ResourceConflict"
    r = server.client.post(base, json={"schedule": "0 25 * * *"})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("trigger.schedule: invalid cron expression")
    r = server.client.post(base, json={"schedule": "rate(1 hour)", "timezone": "Mars/Base"})
    assert r.status_code == 400 and "unknown time zone" in r.json()["error"]["message"]
    r = server.client.post(base, json={"type": "sqs", "queue": "q"})
    assert r.status_code == 400 and "unknown trigger type" in r.json()["error"]["message"]
    r = server.client.post(base, content=b"not json")
    assert r.status_code == 400
    r = server.client.post("/v1/functions/nope/triggers", json={"schedule": "rate(1 hour)"})
    assert r.status_code == 404
    assert server.client.get("/v1/functions/nope/triggers").status_code == 404

    r = server.client.delete(f"{base}/schedule-0")
    assert r.status_code == 200 and r.json()["version"] == 4
    assert [t["name"] for t in server.client.get(base).json()["triggers"]] == ["weekday"]
    r = server.client.delete(f"{base}/schedule-0")
    assert r.status_code == 404 and "no trigger 'schedule-0'" in r.json()["error"]["message"]
    # The next unnamed trigger takes the first free default name.
    r = server.client.post(base, json={"schedule": "@daily"})
    assert r.json()["trigger"]["name"] == "schedule-1"
    server.client.delete("/v1/functions/sched-api")

    paths = server.client.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/functions/{name}/triggers"]) == {"get", "post"}
    assert "delete" in paths["/v1/functions/{name}/triggers/{trigger}"]


def test_triggers_cli(server: NimbusServer) -> None:
    assert server.deploy("echo", name="sched-cli").status_code == 201
    out = nimbus(server, "triggers", "list", "sched-cli")
    assert out.returncode == 0 and "has no triggers" in out.stdout

    out = nimbus(
        server,
        "triggers",
        "add",
        "sched-cli",
        "--schedule",
        "rate(5 minutes)",
        "--name",
        "every5",
        "--payload",
        '{"job": "sweep"}',
        "--overlap",
        "replace",
        "--catch-up",
        "once",
    )
    assert out.returncode == 0, out.stderr
    assert "Added trigger every5 to sched-cli (version 2)" in out.stdout

    out = nimbus(server, "triggers", "add", "sched-cli", "-s", "30 2 * * *", "--tz", "Asia/Tokyo")
    assert out.returncode == 0, out.stderr
    assert "Added trigger schedule-1" in out.stdout

    out = nimbus(server, "triggers", "list", "sched-cli")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "TYPE", "SOURCE", "STATE"]
    assert "every5" in lines[1] and "replace" in lines[1] and "never" in lines[1]
    assert "Asia/Tokyo" in lines[2]
    out = nimbus(server, "triggers", "list", "sched-cli", "--json")
    listed = json.loads(out.stdout)["triggers"]
    assert listed[0]["payload"] == {"job": "sweep"} and listed[0]["catch_up"] == "once"

    # User errors: one line on stderr, exit 1, nothing published.
    for args, words in [
        (["add", "sched-cli", "--schedule", "61 * * * *"], "invalid cron expression"),
        (["add", "sched-cli", "--schedule", "rate(1 hour)", "--payload", "{"], "not valid JSON"),
        (["add", "sched-cli", "--schedule", "rate(1 hour)", "--name", "every5"], "already has"),
        (["add", "nope", "--schedule", "rate(1 hour)"], "does not exist"),
        (["remove", "sched-cli", "missing"], "no trigger 'missing'"),
        (["list", "nope"], "does not exist"),
    ]:
        out = nimbus(server, "triggers", *args)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert out.stderr.startswith("error: ") and words in out.stderr, (args, out.stderr)
        assert out.stderr.strip().count("\n") == 0, out.stderr
    out = nimbus(server, "triggers", "add", "sched-cli", "--schedule", "x", "--overlap", "never")
    assert out.returncode != 0

    out = nimbus(server, "triggers", "remove", "sched-cli", "every5")
    assert out.returncode == 0 and "Removed trigger every5 from sched-cli (version 4)" in out.stdout
    assert server.client.get("/v1/functions/sched-cli").json()["version"] == 4
    server.client.delete("/v1/functions/sched-cli")


# -- firing through the async path (needs the AsyncInvoker) ------------------------------


def check_unique(server: NimbusServer, runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The events of ``runs``: one invocation per scheduled time, distinct event ids."""
    events = [event_of(server, i) for i in runs]
    times = Counter(e["time"] for e in events)
    assert max(times.values()) == 1, f"a scheduled time ran twice: {times.most_common(3)}"
    ids = Counter(e["id"] for e in events)
    assert max(ids.values()) == 1, f"an event ran twice: {ids.most_common(3)}"
    return events


def test_a_schedule_fires_through_the_async_path(server: NimbusServer) -> None:
    r = server.deploy("sched-echo", name="sched-fire")
    assert r.status_code == 201, r.text
    runs = wait_succeeded(server, "sched-fire", 3)
    assert {i["source"] for i in runs} == {"schedule:schedule-0"}
    events = check_unique(server, runs)
    for event in events:
        assert event["detail-type"] == "Scheduled Event"
        assert event["source"] == "aws.events"
        assert event["detail"] == {"job": "tick", "n": 1}
        assert event["resources"] == [
            "arn:aws:events:us-east-1:000000000000:rule/sched-fire-schedule-0"
        ]
    # One a second, on the second it was due.
    times = sorted(e["time"] for e in events)
    assert len(set(times)) == len(times)

    triggers = server.client.get("/v1/functions/sched-fire/triggers").json()["triggers"]
    assert (
        triggers[0]["last_fire"] is not None and triggers[0]["next_fire"] > triggers[0]["last_fire"]
    )

    # Removing the trigger stops it.
    r = server.client.delete("/v1/functions/sched-fire/triggers/schedule-0")
    assert r.status_code == 200
    time.sleep(0.5)
    before = len(scheduled(server, "sched-fire"))
    time.sleep(2.5)
    assert len(scheduled(server, "sched-fire")) == before
    server.client.delete("/v1/functions/sched-fire")


@pytest.mark.parametrize("how", ["stop", "kill"])
def test_a_restart_does_not_double_fire(how: str, tmp_path: Path, wheelhouse: Path) -> None:
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse)}
    data = tmp_path / "data"
    with running(data, env=env) as first:
        assert first.deploy("sched-echo").status_code == 201
        wait_succeeded(first, "sched-echo", 2)
        first.stop(signal.SIGTERM if how == "stop" else signal.SIGKILL)
    with running(data, env=env) as second:
        # Runs from before the restart are still there; new ones follow.
        before = len(scheduled(second, "sched-echo"))
        wait_succeeded(second, "sched-echo", before + 3, timeout=30)
        runs = [i for i in scheduled(second, "sched-echo") if i["status"] == "succeeded"]
        check_unique(second, runs)
        everything = scheduled(second, "sched-echo")
        assert {i["status"] for i in everything} <= {"succeeded", "queued", "running"}
