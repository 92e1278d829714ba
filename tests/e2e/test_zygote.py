"""Instances are forks of a zygote: what a user can observe of that."""

from __future__ import annotations

import time

from tests.support import NimbusServer


def test_forked_instances_never_share_random_state(server: NimbusServer) -> None:
    assert server.deploy("rng", name="zy-rng", scaling={"keep_warm": 0}).status_code == 201
    outs = [server.invoke("zy-rng").json() for _ in range(4)]  # a new instance each time
    assert len({o["instance"] for o in outs}) == 4
    for key in ("random", "urandom", "uuid"):
        assert len({o[key] for o in outs}) == 4, key


def test_common_stdlib_is_already_loaded_at_init(server: NimbusServer) -> None:
    assert server.deploy("rng", name="zy-pre").status_code == 201
    preloaded = server.invoke("zy-pre").json()["preloaded"]
    assert preloaded == {"decimal": True, "asyncio": True, "xml.etree.ElementTree": True}


def test_report_lines_mark_cold_and_warm_starts_and_describe_counts_them(
    server: NimbusServer,
) -> None:
    assert server.deploy("hello", name="zy-marks").status_code == 201
    for _ in range(3):
        assert server.invoke("zy-marks").status_code == 200
    records = server.wait_logs(
        "zy-marks", lambda rs: sum(x["message"].startswith("REPORT") for x in rs) == 3
    )
    reports = [x["message"] for x in records if x["message"].startswith("REPORT")]
    assert reports[0].endswith("\tStart: cold") and "Init Duration" in reports[0]
    assert all(r.endswith("\tStart: warm") for r in reports[1:])
    desc = server.client.get("/v1/functions/zy-marks").json()
    assert desc["starts"] == {"cold": 1, "warm": 2}
    assert desc["zygote"] == {"runtime": "python3.11", "up": True}
    assert desc["instances"]["warm"] == desc["instances"]["idle"] + desc["instances"]["busy"]


def test_min_instances_are_kept_warm_without_any_request(server: NimbusServer) -> None:
    assert server.deploy("hello", name="zy-min", scaling={"min": 2}).status_code == 201
    deadline = time.monotonic() + 10
    while server.client.get("/v1/functions/zy-min").json()["instances"]["idle"] < 2:
        assert time.monotonic() < deadline, "scaling.min instances never came up"
        time.sleep(0.1)
    assert server.invoke("zy-min").status_code == 200
    desc = server.client.get("/v1/functions/zy-min").json()
    assert desc["starts"] == {"cold": 0, "warm": 1}  # served by a prewarmed instance


def test_a_spare_instance_is_ready_while_busy(server: NimbusServer) -> None:
    assert server.deploy("hello", name="zy-spare").status_code == 201
    assert server.invoke("zy-spare").status_code == 200  # one instance, now idle
    assert server.invoke("zy-spare").status_code == 200  # takes it: a spare starts
    deadline = time.monotonic() + 10
    while server.client.get("/v1/functions/zy-spare").json()["instances"]["total"] < 2:
        assert time.monotonic() < deadline, "no spare instance was started"
        time.sleep(0.05)
