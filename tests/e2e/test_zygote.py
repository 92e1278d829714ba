"""Instances are forks of a zygote: what a user can observe of that."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.support import NimbusServer


def test_forked_instances_never_share_random_state(server: NimbusServer) -> None:
    assert server.deploy("rng", name="zy-rng", scaling={"keep_warm": 0}).status_code == 201
    outs = [server.invoke("zy-rng").json() for _ in range(4)]  # a new instance each time
    for key in ("random", "urandom", "uuid"):
        assert len({o[key] for o in outs}) == 4, key


def host_cgroup(namespace: str) -> str:
    """The cgroups, as the host names them, of the processes in cgroup ``namespace``
    (they are still there: an idle instance stays warm)."""
    found = set()
    for entry in os.listdir("/proc"):
        with contextlib.suppress(OSError):
            if entry.isdigit() and os.readlink(f"/proc/{entry}/ns/cgroup") == namespace:
                found.add(Path(f"/proc/{entry}/cgroup").read_text())
    assert len(found) == 1, f"{namespace}: {found}"
    return found.pop()


def concurrently(server: NimbusServer, name: str, events: list[dict[str, Any]]) -> list[Any]:
    with ThreadPoolExecutor(len(events)) as pool:
        responses = list(pool.map(lambda e: server.invoke(name, e), events))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses]
    return [r.json() for r in responses]


def test_init_runs_once_and_instances_are_forks_of_the_function_zygote(
    server: NimbusServer,
) -> None:
    assert server.deploy("zygote-probe", name="zy-fork").status_code == 201
    outs = concurrently(server, "zy-fork", [{"sleep": 1.5, "touch": f"f{i}"} for i in range(3)])
    # Three instances at once (each held its invocation), one init: the zygote's.
    # Each sees its own cgroup as its root (a cgroup namespace): the host tells them apart.
    assert all(line.endswith(":/") for o in outs for line in o["cgroup"].splitlines()), outs
    assert len({host_cgroup(o["cgroup_ns"]) for o in outs}) == 3, (
        "instances need cgroups of their own"
    )
    assert len({o["init"] for o in outs}) == 1
    records = server.logs("zy-fork")
    assert sum(r["message"].startswith("init ran:") for r in records) == 1
    assert any("Phase: zygote\tStatus: success" in r["message"] for r in records)
    for key in ("random", "urandom", "uuid"):
        assert len({o[key] for o in outs}) == 3, f"{key} repeats between forks"
    uid = server.client.get("/v1/functions/zy-fork").json()
    for o in outs:
        # Its own pid namespace (init is 1, the instance 2: no zygote, no neighbour),
        # its own /tmp, the function's uid, and only its own descriptors: 0-2 the
        # null device and its output pipe, 3 its socket, then what it opened itself.
        assert o["pid"] == 2 and o["pids"] == [1, 2], o["pids"]
        assert len(o["tmp"]) == 1, o["tmp"]
        assert o["uid"] >= 100000
        assert o["fds"]["0"] == "/dev/null" and o["fds"]["3"].startswith("socket:")
        assert o["fds"]["1"].startswith("pipe:") and o["fds"]["1"] == o["fds"]["2"]
        others = {fd: target for fd, target in o["fds"].items() if int(fd) > 3}
        assert all(t.startswith("/proc/") for t in others.values()), others
    assert uid["zygote"]["function"] is True


def test_a_new_version_gets_a_new_zygote(server: NimbusServer) -> None:
    assert server.deploy("zygote-probe", name="zy-version").status_code == 201
    first = server.invoke("zy-version").json()
    assert server.update("zy-version", {"environment": {"V": "2"}}).status_code == 200
    second = server.invoke("zy-version").json()
    assert second["version"] == "2"
    assert first["init"] != second["init"], "the new version reused the old zygote"
    records = server.logs("zy-version")
    assert sum(r["message"].startswith("init ran:") for r in records) == 2


def test_an_idle_zygote_stops_after_its_keep_warm(server: NimbusServer) -> None:
    scaling = {"keep_warm": 0, "zygote_keep_warm": 1}
    assert server.deploy("zygote-probe", name="zy-idle", scaling=scaling).status_code == 201
    first = server.invoke("zy-idle").json()
    again = server.invoke("zy-idle").json()  # within a second: a fork of the same zygote
    assert again["init"] == first["init"]
    deadline = time.monotonic() + 15
    while server.client.get("/v1/functions/zy-idle").json()["zygote"]["function"]:
        assert time.monotonic() < deadline, "the idle function zygote was never stopped"
        time.sleep(0.2)
    later = server.invoke("zy-idle").json()
    assert later["init"] != first["init"]  # a new zygote ran the init again


def test_a_failing_init_in_the_zygote_is_the_invocations_init_error(
    server: NimbusServer,
) -> None:
    r = server.deploy("init-error", name="zy-init-error", force=True)
    assert r.status_code == 201, r.text
    r = server.invoke("zy-init-error")
    assert r.headers.get("x-nimbus-function-error") == "Init", r.text
    assert server.client.get("/v1/functions/zy-init-error").json()["zygote"]["function"] is False


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
    # The zygote initialised at publish: the first instance is a restored fork.
    assert reports[0].endswith("\tStart: cold") and "Restore Duration" in reports[0]
    assert "Init Duration" not in reports[0]
    assert all(r.endswith("\tStart: warm") for r in reports[1:])
    desc = server.client.get("/v1/functions/zy-marks").json()
    assert desc["starts"] == {"cold": 1, "warm": 2}
    assert desc["zygote"] == {"runtime": "python3.11", "up": True, "function": True}
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


def test_an_init_that_leaves_threads_or_open_files_runs_without_a_zygote(
    server: NimbusServer,
) -> None:
    """A fork would lose the init's threads and share (or break) its open files: such a
    version runs every instance's init itself, and says so in its logs."""
    assert server.deploy("zygote-unforkable", name="zy-unfork").status_code == 201
    outs = concurrently(server, "zy-unfork", [{"sleep": 1.0} for _ in range(2)])
    for o in outs:
        assert o["ticker_alive"] is True  # its own thread, started by its own init
        assert o["kept"] == '"""An '  # its own file, opened by its own init
    assert len({o["init"] for o in outs}) == 2  # two inits: no shared zygote
    records = server.logs("zy-unfork")
    notes = [r["message"] for r in records if "no function zygote for version 1" in r["message"]]
    assert notes and "1 thread(s) (ticker)" in notes[0] and "open file(s)" in notes[0], notes
    assert server.client.get("/v1/functions/zy-unfork").json()["zygote"]["function"] is False


