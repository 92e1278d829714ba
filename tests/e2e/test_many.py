"""Two hundred warm instances of twenty functions fit on one node and all answer
(issue 4), started at once: 200 spawns in flight to the zygote together."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.support import running, zip_of


def test_200_warm_instances_of_20_functions(tmp_path: Path) -> None:
    with running(tmp_path / "data") as s:
        for i in range(20):
            spec, code = zip_of("hello", name=f"many-{i:02d}")
            spec["scaling"] = {"min": 10, "max": 10}
            assert s.create(spec, code).status_code == 201
        deadline = time.monotonic() + 60
        while s.client.get("/healthz").json()["instances"] < 200 or any(
            s.client.get(f"/v1/functions/many-{i:02d}").json()["instances"]["idle"] < 10
            for i in range(20)
        ):
            assert time.monotonic() < deadline, "200 warm instances never came up"
            time.sleep(0.2)

        def call(i: int) -> int:
            with s.new_client(timeout=30) as c:
                return sum(
                    c.get(f"/function/many-{i:02d}", params={"name": "x"}).status_code == 200
                    for _ in range(10)
                )

        with ThreadPoolExecutor(20) as pool:
            assert sum(pool.map(call, range(20))) == 200
        assert s.client.get("/healthz").json()["instances"] == 200  # served warm, no more started
