"""Function logs end to end: capture, START/END/REPORT, filters, follow."""

from __future__ import annotations

import json
import threading
import time

from tests.support import NimbusServer


def test_invocation_output_is_framed_by_start_end_report(server: NimbusServer) -> None:
    assert server.deploy("print-lots", name="log-lines").status_code == 201
    r = server.invoke("log-lines", {"lines": 2})
    rid = r.headers["x-nimbus-request-id"]
    records = server.wait_logs(
        "log-lines", lambda rs: any(x["message"].startswith("REPORT") for x in rs)
    )
    messages = [x["message"] for x in records]
    assert messages[0] == "init line from module top"
    assert records[0]["request_id"] == ""
    mine = [x["message"] for x in records if x["request_id"] == rid]
    assert mine[0] == f"START RequestId: {rid} Version: 1"
    assert mine[1:4] == ["line 0", "line 1", "to stderr"]
    assert mine[4].startswith("[INFO]\t") and mine[4].endswith(f"\t{rid}\tlogged with context")
    assert mine[5] == f"END RequestId: {rid}"
    report = mine[6]
    assert report.startswith(f"REPORT RequestId: {rid}\tDuration: ")
    for field in ("Billed Duration: ", "Memory Size: 128 MB", "Max Memory Used: "):
        assert field in report
    # The first invocation of a fork of the function zygote (init ran at publish) reports
    # a restore, as SnapStart does; one that ran its own init, an Init Duration.
    assert "Restore Duration: " in report or "Init Duration: " in report
    # A warm invocation has neither.
    r2 = server.invoke("log-lines", {"lines": 0})
    rid2 = r2.headers["x-nimbus-request-id"]
    records = server.wait_logs(
        "log-lines",
        lambda rs: any(x["message"].startswith(f"REPORT RequestId: {rid2}") for x in rs),
    )
    report2 = next(
        x["message"] for x in records if x["message"].startswith(f"REPORT RequestId: {rid2}")
    )
    assert "Init Duration" not in report2 and "Restore Duration" not in report2


def test_error_is_logged(server: NimbusServer) -> None:
    assert server.deploy("fails", name="log-fails").status_code == 201
    rid = server.invoke("log-fails").headers["x-nimbus-request-id"]
    records = server.wait_logs(
        "log-fails", lambda rs: any(x["message"].startswith("REPORT") for x in rs)
    )
    mine = [x["message"] for x in records if x["request_id"] == rid]
    assert any(m.startswith("[ERROR] PaymentDeclined: card 4242 was declined") for m in mine)


def test_init_failure_is_logged(server: NimbusServer) -> None:
    assert server.deploy("init-error", name="log-initerr", force=True).status_code == 201
    server.invoke("log-initerr")
    records = server.wait_logs(
        "log-initerr", lambda rs: any(x["message"].startswith("REPORT") for x in rs)
    )
    messages = [x["message"] for x in records]
    assert any("INIT_REPORT" in m and "Runtime.ImportModuleError" in m for m in messages)
    assert any("No module named 'a_module_that_does_not_exist'" in m for m in messages)


def test_limit_since_after_and_bad_params(server: NimbusServer) -> None:
    # echo prints only in its handler: a spare instance starting meanwhile adds no record.
    assert server.deploy("echo", name="log-filter").status_code == 201
    for _ in range(3):
        server.invoke("log-filter", {"lines": 1})
    records = server.wait_logs(
        "log-filter", lambda rs: sum(x["message"].startswith("REPORT") for x in rs) == 3
    )
    last_two = server.logs("log-filter", limit=2)
    assert [x["seq"] for x in last_two] == [x["seq"] for x in records[-2:]]
    after = server.logs("log-filter", after=records[-3]["seq"])
    assert [x["seq"] for x in after] == [x["seq"] for x in records[-2:]]
    assert server.logs("log-filter", since=str(time.time() + 60)) == []
    assert len(server.logs("log-filter", since="5m")) == len(records)
    r = server.client.get("/v1/functions/log-filter/logs", params={"since": "yesterday-ish"})
    assert r.status_code == 400 and "since" in r.json()["error"]["message"]
    r = server.client.get("/v1/functions/log-filter/logs", params={"limit": 0})
    assert r.status_code == 400 and r.json()["error"]["code"] == "InvalidParameterValue"
    assert server.client.get("/v1/functions/nope/logs").status_code == 404


def test_follow_streams_new_records(server: NimbusServer) -> None:
    assert server.deploy("print-lots", name="log-follow").status_code == 201
    seen: list[dict[str, object]] = []
    done = threading.Event()

    def follow() -> None:
        with (
            server.new_client(timeout=None) as c,
            c.stream("GET", "/v1/functions/log-follow/logs", params={"follow": "true"}) as r,
        ):
            assert r.headers["content-type"].startswith("application/x-ndjson")
            for line in r.iter_lines():
                seen.append(json.loads(line))
                if str(seen[-1]["message"]).startswith("REPORT"):
                    done.set()
                    return

    t = threading.Thread(target=follow, daemon=True)
    t.start()
    time.sleep(0.3)
    server.invoke("log-follow", {"lines": 1})
    assert done.wait(10)
    messages = [str(x["message"]) for x in seen]
    assert "line 0" in messages and messages[-1].startswith("REPORT")


def test_a_function_cannot_forge_platform_lines(server: NimbusServer) -> None:
    assert server.deploy("forger", name="log-forger").status_code == 201
    rid = server.invoke("log-forger").headers["x-nimbus-request-id"]
    records = server.wait_logs(
        "log-forger",
        lambda rs: any(x["platform"] and x["message"].startswith("REPORT") for x in rs),
    )
    mine = [(x["message"].split("\t")[0], x["platform"]) for x in records if x["request_id"] == rid]
    assert mine == [
        (f"START RequestId: {rid} Version: 1", True),
        (f"END RequestId: {rid}", False),  # printed by the function
        (f"REPORT RequestId: {rid}", False),
        (f"END RequestId: {rid}", True),  # the platform's
        (f"REPORT RequestId: {rid}", True),
    ]