def test_an_event_loop_made_at_init_is_each_forks_own(server: NimbusServer) -> None:
    """Mangum (and many libraries) make an asyncio loop at import: the version still
    forks, and each instance's loop has an epoll instance and self-pipe of its own."""
    assert server.deploy("zygote-asyncio", name="zy-loop").status_code == 201
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: server.invoke("zy-loop", {"sleep": 1.0}), range(2)))
    results = [r.json() for r in outs]
    assert all("self_pipe" in r for r in results), results
    assert results[0]["self_pipe"] != results[1]["self_pipe"], results
    assert all(r["took"] < 5 for r in results)
    records = server.wait_logs(
        "zy-loop", lambda rs: sum(x["message"].startswith("REPORT") for x in rs) == 2
    )
    reports = [x["message"] for x in records if x["message"].startswith("REPORT")]
    assert all("Restore Duration" in r for r in reports), reports  # forks of the zygote
    assert not any("no function zygote" in x["message"] for x in records)


def test_an_init_on_the_requests_path_is_its_init_duration(server: NimbusServer) -> None:
    """No zygote kept (zygote_keep_warm 0): each first request waits for an init, and its
    REPORT's Init Duration is that init's, the figure INIT_REPORT logs."""
    r = server.deploy("rng", name="zy-onpath", scaling={"keep_warm": 0, "zygote_keep_warm": 0})
    assert r.status_code == 201, r.text
    assert server.invoke("zy-onpath").status_code == 200
    records = server.wait_logs(
        "zy-onpath", lambda rs: any(x["message"].startswith("REPORT") for x in rs)
    )
    messages = [x["message"] for x in records]
    # The deploy's verdict ran the init once (its INIT_REPORT), the request once more.
    inits = [m for m in messages if m.startswith("INIT_REPORT")]
    report = next(m for m in messages if m.startswith("REPORT"))
    assert "Restore Duration" not in report
    init = report.split("Init Duration: ")[1].split(" ms")[0]
    assert f"INIT_REPORT Init Duration: {init} ms\tPhase: zygote\tStatus: success" in inits, (
        inits,
        report,
    )
