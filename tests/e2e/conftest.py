from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import NimbusServer, build_wheel, running


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("wheels")
    build_wheel(directory)
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Iterator[NimbusServer]:
    """One real ``nimbus up`` shared by a test module; tests use their own function names."""
    env = {"PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(wheelhouse)}
    with running(
        tmp_path_factory.mktemp("nimbus") / "data",
        env=env,
        # The tests' callback and destination receivers listen on loopback.
        args=["--queue-depth", "2", "--queue-timeout", "1", "--outbound-allow", "127.0.0.1/32"],
    ) as s:
        yield s
