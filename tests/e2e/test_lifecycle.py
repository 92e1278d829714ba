"""Server lifecycle: restart with functions intact, graceful shutdown, no orphans."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx

from tests.support import NimbusServer, instance_pids, node_cgroups, running


def test_restart_keeps_functions_versions_and_logs(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with running(data) as s:
        assert s.deploy("hello", name="persist").status_code == 201
        assert s.update("persist", spec={"memory": 512}).status_code == 200
        assert s.invoke("persist").status_code == 200
        assert s.stop() in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after a clean exit
        assert "Finished server process" in s.output()
    with running(data) as s:
        desc = s.client.get("/v1/functions/persist").json()
        assert desc["version"] == 2 and desc["spec"]["memory"] == 512
        assert [v["version"] for v in desc["versions"]] == [1, 2]
        assert s.client.get("/function/persist", params={"name": "again"}).json() == {
            "hello": "again"
        }
        messages = [r["message"] for r in s.logs("persist")]
        assert sum(m.startswith("REPORT") for m in messages) >= 1


def test_sigterm_finishes_in_flight_invocation_and_leaves_no_process(tmp_path: Path) -> None:
    with running(tmp_path / "data") as s:
        assert s.deploy("slow", name="drain").status_code == 201
        assert s.deploy("hello", name="idle-one").status_code == 201
        assert s.invoke("idle-one").status_code == 200  # an idle warm instance to clean up
        result: dict[str, httpx.Response] = {}

        def call() -> None:
            with s.new_client(timeout=30) as c:
                result["r"] = c.post("/v1/functions/drain/invoke", json={"sleep": 2})

        t = threading.Thread(target=call)
        t.start()
        deadline = time.monotonic() + 10
        while s.client.get("/v1/functions/drain").json()["instances"]["busy"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert s.client.get("/v1/functions/idle-one").json()["instances"]["idle"] == 1
        assert instance_pids(s.data_dir)
        assert s.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
        t.join()
        assert result["r"].status_code == 200 and result["r"].json() == {"slept": 2}
        assert instance_pids(s.data_dir) == []
        assert node_cgroups(s.data_dir) == []
        assert "Finished server process" in s.output()


def test_sigint_also_shuts_down_cleanly(tmp_path: Path) -> None:
    with running(tmp_path / "data") as s:
        assert s.deploy("hello", name="int").status_code == 201
        assert s.invoke("int").status_code == 200
        assert instance_pids(s.data_dir)
        s.stop(signal.SIGINT)
        assert instance_pids(s.data_dir) == []


def test_instances_exit_when_the_server_is_killed(tmp_path: Path) -> None:
    with running(tmp_path / "data") as s:
        assert s.deploy("hello", name="orphan").status_code == 201
        assert s.invoke("orphan").status_code == 200
        pids = instance_pids(s.data_dir)
        assert pids
        s.stop(signal.SIGKILL)
        deadline = time.monotonic() + 5
        while instance_pids(s.data_dir) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert instance_pids(s.data_dir) == []  # their socket closed: they exit by themselves


def test_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with running(tmp_path / "a") as first:
        second = NimbusServer(tmp_path / "b")
        second.port = first.port
        second.url = first.url
        import subprocess
        import sys

        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "nimbus",
                "up",
                "--port",
                str(first.port),
                "--data-dir",
                str(tmp_path / "b"),
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode != 0
        assert "Traceback" not in out.stderr + out.stdout
        second.client.close()
